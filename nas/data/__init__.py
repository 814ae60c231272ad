"""Data: language-modelling corpora (PTB, WikiText-2), vocabulary, batching for BPTT; sentence classification
(SST-2) in :mod:`nas.data.sentences`."""

from .batching import SEQ_LEN_SAMPLERS, batchify, bptt_segments, check_min_size, get_batch, sample_seq_len
from .corpus import (
    DATASETS,
    Corpus,
    DataError,
    DatasetSpec,
    SplitSpec,
    Vocab,
    download_dataset,
    load_corpus,
    read_tokens,
    sha256_file,
)
from .sentences import CLASSIFICATION_DATASETS



def find_data_folder(name: str, root=None, cache_dir=None):
    """The folder a run of dataset ``name`` reads its files from, found as :func:`load_corpus` /
    :func:`nas.data.sentences.load_sst2` look for it (``root`` and ``root/<folder>``; else ``$NAS_DATA/<folder>``,
    then the download cache), as an absolute path; None when no folder holds the files yet (a download then fills
    the cache folder, itself absolute once ``cache_dir`` is resolved).

    Raises:
        DataError: an unknown dataset name.
    """
    import os

    if name in CLASSIFICATION_DATASETS:
        from .sentences import _candidates as sentence_folders
        from .sentences import _has_all as has_sentences

        found = [d for d in sentence_folders(root) if has_sentences(d)]
    else:
        from .corpus import _candidates, _has_all, _spec

        spec = _spec(name)
        found = [d for d in _candidates(spec, root, cache_dir) if _has_all(d, spec)]
    return os.path.abspath(found[0]) if found else None


__all__ = [
    "DATASETS",
    "SEQ_LEN_SAMPLERS",
    "Corpus",
    "DataError",
    "DatasetSpec",
    "SplitSpec",
    "Vocab",
    "batchify",
    "bptt_segments",
    "check_min_size",
    "download_dataset",
    "find_data_folder",
    "get_batch",
    "load_corpus",
    "read_tokens",
    "sample_seq_len",
    "sha256_file",
]
