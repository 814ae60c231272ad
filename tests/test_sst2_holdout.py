"""Tests for SST-2's held-out split by whole sentences (nas.data.sentences.sentence_holdout, holdout_by).

GLUE's SST-2 train holds each sentence's labelled phrases as rows of their own; the held-out part must hold no
row that lies inside (or equals) a training row.  Expected values come from hand-derived tables (tiny file) and
from a brute-force substring check written here (real file), not from the grouping code.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from nas.data.sentences import (
    LEGACY_HOLDOUT_BY,
    load_sst2,
    read_labelled_tsv,
    sentence_holdout,
    sentence_spans,
)
from nas.errors import ConfigError
from nas.tasks.classification import prepare_sentence_data

HEADER = "sentence\tlabel\n"
# Row i, its label.  Sentences (rows inside no other row), by hand:
#   S0 "a b c d" (rows 0, 10) holds "b c" (1, 7), "c d" (5), "b" (11)
#   S1 "x y z"   (row 2)      holds "y" (3)
#   S2 "y w"     (row 4)      holds "y" (3), "w" (8)
#   S3 "q r"     (row 6)
#   S4 "c b"     (row 9)      holds "b" (11)   ("c b" is not inside "a b c d": the order of words counts)
ROWS = ["a b c d", "b c", "x y z", "y", "y w", "c d", "q r", "b c", "w", "c b", "a b c d", "b"]
LABELS = [1, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 1]
# Rows held out once the sentence is drawn and rows held out once both sentences are drawn.
OWN = {0: [0, 1, 5, 7, 10], 1: [2], 2: [4, 8], 3: [6], 4: [9]}
SHARED = {(1, 2): [3], (0, 4): [11]}


def write_sst(d: Path, rows=ROWS, labels=LABELS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.tsv").write_text(HEADER + "".join(f"{s} \t{y}\n" for s, y in zip(rows, labels)), encoding="utf-8")
    (d / "dev.tsv").write_text(HEADER + "a x \t1\nq w \t0\n", encoding="utf-8")
    return d


def words(rows):
    return [r.split() for r in rows]


def test_sentence_spans_by_hand():
    text, inside = sentence_spans(words(ROWS))
    # text ids in order of first appearance: a b c d 0, b c 1, x y z 2, y 3, y w 4, c d 5, q r 6, w 7, c b 8, b 9
    assert text.tolist() == [0, 1, 2, 3, 4, 5, 6, 1, 7, 8, 0, 9]
    assert [x.tolist() for x in inside] == [[0, 1, 5, 9], [2, 3], [3, 4, 7], [6], [8, 9]]
    # a word shared by two rows does not make one lie inside the other
    text, inside = sentence_spans(words(["p q", "q s", "q"]))
    assert [x.tolist() for x in inside] == [[0, 2], [1, 2]]
    # sentences come in order of first appearance, not by length
    text, inside = sentence_spans(words(["k", "m", "k l o"]))
    assert text.tolist() == [0, 1, 2] and [x.tolist() for x in inside] == [[1], [0, 2]]


@pytest.mark.parametrize(
    "seed, order, k, held",
    [
        # seed 0 draws S2, S4, S3, S0, S1
        (0, [2, 4, 3, 0, 1], 1, [4, 8]),  # S2 alone: "y" is still in S1
        (0, [2, 4, 3, 0, 1], 3, [4, 8, 9]),  # + S4: "b" is still in S0
        (0, [2, 4, 3, 0, 1], 4, [4, 6, 8, 9]),
        (0, [2, 4, 3, 0, 1], 5, [0, 1, 4, 5, 6, 7, 8, 9, 10, 11]),  # + S0: "b" too (S4 drawn); 10 rows
        # seed 3 draws S4, S2, S1, ...: "y" goes once S1 and S2 are both drawn
        (3, [4, 2, 1, 3, 0], 4, [2, 3, 4, 8, 9]),
        # seed 8 draws S3, S0, ...: "b" stays in train (S4 undrawn) though it lies inside held-out "a b c d"
        (8, [3, 0, 1, 2, 4], 2, [0, 1, 5, 6, 7, 10]),
    ],
)
def test_sentence_holdout_by_hand(seed, order, k, held):
    assert np.random.default_rng(seed).permutation(5).tolist() == order  # the documented draw
    got = sentence_holdout(words(ROWS), k, seed)
    assert np.flatnonzero(got).tolist() == held


def test_sentence_holdout_takes_everything_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="nothing is left to train on"):
        sentence_holdout(words(ROWS), 11, 0)  # seed 0: 10 rows after S0, then S1 takes the last 2
    with pytest.raises(ConfigError, match="holdout_by=row"):
        load_sst2(write_sst(tmp_path), holdout=11, seed=0)


def test_no_row_inside_another_is_the_row_split():
    rows = words([" ".join(f"{i:03d}") for i in range(200)])  # "0 4 2": same length, all different
    for seed in (0, 5):
        want = sorted(np.random.default_rng(seed).permutation(200)[:10].tolist())
        assert np.flatnonzero(sentence_holdout(rows, 10, seed)).tolist() == want


def test_load_sst2_holdout_by(tmp_path):
    root = write_sst(tmp_path)
    d = load_sst2(root, holdout=2, seed=8)  # sentence is the default
    valid = [" ".join(d.itos[int(i)] for i in t) for t in d.valid.tokens]
    # rows 0, 1, 5, 6, 7, 10; a, d, q, r are in no training row (x y z, y, y w, w, c b, b): unknown words
    assert valid == ["<unk> b c <unk>", "b c", "c <unk>", "<unk> <unk>", "b c", "<unk> b c <unk>"]
    assert d.valid.labels.tolist() == [LABELS[i] for i in [0, 1, 5, 6, 7, 10]]
    assert sorted(d.itos[2:]) == ["b", "c", "w", "x", "y", "z"]  # train part: x y z, y, y w, w, c b, b
    rows = load_sst2(root, holdout=2, seed=8, holdout_by="row")
    assert len(rows.valid) == 2 and len(rows.train) == 10
    with pytest.raises(ConfigError, match="holdout_by='rows'; valid: sentence, row"):
        load_sst2(root, holdout=2, holdout_by="rows")


def test_run_config_holdout_by(tmp_path):
    """conf/dataset/sst2.yaml asks for sentences; a config saved before dataset.holdout_by existed gets rows."""
    from hydra import compose, initialize_config_dir

    import nas.config  # noqa: F401  (stores the config schemas)
    import nas.engine.search  # noqa: F401

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        assert compose("train", overrides=["dataset=sst2"]).dataset.holdout_by == "sentence"
    assert LEGACY_HOLDOUT_BY == "row"
    root = write_sst(tmp_path)

    def valid_labels(holdout_by):
        cfg = OmegaConf.create({"batch_size": 1, "dataset": {"name": "sst2", "root": str(root), "holdout": 2,
                                                             "split_seed": 8, "min_freq": 1,
                                                             "holdout_by": holdout_by}})
        return prepare_sentence_data(cfg).valid.labels.tolist()

    assert valid_labels("sentence") == [LABELS[i] for i in [0, 1, 5, 6, 7, 10]]
    by_rows = sorted(np.random.default_rng(8).permutation(len(ROWS))[:2].tolist())
    assert valid_labels(None) == valid_labels("row") == [LABELS[i] for i in by_rows]


# ------------------------------------------------------------------ real data


def inside_any(needles: list[list[str]], hay: list[list[str]]) -> list[str]:
    """The needles whose words are a contiguous run of some hay row's words (brute force: a padded substring
    search among the hay rows that hold the needle's rarest word)."""
    rows_with = defaultdict(list)
    for j, r in enumerate(hay):
        for w in set(r):
            rows_with[w].append(j)
    padded = [" " + " ".join(r) + " " for r in hay]
    found = []
    for x in needles:
        cands = min((rows_with.get(w, []) for w in set(x)), key=len)
        p = " " + " ".join(x) + " "
        if any(p in padded[j] for j in cands):
            found.append(p.strip())
    return found


@pytest.mark.slow
def test_real_sst2_held_out_rows_lie_inside_no_training_row():
    root = os.environ.get("NAS_DATA")
    if not root or not os.path.isdir(os.path.join(root, "sst-2")):
        pytest.skip("needs $NAS_DATA/sst-2 (GLUE SST-2 train.tsv)")
    rows, _ = read_labelled_tsv(os.path.join(root, "sst-2", "train.tsv"), 2)
    n, k = len(rows), 3_367  # 5% of 67,349
    new = sentence_holdout(rows, k, 0)
    assert k <= new.sum() <= k + 100
    held, train = [r for r, v in zip(rows, new) if v], [r for r, v in zip(rows, new) if not v]
    assert inside_any(held, train) == []
    # the check can fail: the random row split holds out thousands of phrases of training rows
    old = np.zeros(n, dtype=bool)
    old[np.random.default_rng(0).permutation(n)[:k]] = True
    leaked = inside_any([r for r, v in zip(rows, old) if v], [r for r, v in zip(rows, old) if not v])
    assert len(leaked) > 2_000
