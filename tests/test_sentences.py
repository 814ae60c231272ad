"""Tests for nas.data.sentences: SST-2 (GLUE format) loading, held-out split, vocabulary, batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data import DataError
from nas.data.sentences import (
    PAD,
    UNK,
    ClassificationData,
    SentenceBatch,
    Sentences,
    check_batchable,
    load_sst2,
    sentence_batches,
)
from nas.errors import ConfigError

HEADER = "sentence\tlabel\n"
# Rows end with a space before the tab, as in GLUE.
TRAIN_ROWS = [
    ("the cat sat ", 1),
    ("a dog ran ", 0),
    ("the cat and \"quoted phrase ", 1),  # quotes: the csv module would mangle this row
    ("a the dog ", 0),
    ("the big a ", 1),
]
DEV_ROWS = [("the zebra ", 0), ("cat ", 1)]


def tsv(rows) -> str:
    return HEADER + "".join(f"{s}\t{y}\n" for s, y in rows)


def write_sst(d: Path, train=None, dev=None) -> Path:
    """Write train.tsv / dev.tsv into ``d`` (str is written as UTF-8, bytes as they are)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.tsv", tsv(TRAIN_ROWS) if train is None else train),
                       ("dev.tsv", tsv(DEV_ROWS) if dev is None else dev)):
        if isinstance(text, bytes):
            (d / name).write_bytes(text)
        else:
            (d / name).write_text(text, encoding="utf-8", newline="")
    return d


def words(data: ClassificationData, ids: torch.Tensor) -> list[str]:
    return [data.itos[int(i)] for i in ids]


def many_rows(n: int) -> list[tuple[str, int]]:
    """Row i spells i in digit words ("0 4 2"): every digit word is in any sizeable train part."""
    return [(" ".join(f"{i:03d}"), i % 2) for i in range(n)]


# ------------------------------------------------------------------ vocabulary / loading


def held_rows(n: int, k: int, seed: int) -> list[int]:
    """The documented recipe: the first k indices of default_rng(seed).permutation(n), in file order."""
    return sorted(np.random.default_rng(seed).permutation(n)[:k].tolist())


VOCAB_ROWS = [("b a b ", 0), ("c a b ", 1), ("c d ", 0), ("e x ", 1), ("f a ", 0)]
VOCAB_DEV = [("a zebra ", 1), ("f ", 0)]


def test_vocab_order_pad_unk_from_train_part_only(tmp_path):
    root = write_sst(tmp_path, train=tsv(VOCAB_ROWS), dev=tsv(VOCAB_DEV))
    assert held_rows(5, 1, 8) == [3]  # seed 8 holds out "e x"
    d = load_sst2(root, holdout=1, seed=8)
    assert d.name == "sst2" and d.num_classes == 2
    # train part b a b / c a b / c d / f a: b 3, a 3, c 2, d 1, f 1; ties in first-appearance order
    assert d.itos == [PAD, UNK, "b", "a", "c", "d", "f"]
    assert d.itos[0] == "<pad>" and d.itos[1] == "<unk>" and d.ntoken == 7
    assert [words(d, t) for t in d.train.tokens] == [["b", "a", "b"], ["c", "a", "b"], ["c", "d"], ["f", "a"]]
    assert d.train.labels.tolist() == [0, 1, 0, 0]
    assert [t.tolist() for t in d.valid.tokens] == [[1, 1]]  # "e x": held-out words are not in the vocabulary
    assert d.valid.labels.tolist() == [1]
    assert [words(d, t) for t in d.test.tokens] == [["a", UNK], ["f"]]  # dev words neither
    assert d.test.labels.tolist() == [1, 0]
    for split in (d.train, d.valid, d.test):
        assert isinstance(split, Sentences) and len(split) == len(split.labels)
        assert split.labels.dtype == torch.long
        assert all(t.dtype == torch.long and t.dim() == 1 and len(t) >= 1 for t in split.tokens)
    assert d.split("valid") is d.valid
    with pytest.raises(DataError, match="unknown split"):
        d.split("dev")


def test_min_freq(tmp_path):
    root = write_sst(tmp_path, train=tsv(VOCAB_ROWS), dev=tsv(VOCAB_DEV))
    d2 = load_sst2(root, holdout=1, seed=8, min_freq=2)
    assert d2.itos == [PAD, UNK, "b", "a", "c"]
    assert [words(d2, t) for t in d2.train.tokens][2:] == [["c", UNK], [UNK, "a"]]
    assert load_sst2(root, holdout=1, seed=8, min_freq=3).itos == [PAD, UNK, "b", "a"]
    assert load_sst2(root, holdout=1, seed=8, min_freq=4).itos == [PAD, UNK]
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="min_freq"):
            load_sst2(root, holdout=1, min_freq=bad)


def test_literal_pad_and_unk_words_map_to_unk(tmp_path):
    rows = [("<pad> a <unk> ", 0), ("a <pad> ", 1), ("b ", 0)]
    d = load_sst2(write_sst(tmp_path, train=tsv(rows), dev=tsv([("<pad> a ", 1)])), holdout=1, seed=0)
    assert d.itos[:2] == [PAD, UNK] and d.itos.count(PAD) == 1 and d.itos.count(UNK) == 1
    for split in (d.train, d.valid, d.test):
        assert all(int(t.min()) >= 1 for t in split.tokens)  # index 0 only ever pads
    assert d.test.tokens[0].tolist() == [1, d.itos.index("a")]


def test_crlf_bom_and_quotes(tmp_path):
    text = tsv(TRAIN_ROWS)
    assert held_rows(5, 1, 8) == [3]  # the quoted row 2 stays in train
    lf = load_sst2(write_sst(tmp_path / "lf"), holdout=1, seed=8)
    crlf = load_sst2(write_sst(tmp_path / "crlf", train="\ufeff" + text.replace("\n", "\r\n")), holdout=1, seed=8)
    assert lf.itos == crlf.itos
    for a, b in zip(lf.train.tokens + lf.valid.tokens, crlf.train.tokens + crlf.valid.tokens):
        assert torch.equal(a, b)
    assert words(lf, lf.train.tokens[2]) == ["the", "cat", "and", '"quoted', "phrase"]
    # A tab inside the sentence: the row is split on its last tab.
    d = load_sst2(write_sst(tmp_path / "tab", train=HEADER + "a\tb\t1\nc d\t0\n"), holdout=1)
    assert sorted(len(t) for t in d.train.tokens + d.valid.tokens) == [2, 2]


def test_root_parent_and_nas_data(tmp_path, monkeypatch):
    write_sst(tmp_path / "data" / "sst-2")
    assert len(load_sst2(tmp_path / "data", holdout=1).train) == 4  # parent folder accepted
    assert len(load_sst2(str(tmp_path / "data" / "sst-2"), holdout=1).valid) == 1
    monkeypatch.setenv("NAS_DATA", str(tmp_path / "data"))
    assert len(load_sst2(holdout=2).train) == 3  # $NAS_DATA/sst-2


def test_missing_files_list_folders_and_how_to_fix(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        load_sst2(missing)
    msg = str(ei.value)
    assert str(missing) in msg and str(missing / "sst-2") in msg and "directory does not exist" in msg
    assert "NAS_DATA" in msg and "dataset.root" in msg and "GLUE" in msg and "no automatic download" in msg
    # A partial folder names the missing file.
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "train.tsv").write_text(tsv(TRAIN_ROWS), encoding="utf-8")
    with pytest.raises(DataError, match="missing dev.tsv"):
        load_sst2(tmp_path / "part")
    monkeypatch.setenv("NAS_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as ei:
        load_sst2()
    assert str(tmp_path / "env" / "sst-2") in str(ei.value)
    monkeypatch.delenv("NAS_DATA")
    with pytest.raises(DataError, match="NAS_DATA is not set"):
        load_sst2()


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    "train, pattern",
    [
        ("sentence\tlabels\nthe cat\t1\n", r"train.tsv:1: expected the header"),
        ("index\tsentence\n0\tthe cat\n", r"train.tsv:1: .*unlabelled test.tsv"),
        (HEADER + "the cat\t1\nno tab here 0\n", r"train.tsv:3: no tab"),
        (HEADER + "the cat\t1\n   \t0\n", r"train.tsv:3: empty sentence"),
        (HEADER + "the cat\t1\na\t0\nb\t2\n", r"train.tsv:4: label '2' is not an integer in \[0, 2\)"),
        (HEADER + "the cat\t1\nb\t-1\n", r"train.tsv:3: label '-1'"),
        (HEADER + "the cat\tpos\n", r"train.tsv:2: label 'pos'"),
        (HEADER + "the cat\t\n", r"train.tsv:2: label ''"),
        (HEADER + "the cat\t1\n\n", r"train.tsv:3: no tab"),
        (HEADER, r"train.tsv: the file has a header but 0 data rows"),
        ("", r"train.tsv: the file is empty"),
    ],
)
def test_malformed_train_names_file_and_line(tmp_path, train, pattern):
    with pytest.raises(DataError, match=pattern):
        load_sst2(write_sst(tmp_path, train=train), holdout=1)


def test_malformed_dev_named(tmp_path):
    with pytest.raises(DataError, match=r"dev.tsv:2: label '7'"):
        load_sst2(write_sst(tmp_path, dev=HEADER + "a\t7\n"), holdout=1)
    with pytest.raises(DataError, match=r"dev.tsv: the file has a header but 0 data rows"):
        load_sst2(write_sst(tmp_path, dev=HEADER), holdout=1)


def test_invalid_utf8_names_file_and_line(tmp_path):
    ok = load_sst2(write_sst(tmp_path / "ok", train=HEADER + "café ö\t1\nnaïve\t0\n"), holdout=1)
    assert set(ok.itos[2:]) <= {"café", "ö", "naïve"}
    bad = (HEADER + "fine\t1\nalso fine\t0\n").encode() + b"bad \xff\xfe row\t1\nlast\t0\n"
    root = write_sst(tmp_path / "bad", train=bad)
    with pytest.raises(DataError) as ei:
        load_sst2(root, holdout=1)
    msg = str(ei.value)
    assert str(root / "train.tsv") in msg and "line 4" in msg and "UTF-8" in msg


# ------------------------------------------------------------------ held-out split


def test_holdout_sizes_determinism_and_train_order(tmp_path):
    n = 200
    rows = many_rows(n)
    root = write_sst(tmp_path, train=tsv(rows))

    def ids(split, d):  # row number of each sentence
        return [int("".join(words(d, t))) for t in split.tokens]

    d = load_sst2(root, holdout=0.05, seed=0)
    assert (len(d.train), len(d.valid)) == (190, 10)
    tr, va = ids(d.train, d), ids(d.valid, d)
    assert sorted(tr + va) == list(range(n))  # a partition of the file
    assert tr == sorted(tr) and va == sorted(va)  # both keep file order
    assert d.train.labels.tolist() == [i % 2 for i in tr] and d.valid.labels.tolist() == [i % 2 for i in va]
    assert va == sorted(np.random.default_rng(0).permutation(n)[:10].tolist())  # documented recipe
    again = load_sst2(root, holdout=0.05, seed=0)
    assert ids(again.valid, again) == va and again.itos == d.itos
    other = load_sst2(root, holdout=0.05, seed=1)
    assert ids(other.valid, other) != va
    # Counts and rounding: int(round(fraction * n)), halves to even.
    assert len(load_sst2(root, holdout=17).valid) == 17
    assert len(load_sst2(root, holdout=0.0125).valid) == 2  # 2.5 -> 2
    assert len(load_sst2(root, holdout=0.0175).valid) == 4  # 3.5 -> 4
    assert len(load_sst2(root, holdout=np.int64(3)).valid) == 3


@pytest.mark.parametrize(
    "holdout, pattern",
    [
        (0, "count must be >= 1"),
        (-3, "count must be >= 1"),
        (0.0, r"fraction must be in \(0, 1\)"),
        (1.0, r"fraction must be in \(0, 1\)"),
        (1.5, r"fraction must be in \(0, 1\)"),
        (float("nan"), r"fraction must be in \(0, 1\)"),
        ("0.05", "fraction in"),
        (None, "fraction in"),
        (True, "fraction in"),
        (5, "leaves none to train on"),  # 5 rows in TRAIN_ROWS
        (0.05, "empty valid split"),  # round(0.25) = 0
    ],
)
def test_holdout_invalid(tmp_path, holdout, pattern):
    with pytest.raises(ConfigError, match=pattern) as ei:
        load_sst2(write_sst(tmp_path), holdout=holdout)
    assert isinstance(ei.value, ValueError)


# ------------------------------------------------------------------ batching


def make_split(lengths, labels=None) -> Sentences:
    # sentence i holds ids 2 + 100*i + j so that every id is distinct and never PAD (0)
    tokens = [torch.arange(n, dtype=torch.long) + 2 + 100 * i for i, n in enumerate(lengths)]
    labels = labels if labels is not None else [i % 2 for i in range(len(lengths))]
    return Sentences(tokens, torch.tensor(labels, dtype=torch.long))


def test_batches_in_order_padded_time_major():
    lengths = [3, 1, 5, 2, 4, 2, 1]
    split = make_split(lengths)
    batches = list(sentence_batches(split, 3, shuffle=False))
    assert [b.tokens.shape for b in batches] == [(5, 3), (4, 3), (1, 1)]  # last short batch kept
    seen = 0
    for b in batches:
        assert isinstance(b, SentenceBatch)
        assert b.tokens.dtype == b.lengths.dtype == b.labels.dtype == torch.long
        assert b.tokens.shape[0] == int(b.lengths.max())
        for col in range(b.tokens.shape[1]):
            i = seen + col
            n = int(b.lengths[col])
            assert n == lengths[i]
            assert torch.equal(b.tokens[:n, col], split.tokens[i])
            assert (b.tokens[n:, col] == 0).all()  # PAD below the sentence
            assert int(b.labels[col]) == i % 2
        seen += b.tokens.shape[1]
    assert seen == len(lengths)
    dropped = list(sentence_batches(split, 3, shuffle=False, drop_last=True))
    assert [b.tokens.shape[1] for b in dropped] == [3, 3]
    assert [b.tokens.shape[1] for b in sentence_batches(split, 7, shuffle=False, drop_last=True)] == [7]
    assert list(sentence_batches(split, 8, shuffle=False, drop_last=True)) == []
    b = next(sentence_batches(split, 2, shuffle=False, device="cpu"))
    assert b.tokens.device.type == b.lengths.device.type == b.labels.device.type == "cpu"


def test_shuffle_covers_every_sentence_once_and_reproducible():
    lengths = [1 + (i * 7) % 9 for i in range(23)]
    split = make_split(lengths, labels=[i % 3 for i in range(23)])

    def order(rng, **kw):
        out = []
        for b in sentence_batches(split, 4, shuffle=True, rng=rng, **kw):
            for col in range(b.tokens.shape[1]):
                i = (int(b.tokens[0, col]) - 2) // 100  # recover the sentence index
                assert int(b.lengths[col]) == lengths[i] and int(b.labels[col]) == i % 3
                assert torch.equal(b.tokens[: lengths[i], col], split.tokens[i])
                assert (b.tokens[lengths[i]:, col] == 0).all()
                out.append(i)
        return out

    o1 = order(np.random.default_rng(5))
    assert sorted(o1) == list(range(23)) and o1 != list(range(23))
    assert o1 == order(np.random.default_rng(5))
    assert o1 == np.random.default_rng(5).permutation(23).tolist()
    rng = np.random.default_rng(5)
    assert order(rng) != order(rng)  # a new order each epoch from the same generator
    o3 = order(np.random.default_rng(5), drop_last=True)
    assert o3 == o1[:20]
    with pytest.raises(ValueError, match="rng"):
        next(sentence_batches(split, 4, shuffle=True))
    with pytest.raises(ValueError, match="batch_size"):
        next(sentence_batches(split, 0, shuffle=False))


def test_check_batchable():
    split = make_split([1, 2, 3])
    check_batchable(split, 3, "train")
    with pytest.raises(DataError) as ei:
        check_batchable(split, 4, "valid")
    msg = str(ei.value)
    assert "valid" in msg and "3 sentence" in msg and "batch of 4" in msg and "smaller batch_size" in msg


def test_sentences_length_mismatch():
    with pytest.raises(ValueError):
        Sentences([torch.tensor([2])], torch.tensor([0, 1]))


# ------------------------------------------------------------------ real data

SST2_TRAIN_ROWS = 67_349
SST2_DEV_ROWS = 872


def _real_sst2_root() -> Path:
    root = os.environ.get("NAS_DATA")
    if not root or not os.path.isdir(os.path.join(root, "sst-2")):
        pytest.skip("needs $NAS_DATA/sst-2 (GLUE SST-2 train.tsv and dev.tsv)")
    return Path(root)


@pytest.fixture(scope="module")
def real_sst2():
    _real_sst2_root()
    return load_sst2()


def test_real_sst2_sizes_and_labels(real_sst2):
    d = real_sst2
    assert len(d.train) + len(d.valid) == SST2_TRAIN_ROWS
    # 3367.45 -> 3367 rows asked; whole sentences with their own phrases reach 3,369 (the row split: 3,367)
    assert int(round(0.05 * SST2_TRAIN_ROWS)) == 3_367 and len(d.valid) == 3_369
    assert len(d.test) == SST2_DEV_ROWS
    for split in (d.train, d.valid, d.test):
        assert set(split.labels.unique().tolist()) == {0, 1}  # labels in {0, 1}, both present
        assert min(len(t) for t in split.tokens) >= 1
    # Label counts of GLUE train (29,780 / 37,569) and dev (428 / 444), see sst-2/SOURCE.md.
    assert (torch.bincount(d.train.labels) + torch.bincount(d.valid.labels)).tolist() == [29_780, 37_569]
    assert torch.bincount(d.test.labels).tolist() == [428, 444]
    assert d.itos[:2] == [PAD, UNK] and d.ntoken == len(d.itos)
    assert max(len(t) for t in d.train.tokens + d.valid.tokens) == 52
