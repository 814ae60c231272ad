"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def _default_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode a plain open() would (0666 & ~umask)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``.

    On any error (a full disk included) the temporary file is removed and a previous file at ``path`` is
    left intact.  The folder is created if needed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
