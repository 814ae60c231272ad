"""One owner per run dir: an OS-level lock held by the process that runs there, for its whole life.

Two processes started in one run dir (the same ``hydra.run.dir``, two ``resume=`` of one run, a resume while the
run still goes on) would otherwise both run and interleave their logs, checkpoints, ``trials.jsonl`` and
TensorBoard files.  The owner holds an exclusive ``flock`` on ``<run dir>/.lock`` (through the ``filelock``
library); the kernel drops it when the process ends, however it ends, so a run killed with SIGKILL can be
resumed at once.  A process that finds the lock taken is refused with :class:`RunDirBusy` before it writes
anything into the dir (it only opens the lock file, which the owner made).  The owner writes who it is (pid,
host, command, start time) into the lock file, for the refusal message.

Locks are counted per process: the command-line entry points take the run dir before Hydra writes into it
(:func:`nas.cli.prepare_argv`) and keep it until they exit; :func:`nas.engine.resume.open_run` takes it again
inside the engine (for library callers, black-box trials' own dirs and Hydra's multirun jobs), and the engine
entry points wrapped in :func:`run_dir_scope` give back what they took when they return.
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from filelock import FileLock, Timeout

from nas.errors import ConfigError

#: the lock file inside a run dir (it stays after the run: an unlocked file is a free dir)
LOCK_FILE = ".lock"

_held: dict = {}  # real path of the run dir -> [FileLock, count]
_scopes: list = []  # one list of taken dirs per open run_dir_scope


class RunDirBusy(ConfigError):
    """The run dir is owned by another live process."""


def owner_of(run_dir: str) -> Optional[str]:
    """What the lock file of ``run_dir`` says about its owner ("pid 123 on host: python search.py ... since ..."),
    or None when there is no such note (no lock file yet, or an empty one)."""
    try:
        with open(os.path.join(run_dir, LOCK_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def own_run_dir(run_dir: str, what: str = "run dir") -> None:
    """Take ``run_dir`` for this process (creating the dir if needed), or count one more use if it holds it.

    Raises:
        RunDirBusy: another live process holds it; the message names the dir and, when it left a note, that
        process (pid, host, command, start time).
    """
    key = os.path.realpath(run_dir)
    if key in _held:
        _held[key][1] += 1
    else:
        os.makedirs(key, exist_ok=True)
        lock = FileLock(os.path.join(key, LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            who = owner_of(key)
            raise RunDirBusy(f"{what} {run_dir} is in use by another process"
                             f"{f' ({who})' if who else ''}; one run dir has one owner at a time: wait until it "
                             "ends, or choose another hydra.run.dir") from None
        _held[key] = [lock, 1]
        note = (f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)} "
                f"(since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        with open(os.path.join(key, LOCK_FILE), "w", encoding="utf-8") as f:
            f.write(note)
    if _scopes:
        _scopes[-1].append(key)


def release_run_dir(run_dir: str) -> None:
    """Count one use of ``run_dir`` less; the lock is given back when none is left (no-op if not held)."""
    key = os.path.realpath(run_dir)
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _held[key]
        entry[0].release(force=True)


def holds(run_dir: str) -> bool:
    """Whether this process owns ``run_dir``."""
    return os.path.realpath(run_dir) in _held


@contextmanager
def run_dir_scope() -> Iterator[None]:
    """Give back, on exit, the run dirs taken by :func:`own_run_dir` inside the block (its own uses only: a dir the
    caller held before stays held)."""
    _scopes.append([])
    try:
        yield
    finally:
        for key in reversed(_scopes.pop()):
            release_run_dir(key)


def scoped(fn):
    """Decorator: run ``fn`` inside :func:`run_dir_scope` (for the engine entry points)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with run_dir_scope():
            return fn(*args, **kwargs)

    return wrapper
