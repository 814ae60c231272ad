"""Run plumbing shared by search and retraining: device, seeding, atomic checkpoints, output dirs."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import random
import sys
import time
from typing import Any, Optional

import numpy as np
import torch

from nas import distributed
from nas.atomic import atomic_write
from nas.errors import ConfigError
from nas.precision import check_matmul_dtype

log = logging.getLogger(__name__)


#: seconds over which :func:`busy_cores_of_others` samples /proc/stat (its resolution is 10 ms of CPU time)
BUSY_SAMPLE_SECONDS = 0.2


def machine_cpu_ticks() -> Optional[tuple]:
    """``(busy, total)``: the whole machine's CPU time since boot in clock ticks (``/proc/stat``'s first line; busy
    is all but idle and iowait, steal included); None where ``/proc/stat`` is not readable (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is counted in user already
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    """This process's CPU time (user + system, every thread), in seconds."""
    return sum(os.times()[:2])


def others_busy_cores(before: tuple, after: tuple, own_seconds: float, wall_seconds: float) -> Optional[float]:
    """Cores other processes kept busy between two :func:`machine_cpu_ticks` samples ``wall_seconds`` apart, during
    which this process used ``own_seconds`` of CPU: (machine busy - own) / wall, at least 0; None when no tick
    elapsed (nothing measured)."""
    if after[1] <= before[1] or wall_seconds <= 0:
        return None
    busy = (after[0] - before[0]) / os.sysconf("SC_CLK_TCK") - own_seconds
    return max(0.0, busy / wall_seconds)


def busy_cores_of_others(seconds: float = BUSY_SAMPLE_SECONDS) -> Optional[float]:
    """How many cores other processes keep busy: the machine's busy CPU time (``/proc/stat``: all but idle and
    iowait) over ``seconds`` of wall time, minus this process's own, in cores; None where ``/proc/stat`` is not
    readable (not Linux).  The caller sleeps through the interval, so its own share is about 0."""
    before, own0 = machine_cpu_ticks(), own_cpu_seconds()
    if before is None:
        return None
    time.sleep(seconds)
    after, own1 = machine_cpu_ticks(), own_cpu_seconds()
    return None if after is None else others_busy_cores(before, after, own1 - own0, seconds)


def free_core_threads(default: int, cpus: int, busy_others: Optional[float]) -> int:
    """The thread count for a run that finds ``busy_others`` cores of ``cpus`` taken by other processes: the free
    cores (a core counts when at least 3/4 of it is idle), at least 1 and at most ``default`` (torch's own count).
    ``busy_others`` None (unknown): ``default``."""
    if busy_others is None:
        return default
    free = int(cpus - busy_others + 0.25)
    return max(1, min(default, free))


class FreeCoreWatch:
    """Follows the free cores during a run whose thread count :func:`fit_threads_to_free_cores` chose: every
    ``every`` seconds of wall time (config ``threads_recheck_seconds``), :meth:`check` counts the cores other
    processes kept busy since the last check (:func:`others_busy_cores`: the machine's busy time minus this
    process's own, so its own spinning threads never count) and sets torch's thread count to the free cores
    (:func:`free_core_threads`), down when a neighbour started after the run, back up to ``default`` when it left.

    A compiled run (``compile=true``, :func:`compile_model`) keeps its count, with one warning per run when the free
    cores differ from it: Dynamo guards compiled code on the thread count ("GLOBAL_STATE changed: num_threads"), so
    each new count would compile the cell's step again (minutes on 2 cores).  Runs that must match bit for bit give
    ``num_threads=``: the count changes the floats.

    Args: ``default``: torch's own count (the most this sets); ``cpus``: the cores this process may use;
        ``clock``, ``ticks``, ``own``: time sources (tests pass their own).
    """

    def __init__(self, default: int, cpus: int, every: float = 30.0, clock=time.monotonic,
                 ticks=machine_cpu_ticks, own=own_cpu_seconds):
        self.default, self.cpus, self.every = default, cpus, every
        self.clock, self.ticks, self.own = clock, ticks, own
        self.compiled, self._told = False, False
        self._last = (self.clock(), self.ticks(), self.own())

    def restart(self, every: float) -> None:
        """A new run in this process (``configure_runtime``; a black-box search's trials): its own interval (0:
        never re-checked) and compile setting.  The measuring goes on across runs (this process's own CPU time is
        subtracted whatever it ran), so trials shorter than ``every`` are followed too."""
        self.every, self.compiled, self._told = every, False, False

    def check(self) -> Optional[int]:
        """Called at each step (cheap until ``every`` seconds passed): the new thread count when it changed it,
        else None."""
        if not self.every:
            return None
        now = self.clock()
        if now - self._last[0] < self.every:
            return None
        (t0, ticks0, own0), self._last = self._last, (now, self.ticks(), self.own())
        if ticks0 is None or self._last[1] is None:
            return None
        busy = others_busy_cores(ticks0, self._last[1], self._last[2] - own0, now - t0)
        threads, current = free_core_threads(self.default, self.cpus, busy), torch.get_num_threads()
        if busy is None or threads == current:
            return None
        if self.compiled:  # kept, but said (once per run): the run may be several times slower from here
            if not self._told:
                self._told = True
                log.warning("%.1f of %d cores were busy with other processes over the last %.0f s, but this compiled "
                            "run keeps its %d thread(s): a new count would compile the cell's step again. Give "
                            "num_threads=%d (at a resume too) to run on the free cores", busy, self.cpus, now - t0,
                            current, threads)
            return None
        torch.set_num_threads(threads)
        log.info("%.1f of %d cores were busy with other processes over the last %.0f s: running on %d thread(s) "
                 "now, not %d (give num_threads=N to fix the count)", busy, self.cpus, now - t0, threads, current)
        return threads


#: the watch of this process's ``num_threads: null`` CPU run (:func:`fit_threads_to_free_cores` starts it)
_WATCH: Optional[FreeCoreWatch] = None


def recheck_free_cores() -> Optional[int]:
    """Called by the training loops at each step (:func:`nas.engine.progress.run_progress`'s bar): the run's
    :class:`FreeCoreWatch` check, when there is one; the new thread count when it changed it."""
    return _WATCH.check() if _WATCH is not None else None


@functools.lru_cache(maxsize=None)  # decided once per process
def fit_threads_to_free_cores() -> Optional[int]:
    """For a run with ``num_threads: null`` and no ``OMP_NUM_THREADS`` in the environment: sample how many cores other
    processes keep busy (:func:`busy_cores_of_others`, 0.2 s) and run on the free ones only; decided once per process.
    Returns the thread count it set, or None where it left torch's default.

    Why (issue 21, item 4; experiments/README.md, "Sharing the cores"): OpenMP threads that outnumber the free cores
    wait on each other at every parallel region.  Beside one busy process on 2 cores, 2 spinning threads ran the default
    search step 3.5-10x slower than alone; 1 thread ran it as fast beside the busy process as alone.  A process that
    starts after the run is seen by the run's :class:`FreeCoreWatch` (started here for a single-process run on more
    than one thread), within ``threads_recheck_seconds``."""
    global _WATCH
    default = torch.get_num_threads()
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or default
    busy = busy_cores_of_others() if default > 1 else None
    threads = free_core_threads(default, cpus, busy)
    if busy is not None and distributed.size() == 1:
        _WATCH = FreeCoreWatch(default, cpus)
    if threads == default:
        return None
    torch.set_num_threads(threads)
    log.info("%.1f of %d cores are busy with other processes: running on %d thread(s), not %d (give num_threads=N "
             "to fix the count)", busy, cpus, threads, default)
    return threads


def device_summary(device: torch.device) -> str:
    """The device as the start-of-run log line gives it: a CPU with its thread count (which the floats depend on)."""
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})" if device.type == "cpu" else str(device)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the run."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: for an unparsable name, or ``cuda`` requested when CUDA is unavailable.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS (process-wide, once).

    By default glibc serves every allocation above 32 MiB (and, until its dynamic threshold adapts, above
    128 KiB) with a fresh ``mmap`` and unmaps it on free, so each training pass page-faults all its large
    tensors in again: at emsize 64 / batch 64 the logits of one PTB segment (2240 x 10000 fp32, 90 MB) cost
    more to fault in than to compute, and the decoder + cross-entropy pass takes 2.5x longer.  This sets
    ``M_MMAP_THRESHOLD`` to 1 GiB and ``M_TRIM_THRESHOLD`` to 2 GiB (C int arguments) with ``mallopt(3)``, the knobs PyTorch's
    CPU performance guide reaches through jemalloc/tcmalloc.  Peak memory is unchanged; memory freed after
    the peak is kept for reuse rather than returned.  Returns True when applied; a no-op off glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    _allocator_tuned = ok
    return ok


#: the ``dtype`` settings a run accepts
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def configure_runtime(cfg) -> torch.device:
    """Apply a run config's ``num_threads`` (null: torch's default, cut to the cores other processes leave free, see
    :func:`fit_threads_to_free_cores`), ``deterministic``, ``dtype`` and ``cpu_allocator`` settings; return its resolved
    device (under torchrun with CUDA: this rank's GPU, ``cuda:LOCAL_RANK``).

    Raises:
        ConfigError: for ``num_threads`` < 1, ``threads_recheck_seconds`` < 0, an unknown ``dtype`` or
            ``seq_len_sampler``, an unusable ``device`` (see :func:`resolve_device`), or a ``matmul_dtype`` unknown or
            without hardware products on the device.
    """
    from nas.data import SEQ_LEN_SAMPLERS

    if cfg.get("seq_len_sampler", "awd_lstm") not in SEQ_LEN_SAMPLERS:
        raise ConfigError(f"seq_len_sampler={cfg.seq_len_sampler!r}; valid: {', '.join(SEQ_LEN_SAMPLERS)}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ConfigError(f"num_threads must be >= 1 (or null: the cores other processes leave free, up to torch's "
                          f"default), got {cfg.num_threads}")
    recheck = float(cfg.get("threads_recheck_seconds", 30.0) or 0.0)
    if recheck < 0:
        raise ConfigError(f"threads_recheck_seconds must be >= 0 (0: the thread count is decided once, at the start), "
                          f"got {recheck:g}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.get("deterministic"):
        # cuBLAS needs a fixed workspace for reproducible results; it must be set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(cfg.get("deterministic")))  # per run: a test's setting never leaks
    dtype = cfg.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    torch.set_default_dtype(DTYPES[dtype])  # per run as well; models and α are built after this
    distributed.init()  # under torchrun (no-op otherwise; the CLI has joined the group already)
    device = distributed.device_for(resolve_device(cfg.device))
    check_matmul_dtype(cfg.get("matmul_dtype"), device)  # before the data loads
    auto = not cfg.num_threads and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ
    if auto:
        fit_threads_to_free_cores()  # num_threads: null on a CPU run: the free cores only (a refused run never waits)
    if _WATCH is not None:  # followed during the run; a run of this process with a count of its own: left alone
        _WATCH.restart(recheck if auto else 0.0)
    if device.type == "cpu" and cfg.tune_cpu_allocator and tune_cpu_allocator():
        log.debug("glibc allocator tuned: large blocks stay in the heap")
    return device


def check_data_parallel(cfg, data_parallel: bool, job: str) -> None:
    """Under torchrun, refuse (ConfigError) what does not run data parallel: a task without a data-parallel path
    (``data_parallel`` False: sentence classification), a ``batch_size`` the processes do not divide, attention
    dropout (its masks are drawn per shard, inside ``nn.MultiheadAttention``).  ``job`` names the run in the message.
    No-op without torchrun."""
    if distributed.launched() is None:
        return
    if not data_parallel:
        raise ConfigError(f"dataset={cfg.dataset.name}: data-parallel (torchrun) {job} covers the language-model "
                          "datasets (ptb, wikitext2); run this task as one process")
    distributed.check_divisible(cfg.batch_size, "batch_size")
    if cfg.space.get("dropouta", 0.0) > 0:
        raise ConfigError("space.dropouta > 0 under torchrun: attention dropout draws its masks inside "
                          "nn.MultiheadAttention, per shard; set space.dropouta=0 or run as one process")


def compile_model(model: torch.nn.Module, enabled: bool) -> None:
    """Compile the model's cell time step with ``torch.compile`` when ``enabled`` (config ``compile``).

    Raises:
        ConfigError: if the model's cell has no compilable step.
    """
    if not enabled:
        return
    cell = getattr(model, "cell", None)
    if not hasattr(cell, "compile_step"):
        raise ConfigError(f"compile=true, but {type(cell).__name__} has no compilable time step; set compile=false")
    if _WATCH is not None:  # a new thread count would compile the step again (FreeCoreWatch)
        _WATCH.compiled = True
    cell.compile_step()


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch (all devices); return a numpy Generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rng_state() -> dict:
    """All random states a run depends on (to store in a checkpoint)."""
    cuda = torch.cuda.is_available()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else None,
            # under torchrun each rank draws on its own GPU, the current device (the ranks' streams are equal)
            "cuda_current": torch.cuda.get_rng_state() if cuda and distributed.world() else None}


def set_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` returned (CUDA states only where CUDA is available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        if distributed.world() and state.get("cuda_current") is not None:
            torch.cuda.set_rng_state(state["cuda_current"].cpu())


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically: temporary file in the same folder, fsync, then ``os.replace``.

    A crash or a full disk leaves the previous file at ``path`` intact (the temporary file is removed).
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location: Optional[torch.device] = None) -> dict:
    """Load a checkpoint written by :func:`atomic_torch_save`.

    Raises:
        CheckpointError: naming the file, if it is missing, truncated or not a checkpoint.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state


def run_dir_from_hydra() -> str:
    """The current Hydra run's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def absolute_path(path: Optional[str]) -> Optional[str]:
    """Resolve a user-given path against the launch directory (Hydra-aware); None stays None."""
    if path is None:
        return None
    from hydra.utils import to_absolute_path

    return to_absolute_path(os.path.expanduser(path))
