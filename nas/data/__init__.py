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
    "get_batch",
    "load_corpus",
    "read_tokens",
    "sample_seq_len",
    "sha256_file",
]
