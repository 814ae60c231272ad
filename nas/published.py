"""Named genotypes from the literature, stored as data in ``nas/genotypes/<name>.json``, and ``arch=`` lookup.

Each file is an ordinary genotype JSON (see :mod:`nas.genotype`) with two extra keys, ``name`` and
``source`` (paper / code it was transcribed from).  Adding a published cell is adding one file.

``resolve_arch`` is what ``train.py arch=...`` calls: a published name (``darts_v1``, ``darts_v2``,
``enas``), a genotype file written by ``search.py``, or a search run directory holding ``genotype.json``.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

from nas.genotype import Genotype, GenotypeError

#: folder of the published genotype files (installed as package data)
PUBLISHED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "genotypes")


def published_names() -> List[str]:
    """Names of the stored published genotypes, sorted (file names without ``.json``)."""
    return sorted(f[:-5] for f in os.listdir(PUBLISHED_DIR) if f.endswith(".json") and not f.startswith("."))


def published_source(name: str) -> str:
    """The ``source`` line (citation) of a published genotype. Raises GenotypeError for an unknown name."""
    path = _published_path(name)
    with open(path, encoding="utf-8") as f:
        return str(json.load(f).get("source", ""))


def load_published(name: str) -> Genotype:
    """The published genotype ``name`` (case-insensitive: ``DARTS_V2`` == ``darts_v2``).

    Raises:
        GenotypeError: listing the valid names if ``name`` is unknown (or if the stored file is broken).
    """
    return Genotype.load(_published_path(name))


def _published_path(name: str) -> str:
    key = name.strip().lower()
    if key not in published_names():
        raise GenotypeError(f"unknown published genotype {name!r}; valid names: {', '.join(published_names())}")
    return os.path.join(PUBLISHED_DIR, key + ".json")


def resolve_arch(arch: str, base_dir: Optional[str] = None) -> Tuple[Genotype, str]:
    """Turn an ``arch=`` value into a genotype.

    Args:
        arch: a published name (see :func:`published_names`), a path to a genotype JSON file, or a path to
            a search run directory containing ``genotype.json``.  Relative paths are taken from
            ``base_dir`` (the launch directory; default: the current directory).
    Returns:
        ``(genotype, description)``: the description says where it came from (name + source, or the file).
    Raises:
        GenotypeError: empty value; unknown name and no such file (the message lists the valid names);
            a file that is unreadable, not JSON or not a valid genotype (the message names the file and
            the problem).
    """
    if not isinstance(arch, str) or not arch.strip():
        raise GenotypeError(_usage("arch is empty"))
    arch = arch.strip()
    names = published_names()
    if arch.lower() in names:
        return load_published(arch), f"{arch.lower()} ({published_source(arch)})"
    path = os.path.expanduser(arch)
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    if os.path.isdir(path):
        inner = os.path.join(path, "genotype.json")
        if not os.path.isfile(inner):
            raise GenotypeError(f"arch={arch!r} is a directory without genotype.json ({path}); give the file "
                                "itself (e.g. a search run's genotype.json or genotypes/epoch_NNN.json)")
        path = inner
    if not os.path.exists(path):
        import difflib

        close = difflib.get_close_matches(arch.lower(), names, n=1) if os.sep not in arch else []
        hint = f"; did you mean arch={close[0]}?" if close else ""
        if os.sep in arch or arch.lower().endswith(".json"):  # meant as a file
            raise GenotypeError(_usage(f"arch={arch!r}: no such file or directory ({path})"))
        raise GenotypeError(_usage(f"arch={arch!r} is neither a published genotype nor an existing file ({path})"
                                   f"{hint}"))
    return Genotype.load(path), path


def _usage(problem: str) -> str:
    return (f"{problem}{'' if problem.endswith('?') else '.'} Use arch=<name> with a published genotype ({', '.join(published_names())}) or "
            "arch=<path/to/genotype.json, or a search run dir> written by search.py")
