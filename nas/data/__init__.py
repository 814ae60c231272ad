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
        from .sentences import sentences_folder

        found = sentences_folder(root)
    else:
        from .corpus import corpus_folder

        found = corpus_folder(name, root, cache_dir)
    return os.path.abspath(found) if found is not None else None


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
