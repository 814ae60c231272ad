"""Paths in a run config that are relative to the launch directory, resolved once and saved resolved.

A run's ``config.yaml`` is what ``resume=<run dir>`` goes on with, from whatever directory the resume is launched.
A relative ``dataset.root`` kept there would be read from the *new* directory: a missing corpus at best, a
different one silently at worst (case r02).  So every launch-relative path is made absolute when a run starts,
before its config is saved:

* ``dataset.root``, ``dataset.cache_dir`` (``~`` expanded too);
* ``arch`` (``train.py``) when it is not a published genotype name (a genotype file or a search run dir);
* ``strategy.storage`` (``search.py``, random / bayesian): the file of a ``sqlite:///<file>`` URL and of a
  ``journal:<file>`` storage.  Other URLs (``postgresql://...``) name no local file and are kept; the default
  (null: ``study.db`` in the run dir) is the run dir's own and stays null.

``dataset.root`` null (found through ``$NAS_DATA``, itself perhaps relative, or the cache) is set to the folder
found (:func:`pin_data_folder`).

A run saved before this was done may hold relative paths: :func:`resolve_saved_paths` resolves them against the
directory that run was launched from, which Hydra recorded in ``<run dir>/.hydra/hydra.yaml``
(``hydra.runtime.cwd``), and refuses (ConfigError) when that record is missing.
"""
from __future__ import annotations

import os
from typing import Optional

from omegaconf import OmegaConf

from nas.errors import ConfigError

#: the config keys holding launch-relative file or folder paths (``strategy.storage`` holds one inside a URL)
PATH_KEYS = ("dataset.root", "dataset.cache_dir", "arch", "strategy.storage")


def launch_dir() -> str:
    """The directory the run was launched from: Hydra's ``runtime.cwd`` inside a Hydra app, else the cwd."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.cwd
    return os.getcwd()


def _file(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))


def resolve_storage(url: str, base: str) -> str:
    """``url`` with the file of a ``sqlite:///<file>`` or ``journal:<file>`` storage made absolute against
    ``base``; any other URL (``postgresql://...``, in-memory SQLite) unchanged.

    Raises:
        ConfigError: a ``sqlite`` URL SQLAlchemy cannot parse.
    """
    if url.startswith("journal:"):
        return "journal:" + _file(url[len("journal:"):], base)
    if not url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigError(f"strategy.storage={url!r} is not a database URL ({err})") from None
    db = parsed.database
    if not db or db == ":memory:" or db.startswith("file:") or os.path.isabs(db):
        return url
    return parsed.set(database=_file(db, base)).render_as_string(hide_password=False)


def _relative(cfg, key: str) -> Optional[str]:
    """The value of ``key`` when it holds a launch-relative path (None otherwise)."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if not isinstance(value, str) or not value:
        return None
    if key == "arch":
        from nas.published import published_names

        if value.strip().lower() in published_names():
            return None
        return value if not os.path.isabs(value.strip()) else None
    if key == "strategy.storage":
        return value if resolve_storage(value, "/") != value else None
    return value if not os.path.isabs(value) else None  # (``~/x`` too: expanded once, like the rest)


def relative_paths(cfg) -> dict:
    """``{key: value}`` of the :data:`PATH_KEYS` of ``cfg`` that hold a path relative to the launch directory (or
    starting with ``~``)."""
    return {key: value for key in PATH_KEYS if (value := _relative(cfg, key)) is not None}


def resolve_paths(cfg, base: Optional[str] = None) -> dict:
    """Make every launch-relative path of ``cfg`` (:data:`PATH_KEYS`) absolute against ``base`` (default:
    :func:`launch_dir`), in place.  Returns ``{key: (old, new)}`` of what changed.

    Raises:
        ConfigError: a ``sqlite`` storage URL that does not parse.
    """
    base = base or launch_dir()
    changed = {}
    for key, value in relative_paths(cfg).items():
        if key == "strategy.storage":
            new = resolve_storage(value, base)
        else:
            new = _file(value.strip() if key == "arch" else value, base)
            if key == "arch" and os.sep not in value.strip() and not os.path.exists(new):
                continue  # a bare name that is no file either (arch=darts_v3): kept as typed, for its "did you mean"
        OmegaConf.update(cfg, key, new, merge=False)
        changed[key] = (value, new)
    return changed


def recorded_launch_dir(run_dir: str) -> Optional[str]:
    """The launch directory Hydra recorded for the run in ``run_dir`` (``.hydra/hydra.yaml``,
    ``hydra.runtime.cwd``), or None when there is no such record."""
    path = os.path.join(run_dir, ".hydra", "hydra.yaml")
    if not os.path.isfile(path):
        return None
    try:
        cwd = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.cwd", default=None)
    except Exception:  # an unreadable record is no record
        return None
    return cwd if isinstance(cwd, str) and os.path.isabs(cwd) else None


def resolve_saved_paths(cfg, run_dir: str) -> dict:
    """For ``resume=``: resolve the launch-relative paths that an older run saved in its ``config.yaml`` against the
    directory it was launched from (:func:`recorded_launch_dir`), in place; returns what changed (see
    :func:`resolve_paths`).  A config saved by this version holds absolute paths only, and nothing changes.

    Raises:
        ConfigError: the config holds relative paths and the run's launch directory is not recorded, naming the
            keys and how to fix the config by hand.
    """
    relative = relative_paths(cfg)
    if not relative:
        return {}
    base = recorded_launch_dir(run_dir)
    if base is None:
        listed = ", ".join(f"{k}={v}" for k, v in relative.items())
        raise ConfigError(f"resume={run_dir}: its config.yaml holds paths relative to the directory the run was "
                          f"launched from ({listed}), which is not recorded (no .hydra/hydra.yaml); write them as "
                          "absolute paths into its config.yaml and resume again")
    return resolve_paths(cfg, base)


def pin_data_folder(cfg) -> Optional[str]:
    """For a fresh run with ``dataset.root`` null: set it to the folder the data is read from (``$NAS_DATA/<folder>``
    or the download cache, :func:`nas.data.find_data_folder`), absolute, so that a resume reads the same files even
    where ``$NAS_DATA`` is relative, or set otherwise, or unset.  Returns the folder set (None: nothing found yet,
    the run will download into the cache folder, and ``root`` stays null).
    """
    from nas.data import find_data_folder

    if "dataset" not in cfg or cfg.dataset.root is not None:
        return None
    folder = find_data_folder(cfg.dataset.name, None, cfg.dataset.cache_dir)
    if folder is not None:
        cfg.dataset.root = folder
    return folder
