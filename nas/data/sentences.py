"""Sentence classification data: SST-2 (binary sentiment) in the GLUE format.

Source: the Stanford Sentiment Treebank, Socher et al. (2013), "Recursive Deep Models for
Semantic Compositionality Over a Sentiment Treebank" (EMNLP), in its binary GLUE version,
Wang et al. (2019), "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding" (ICLR). GLUE's ``train.tsv``/``dev.tsv`` files contain a header line
``sentence<TAB>label``, then one ``<lowercased tokenized sentence><TAB><0|1>`` row per line.
GLUE's ``test.tsv`` has no labels, so it is not used here.

Splits, as this project uses them:

* ``train``: GLUE train without a held-out part, in file order.
* ``valid``: the held-out part of GLUE train. It chooses the architecture weights (alpha)
  during search and selects the model during retraining.
* ``test``: GLUE dev. It is the accuracy reported as "test".

SST labels every phrase of each sentence's parse tree (Socher et al. 2013, abstract: "fine
grained sentiment labels for 215,154 unique phrases"), and GLUE's SST-2 ``train.tsv`` holds
those phrases as rows of their own: of its 67,349 rows (66,978 distinct), 6,885 distinct rows
lie inside no other row (mean 19.4 words; dev's sentences: 19.6), and every other row is a
contiguous span of one of them (mean row length 9.4 words; measured on the file). A random
held-out part of the rows therefore mostly holds phrases of sentences that are trained on
(2,988 of 3,367 held-out rows lie inside a training row at 5%, seed 0; 0.92 held-out against
0.81 dev accuracy in this project's first SST-2 retraining). The default held-out part
(``holdout_by='sentence'``, :func:`sentence_holdout`) is made of whole sentences with the
phrases that occur in no other sentence, so that no held-out row lies inside a training row.
``holdout_by='row'`` is the random row split that runs made before it
(:data:`LEGACY_HOLDOUT_BY`).

The held-out part comes from a fixed permutation drawn with ``numpy.random.default_rng(seed)``.
This *data seed* does not depend on the run seed, so runs with different seeds use the same
split. The vocabulary is built from the ``train`` part only.

There is no download: GLUE data must be fetched by the user from the GLUE site.
"""

from __future__ import annotations

import numbers
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..errors import ConfigError
from .corpus import DataError, bad_utf8_line

PAD = "<pad>"  # index 0 always
UNK = "<unk>"  # index 1 always
PAD_INDEX = 0
UNK_INDEX = 1

SST2_FOLDER = "sst-2"
SST2_FILES = {"train": "train.tsv", "test": "dev.tsv"}  # our split -> GLUE file
SST2_HEADER = "sentence\tlabel"
SST2_NUM_CLASSES = 2
GLUE_URL = "https://gluebenchmark.com/tasks"
#: sentence-classification datasets (``dataset=<name>``); the others (ptb, wikitext2) are language modeling
CLASSIFICATION_DATASETS = ("sst2",)
#: how the held-out part is drawn: whole sentences with their own phrases (default), or random rows
HOLDOUT_BY = ("sentence", "row")
#: the held-out split of a run config that has no ``dataset.holdout_by`` (saved before the key existed): its
#: run was made on the random row split, and its checkpoints' word ids follow that split's vocabulary
LEGACY_HOLDOUT_BY = "row"
_SPLITS = ("train", "valid", "test")
_LABEL_RE = re.compile(r"[0-9]+")


# eq=False: the fields hold tensors, whose == is elementwise; splits are compared by identity.
@dataclass(frozen=True, eq=False)
class Sentences:
    """One split of a sentence-classification data set.

    Attributes:
        tokens: ``list`` of ``N`` 1-D ``torch.long`` tensors of word ids, each of length >= 1.
        labels: ``[N]`` ``torch.long`` tensor of class indices.

    Raises:
        ValueError: ``tokens`` and ``labels`` have different lengths.
    """

    tokens: list
    labels: torch.Tensor

    def __post_init__(self):
        if len(self.tokens) != len(self.labels):
            raise ValueError(f"Sentences: {len(self.tokens)} token sequences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.tokens)


class SentenceBatch(NamedTuple):
    """A padded batch of ``B`` sentences.

    tokens: ``[T, B]`` long, time-major. Column ``b`` holds sentence ``b``'s ids in rows
        ``0 .. lengths[b]-1``, and ``PAD`` (index 0) below them. ``T`` is the batch's
        longest sentence.
    lengths: ``[B]`` long, every value >= 1.
    labels: ``[B]`` long.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True, eq=False)
class ClassificationData:
    """A tokenized sentence-classification data set.

    Attributes:
        name: ``'sst2'``.
        itos: index -> word. ``itos[0] == PAD`` and ``itos[1] == UNK``. Built from ``train`` only.
        num_classes: number of labels (2 for SST-2).
        train: GLUE train without the held-out part.
        valid: the held-out part of GLUE train.
        test: GLUE dev (GLUE test has no labels).
    """

    name: str
    itos: list
    num_classes: int
    train: Sentences
    valid: Sentences
    test: Sentences

    @property
    def ntoken(self) -> int:
        """Vocabulary size, ``len(itos)`` (PAD and UNK included)."""
        return len(self.itos)

    def split(self, which: str) -> Sentences:
        """Return the split named ``'train'``, ``'valid'`` or ``'test'``.

        Raises:
            DataError: any other name.
        """
        if which not in _SPLITS:
            raise DataError(f"unknown split {which!r}; valid splits: {', '.join(_SPLITS)}")
        return getattr(self, which)


# ---------------------------------------------------------------- reading


def read_labelled_tsv(path: str | os.PathLike, num_classes: int) -> tuple[list[list[str]], list[int]]:
    """Read a GLUE single-sentence TSV file (``sentence<TAB>label`` header) as words and labels.

    Each row is split on its *last* tab. The csv module is not used because sentences contain
    quote characters. The sentence is tokenized with ``str.split()`` because GLUE's SST-2 text
    is already lowercased and tokenized. The file is decoded as strict UTF-8; a leading
    byte-order mark is ignored. Universal newlines make ``'\\r\\n'`` the same as ``'\\n'``.

    Returns:
        ``(sentences, labels)``. ``sentences[i]`` is a non-empty word list and ``labels[i]``
        an int in ``[0, num_classes)``.

    Raises:
        DataError: the file cannot be read; it is not valid UTF-8 (gives file and line); the
            header is not ``sentence<TAB>label``; a row has no tab, an empty sentence, or a
            label that is not an integer in ``[0, num_classes)`` (gives ``file:line``); the
            file has no data rows.
    """
    path = Path(path)
    sentences: list[list[str]] = []
    labels: list[int] = []
    try:
        with open(path, encoding="utf-8-sig", errors="strict") as f:
            header = f.readline()
            if not header:
                raise DataError(f"{path}: the file is empty (no header, 0 rows); it is truncated or wrong.")
            header = header.rstrip("\n")
            if header != SST2_HEADER:
                hint = ""
                if header.split("\t")[:1] == ["index"]:
                    hint = " This looks like GLUE's unlabelled test.tsv; the labelled files are train.tsv and dev.tsv."
                raise DataError(
                    f"{path}:1: expected the header {SST2_HEADER!r}, found {header[:80]!r}.{hint} "
                    f"The file is not a GLUE SST-2 train/dev file."
                )
            for lineno, line in enumerate(f, start=2):
                sentence, tab, label = line.rstrip("\n").rpartition("\t")
                if not tab:
                    raise DataError(
                        f"{path}:{lineno}: no tab in the row {line.rstrip()[:80]!r}; each row must be "
                        f"'<sentence><TAB><label>'. The file is corrupt or not in the GLUE format."
                    )
                words = sentence.split()
                if not words:
                    raise DataError(f"{path}:{lineno}: empty sentence; every row needs at least one word.")
                label = label.strip()
                value = int(label) if _LABEL_RE.fullmatch(label) else None
                if value is None or value >= num_classes:
                    raise DataError(
                        f"{path}:{lineno}: label {label[:20]!r} is not an integer in [0, {num_classes}); "
                        f"the file is corrupt or not a {num_classes}-class data set."
                    )
                sentences.append(words)
                labels.append(value)
    except UnicodeDecodeError:
        lineno, err = bad_utf8_line(path)
        raise DataError(
            f"{path}: line {lineno} is not valid UTF-8 ({err.reason} at byte {err.start} of the line); "
            f"the file is corrupt or in another encoding - fetch it again from the GLUE site or "
            f"convert it to UTF-8."
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not sentences:
        raise DataError(f"{path}: the file has a header but 0 data rows; it is truncated or wrong.")
    return sentences, labels


# ---------------------------------------------------------------- locating files


def _candidates(root) -> list[Path]:
    """Folders to look in, in priority order (see load_sst2)."""
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / SST2_FOLDER]
    env = os.environ.get("NAS_DATA")
    return [Path(env).expanduser() / SST2_FOLDER] if env else []


def _has_all(d: Path) -> bool:
    return all((d / f).is_file() for f in SST2_FILES.values())


def _missing_message(looked: list[Path]) -> str:
    names = ", ".join(SST2_FILES.values())
    lines = [f"dataset 'sst2': could not find {names}."]
    if looked:
        lines[0] += " Looked in:"
        for d in looked:
            missing = [f for f in SST2_FILES.values() if not (d / f).is_file()]
            state = "directory does not exist" if not d.is_dir() else "missing " + ", ".join(missing)
            lines.append(f"  - {d}  ({state})")
    else:
        lines[0] += " Looked nowhere: NAS_DATA is not set and no dataset.root was given."
    lines.append(
        f"Provide the data in one of these ways: set NAS_DATA=/dir containing {SST2_FOLDER}/ "
        f"(with {names}), or pass dataset.root=/path/to/{SST2_FOLDER} (or its parent). "
        f"There is no automatic download: fetch SST-2 yourself from the GLUE site ({GLUE_URL}) "
        f"and unpack its train.tsv and dev.tsv there."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- split / vocabulary


def _holdout_count(holdout, n: int) -> int:
    """Number of held-out sentences for ``holdout`` (a fraction or a count) out of ``n``.

    A fraction gives ``int(round(holdout * n))``. Python's ``round`` rounds halves to even,
    e.g. 0.05 * 67,349 = 3,367.45 gives 3,367.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, numbers.Real):
        raise ConfigError(
            f"holdout must be a fraction in (0, 1) or an integer count >= 1, got {holdout!r}"
        )
    if isinstance(holdout, numbers.Integral):
        k = int(holdout)
        if k < 1:
            raise ConfigError(f"holdout count must be >= 1, got {k}; use e.g. holdout=0.05 for a 5% fraction.")
    else:
        h = float(holdout)
        if not 0.0 < h < 1.0:
            raise ConfigError(
                f"holdout fraction must be in (0, 1), got {holdout!r}; pass an integer for a count of sentences."
            )
        k = int(round(h * n))
        if k < 1:
            raise ConfigError(
                f"holdout={holdout!r} of {n} training sentences gives an empty valid split; use a larger "
                f"fraction or an integer count >= 1."
            )
    if k >= n:
        raise ConfigError(
            f"holdout={holdout!r} holds out {k} of {n} training sentences and leaves none to train on; "
            f"use a smaller holdout (at most {n - 1})."
        )
    return k


def sentence_spans(sentences: list[list[str]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The sentences of a phrase-labelled data set, and the rows that lie inside each.

    Row ``x`` *lies inside* row ``y`` when ``x``'s words are a contiguous run of ``y``'s words
    (``x == y`` included). A *sentence* is a row that lies inside no other, different row; every
    row lies inside at least one sentence. In GLUE's SST-2 train the sentences are SST's
    sentences and the other rows their labelled phrases (see the module docstring).

    Args:
        sentences: ``N`` word lists (rows), as from :func:`read_labelled_tsv`.

    Returns:
        ``(text, inside)``. ``text``: ``[N]`` int64, the id of each row's word sequence;
        equal rows share an id, and ids are numbered in order of first appearance.
        ``inside``: one sorted, duplicate-free int64 array of text ids per sentence: the texts
        that lie inside it, itself included. Sentences come in order of their first appearance
        in the file; a sentence that appears several times is one sentence.

    Cost: one dictionary lookup per contiguous span of each sentence (sum of ``L(L+1)/2``):
    about 1.7M lookups and 1.5 s on GLUE's SST-2 train on one CPU core (loading SST-2 takes 2.9 s
    instead of 1.3 s with ``holdout_by='row'``).
    """
    text = np.empty(len(sentences), dtype=np.int64)
    ids: dict[str, int] = {}  # " ".join(words) -> text id
    texts: list[list[str]] = []
    for i, words in enumerate(sentences):
        t = ids.setdefault(" ".join(words), len(texts))
        if t == len(texts):
            texts.append(words)
        text[i] = t
    # Longest first: a text is a sentence unless a longer sentence already holds it (a text that lies
    # inside a longer row lies inside a sentence that holds that row, and that sentence is longer still).
    held = np.zeros(len(texts), dtype=bool)
    found: list[tuple[int, np.ndarray]] = []
    for t in sorted(range(len(texts)), key=lambda t: -len(texts[t])):  # stable: ties in text id order
        if held[t]:
            continue
        words = texts[t]
        line = " ".join(words)
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
        ends = [a + len(w) for a, w in zip(starts, words)]
        spans = [ids.get(line[a:e]) for i, a in enumerate(starts) for e in ends[i:]]
        inner = np.unique(np.array([j for j in spans if j is not None], dtype=np.int64))
        held[inner] = True
        found.append((t, inner))
    found.sort(key=lambda f: f[0])
    return text, [inner for _, inner in found]


def sentence_holdout(sentences: list[list[str]], k: int, seed: int) -> np.ndarray:
    """Hold out whole sentences with their own phrases: no held-out row lies inside a training row.

    Definition (see :func:`sentence_spans` for *lies inside* and *sentence*): the ``S`` sentences,
    numbered in order of first appearance, are drawn in the order
    ``numpy.random.default_rng(seed).permutation(S)``. A row is held out once every sentence it
    lies inside has been drawn; drawing stops at the first sentence with which at least ``k`` rows
    are held out. So equal rows are on the same side, and no held-out row lies inside (or equals)
    a training row: a training row lies inside an undrawn sentence, and so does all that lies
    inside it. A training row may lie inside a held-out row (a word or a phrase of several
    sentences, such as ``'good'``), as training rows lie inside GLUE dev's sentences.

    The stricter rule in which no training row lies inside a held-out row either would have to
    drop the rows that lie inside both a held-out and a training sentence (966 rows at
    ``holdout=0.05``, seed 0), and would make the held-out part unlike dev: the longest training
    row inside a GLUE dev sentence covers on average 10.7% of its words, and 10.8% for the
    held-out sentences of this split against its training part (measured on SST-2, seed 0).

    When no row lies inside another row and no two rows are equal, every row is its own sentence
    and this is the row split: the first ``k`` of ``default_rng(seed).permutation(N)``.

    Args:
        sentences: ``N`` word lists (rows) in file order.
        k: number of rows to hold out, ``1 <= k < N``.
        seed: the data seed.

    Returns:
        ``[N]`` bool, True for held-out rows: at least ``k`` of them, more by less than the phrases
        of the last sentence drawn (3,369 for ``k = 3,367`` on SST-2, seed 0: 355 sentences).

    Raises:
        ConfigError: the held-out part takes every row, so nothing is left to train on.
    """
    text, inside = sentence_spans(sentences)
    rows_of_text = np.bincount(text)
    undrawn = np.zeros(len(rows_of_text), dtype=np.int64)  # per text: the sentences not drawn yet that hold it
    for inner in inside:
        undrawn[inner] += 1
    held_text = np.zeros(len(rows_of_text), dtype=bool)
    count = 0
    for s in np.random.default_rng(seed).permutation(len(inside)):
        inner = inside[s]
        undrawn[inner] -= 1
        free = inner[undrawn[inner] == 0]
        held_text[free] = True
        count += int(rows_of_text[free].sum())
        if count >= k:
            break
    if count >= len(sentences):
        raise ConfigError(
            f"holding out {k} of {len(sentences)} rows by whole sentences takes every row (the file has "
            f"{len(inside)} sentence(s) that hold the others): nothing is left to train on; use a smaller "
            f"holdout or dataset.holdout_by=row."
        )
    return held_text[text]


def build_vocab(sentences: list[list[str]], min_freq: int = 1) -> list[str]:
    """Vocabulary ``itos`` from tokenized sentences (normally the training part only).

    ``itos = [PAD, UNK] + words``, where ``words`` are those counted at least ``min_freq``
    times, in descending count order with ties broken by first appearance. ``PAD`` and
    ``UNK`` are not listed again if they also appear as words in the text.

    Raises:
        ConfigError: ``min_freq`` is not an integer >= 1.
    """
    if isinstance(min_freq, bool) or not isinstance(min_freq, numbers.Integral) or min_freq < 1:
        raise ConfigError(f"min_freq must be an integer >= 1, got {min_freq!r}")
    counts: Counter[str] = Counter()
    for words in sentences:
        counts.update(words)  # Counter keeps first-appearance order
    # sorted() is stable, so words with equal counts stay in first-appearance order.
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return [PAD, UNK] + [w for w, c in ranked if c >= min_freq and w not in (PAD, UNK)]


def _encode(sentences: list[list[str]], labels: list[int], stoi: dict[str, int]) -> Sentences:
    """Map words to ids (unseen -> UNK) as one tensor, then cut it into per-sentence views."""
    lengths = [len(s) for s in sentences]
    flat = [stoi.get(w, UNK_INDEX) for s in sentences for w in s]
    ids = torch.tensor(flat, dtype=torch.long)
    return Sentences(tokens=list(ids.split(lengths)), labels=torch.tensor(labels, dtype=torch.long))


# ---------------------------------------------------------------- public loader


def load_sst2(root=None, holdout=0.05, seed: int = 0, min_freq: int = 1,
              holdout_by: str = "sentence") -> ClassificationData:
    """Load binary SST-2 (GLUE format) as word-id tensors.

    Source: Socher et al. (2013), Stanford Sentiment Treebank; GLUE version, Wang et al. (2019).

    Args:
        root: a folder holding ``train.tsv`` and ``dev.tsv``, or its parent holding ``sst-2/``.
            If None, ``$NAS_DATA/sst-2`` is used.
        holdout: how much of GLUE train goes to ``valid``. A fraction in (0, 1) gives
            ``k = int(round(holdout * N))`` rows (Python rounds halves to even). An int
            ``>= 1`` is a count ``k``.
        seed: the data seed for ``numpy.random.default_rng``. It picks the held-out rows
            and does not depend on the run seed.
        min_freq: keep training words counted at least this many times. Rarer words map to UNK.
        holdout_by: ``'sentence'``: whole sentences with the phrases that lie in no other
            sentence, at least ``k`` rows, such that no held-out row lies inside (or equals) a
            training row (:func:`sentence_holdout`; 3,369 rows for 5% of SST-2 at seed 0).
            ``'row'``: exactly ``k`` random rows, the first ``k`` indices of
            ``default_rng(seed).permutation(N)``; the split of runs made before ``'sentence'``
            existed, kept so that they resume and their checkpoints meet the vocabulary they
            were trained with. Its held-out rows are mostly phrases of training sentences.

    Returns:
        ClassificationData with ``name='sst2'`` and ``num_classes=2``. ``valid`` is the held-out
        part (see ``holdout_by``). Both ``train`` and ``valid`` keep the order of the file.
        ``test`` is GLUE dev. The vocabulary comes from ``train``
        only (see :func:`build_vocab`); words not in it, and a literal ``'<pad>'`` in the text,
        map to UNK (index 1), so index 0 only ever marks padding.

    Raises:
        DataError: the files are missing (the message lists every folder looked in and how to
            provide the data), or a file is malformed (see :func:`read_labelled_tsv`).
        ConfigError: ``holdout``, ``min_freq`` or ``holdout_by`` is invalid, or ``holdout``
            leaves an empty ``train`` or ``valid`` split.
    """
    if holdout_by not in HOLDOUT_BY:
        raise ConfigError(f"holdout_by={holdout_by!r}; valid: {', '.join(HOLDOUT_BY)}")
    looked = _candidates(root)
    folder = next((d for d in looked if _has_all(d)), None)
    if folder is None:
        raise DataError(_missing_message(looked))

    sents, labels = read_labelled_tsv(folder / SST2_FILES["train"], SST2_NUM_CLASSES)
    n = len(sents)
    k = _holdout_count(holdout, n)
    if holdout_by == "sentence":
        is_valid = sentence_holdout(sents, k, seed)
    else:
        is_valid = np.zeros(n, dtype=bool)
        is_valid[np.random.default_rng(seed).permutation(n)[:k]] = True
    valid_idx = np.flatnonzero(is_valid)  # ascending: file order
    train_idx = np.flatnonzero(~is_valid)
    train_sents = [sents[i] for i in train_idx]
    train_labels = [labels[i] for i in train_idx]

    itos = build_vocab(train_sents, min_freq)
    # A literal "<pad>" in the text maps to UNK: index 0 only ever marks padding.
    stoi = {w: i for i, w in enumerate(itos) if i != PAD_INDEX}
    test_sents, test_labels = read_labelled_tsv(folder / SST2_FILES["test"], SST2_NUM_CLASSES)
    return ClassificationData(
        name="sst2",
        itos=itos,
        num_classes=SST2_NUM_CLASSES,
        train=_encode(train_sents, train_labels, stoi),
        valid=_encode([sents[i] for i in valid_idx], [labels[i] for i in valid_idx], stoi),
        test=_encode(test_sents, test_labels, stoi),
    )


# ---------------------------------------------------------------- batching


def sentence_batches(
    split: Sentences,
    batch_size: int,
    shuffle: bool,
    rng: np.random.Generator | None = None,
    device=None,
    drop_last: bool = False,
    bucket: int = 0,
) -> Iterator[SentenceBatch]:
    """Iterate over padded batches of ``batch_size`` sentences.

    With ``shuffle=False`` the sentences come in split order. With ``shuffle=True`` the order
    is ``rng.permutation(len(split))``. Either way every sentence appears exactly once, except
    those in a short last batch when ``drop_last`` is set. The last batch may be smaller
    than ``batch_size`` unless ``drop_last``.

    Args:
        split: the sentences to batch.
        batch_size: ``B`` (>= 1).
        shuffle: draw a new order from ``rng``.
        rng: numpy Generator, required when ``shuffle`` (no hidden global RNG).
        device: torch device for the tensors (default: where the split lives, CPU).
        drop_last: skip a last batch with fewer than ``batch_size`` sentences.
        bucket: with ``shuffle``, cut the shuffled order into pools of ``bucket`` batches, sort each pool
            by sentence length and shuffle the order of its batches, so a batch holds sentences of similar
            length and pads little (the recurrent ops' cost follows ``T``); 0 or 1: no bucketing.  Which
            sentences share a batch is then not uniform, but every sentence still comes once per pass.

    Yields:
        SentenceBatch: ``tokens`` ``[T, B]`` long (time-major, padded with PAD = 0, ``T`` =
        longest sentence in the batch), ``lengths`` ``[B]`` long, ``labels`` ``[B]`` long.

    Raises:
        ValueError: ``batch_size < 1``, or ``shuffle`` without ``rng``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle and rng is None:
        raise ValueError("sentence_batches(shuffle=True) needs rng=np.random.default_rng(seed)")
    n = len(split)
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    starts = list(range(0, stop, batch_size))
    if shuffle and bucket > 1:
        lengths_all = np.fromiter((len(split.tokens[i]) for i in order[:stop]), dtype=np.int64, count=stop)
        pool = bucket * batch_size
        for p0 in range(0, stop, pool):
            seg = slice(p0, min(p0 + pool, stop))
            # stable sort: equal lengths keep their shuffled order
            order[seg] = order[seg][np.argsort(lengths_all[seg], kind="stable")]
            first = p0 // batch_size
            block = starts[first:first + bucket]
            starts[first:first + bucket] = [block[i] for i in rng.permutation(len(block))]
    for start in starts:
        idx = order[start : start + batch_size]
        seqs = [split.tokens[i] for i in idx]
        tokens = pad_sequence(seqs, batch_first=False, padding_value=PAD_INDEX)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        labels = split.labels[torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))]
        if device is not None:
            tokens, lengths, labels = tokens.to(device), lengths.to(device), labels.to(device)
        yield SentenceBatch(tokens, lengths, labels)


def check_batchable(split: Sentences, batch_size: int, what: str) -> None:
    """Fail early if ``split`` cannot fill one batch.

    Args:
        split: the sentences.
        batch_size: configured batch size.
        what: split name for the message (e.g. ``'valid'``).

    Raises:
        DataError: ``len(split) < batch_size``. The message gives the split, its size and the
            batch size, and suggests a smaller batch_size.
    """
    n = len(split)
    if n < batch_size:
        raise DataError(
            f"{what} split has {n} sentence(s), fewer than one batch of {batch_size}; use a smaller "
            f"batch_size (at most {max(1, n)}) or a larger split."
        )


def sentences_folder(root=None) -> Optional[Path]:
    """The first folder holding SST-2's files (``root``, ``root/SST-2``..., ``$NAS_DATA/...``), or None."""
    found = [d for d in _candidates(root) if _has_all(d)]
    return found[0] if found else None
