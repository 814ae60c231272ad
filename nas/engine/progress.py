"""Progress of a run: a tqdm bar on a terminal, log lines with ``progress=false``.

A run started with ``progress=false`` (a batch job whose output goes to a file, a comparison's subprocess) has no
bar, so :func:`run_progress` gives it a :class:`LogProgress` instead: the same calls as the bar (``update``,
``set_postfix``, ``reset``, ``close``), and an INFO line in the run's log, e.g.::

    search: 120/415 step (28.9%), 7,890 tok/s, step 120, loss 5.812, ETA 3m05s

at each tenth of the run and when ``every_seconds`` (60 s) have passed since the previous line, checked at each
step (so not while a step or an evaluation runs, e.g. while torch.compile compiles: it logs lines of its own).  The
rate is that of the interval since the previous line (the first one's includes the start-up and any compiling); the
ETA is the remaining units at the mean rate since the run's first step ended (evaluations included, start-up not),
so there is none on the first step's line.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Callable, Optional

from tqdm import tqdm

from nas import distributed
from nas.engine import common

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    """``3h02m``, ``3m05s``, ``42s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LogProgress:
    """A stand-in for a tqdm bar that logs a line instead of redrawing.

    Args:
        total: units of the whole run (tokens or steps).
        desc: the line's prefix (``search``, ``train``).
        unit: the unit's short name (``tok``, ``step``); the rate is per second of it.
        initial: units already done (a resumed run); the first line's rate counts from there.
        every_seconds: the longest wall time between two lines (s).
        clock: the time source (``time.monotonic``; a test passes its own).
        emit: where the line goes (the module logger's ``info``).
    """

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, emit: Optional[Callable[[str], None]] = None):
        if every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}")
        self.total, self.desc, self.unit, self.every = total, desc, unit, every_seconds
        self.clock, self.emit = clock, emit or log.info
        self.n = initial
        self.postfix: dict = {}
        self._start = None  # (time, units) at the end of the first step: the ETA's mean rate counts from there
        self._mark()

    def _mark(self) -> None:
        self._last_t, self._last_n = self.clock(), self.n
        self._next_tenth = (math.floor(10 * self.n / self.total) + 1) if self.total else 11

    def update(self, n: int = 1) -> None:
        self.n += n
        # the total is an estimate where steps have random lengths (train.py's bptt with limit_train_batches): a
        # run past it is at 100%, not beyond
        self.total = max(self.total, self.n)
        now = self.clock()
        if self._start is None:
            self._start = (now, self.n)
        tenth = self.total and self.n * 10 >= self._next_tenth * self.total
        if now - self._last_t >= self.every or tenth:
            self.emit(self.line(now))
            self._mark()

    def line(self, now: float) -> str:
        """The log line for the interval since the previous one, at time ``now``."""
        seconds, done = now - self._last_t, self.n - self._last_n
        rate = done / seconds if seconds > 0 else float("nan")
        parts = [f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / max(self.total, 1):.1f}%)",
                 f"{rate:,.0f} {self.unit}/s"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        (t0, n0) = self._start if self._start is not None else (now, self.n)
        if now > t0 and self.n > n0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) * (now - t0) / (self.n - n0))}")
        return ", ".join(parts)

    def set_postfix(self, ordered_dict: Optional[dict] = None, refresh: bool = True, **kwargs) -> None:
        """Figures for the next lines; unlike tqdm's, they are merged into the earlier ones (an epoch's
        ``valid_ppl`` stays on the lines beside the step's ``loss``)."""
        self.postfix.update({**(ordered_dict or {}), **kwargs})

    def reset(self, total: Optional[int] = None) -> None:
        """Back to 0 (a run going back to its checkpoint), as ``tqdm.reset``."""
        if total is not None:
            self.total = total
        self.n = 0
        self._start = None
        self._mark()

    def close(self) -> None:
        pass


_SILENCED = threading.local()


@contextlib.contextmanager
def silenced():
    """Within it, :func:`run_progress` gives runs without a bar no log lines either: a black-box search's trials
    (their search logs one line per trial; ten lines per trial would bury them)."""
    before = getattr(_SILENCED, "on", False)
    _SILENCED.on = True
    try:
        yield
    finally:
        _SILENCED.on = before


class _FollowingFreeCores:
    """A progress bar whose ``update`` (once per training step) also lets the run's thread count follow the free
    cores (:func:`nas.engine.common.recheck_free_cores`); everything else is the bar's."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1):
        self.bar.update(n)
        common.recheck_free_cores()

    def __getattr__(self, name):
        return getattr(self.bar, name)


def run_progress(cfg, total: int, desc: str, unit: str, initial: int = 0, **tqdm_kwargs):
    """The run's progress: a tqdm bar with ``cfg.progress``, else :class:`LogProgress` (on the writing rank only;
    other torchrun ranks get a disabled bar; within :func:`silenced`, nothing).  ``total``: units of the whole run;
    ``initial``: those already done.  Each ``update`` also re-checks the free cores of a ``num_threads: null`` run
    (:class:`nas.engine.common.FreeCoreWatch`)."""
    if cfg.progress or not distributed.is_writer() or getattr(_SILENCED, "on", False):
        return _FollowingFreeCores(tqdm(total=total, initial=initial, desc=desc, unit=unit,
                                        disable=not cfg.progress or not distributed.is_writer(), dynamic_ncols=True,
                                        **tqdm_kwargs))
    return _FollowingFreeCores(LogProgress(total, desc, unit, initial=initial))
