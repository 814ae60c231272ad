"""Resumable runs: the resume checkpoint, ``resume=<run dir>``, stop signals, the non-finite policy, run dirs.

Every search and retraining run keeps one resume checkpoint, ``checkpoint.pt`` in its run dir, holding all it
needs to go on as if nothing had happened: weights, α, both optimizers' states (ASGD's averages included), the
epoch, step and data position (next BPTT row and the data sampler's state), the hidden states carried across
segments, every random state (python, numpy, torch, CUDA), the run's counters and history.  TensorBoard events
reach their file with the checkpoint that covers them (:class:`nas.engine.tb.CommittedWriter`).  The checkpoint is
written every ``checkpoint_every`` steps and at each epoch end, atomically (temporary file, fsync, rename); the one it
replaces is kept as ``checkpoint.prev.pt``.  Nothing non-finite is ever written.

* ``resume=<run dir>`` continues that run in its own dir, with the config it was started with
  (``config.yaml``); only the :data:`RUNTIME_KEYS` may be given anew.
* SIGINT / SIGTERM: the current step finishes, a checkpoint is written, and the run exits (status 128 + signal)
  with the command that resumes it.  A second SIGINT stops at once (the last checkpoint stays).
* A NaN/inf loss or gradient: ``nan_policy=stop`` (default) ends with a clear error, keeping the last good
  checkpoint; ``rollback`` reloads it, halves the learning rate and goes on (logged; at most
  ``MAX_ROLLBACKS`` times in a run); ``reload_best`` (language-model retraining only, what DARTS ``rnn/train.py``
  does) reloads the best-validation checkpoint ``best.pt`` with its optimizer state and goes on at the same
  learning rate from the epoch after the best one (at most ``MAX_ROLLBACKS`` times without a new best).
* A run dir already holding a run is refused unless resumed: results of two runs are never mixed.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from omegaconf import OmegaConf

from nas import distributed
from nas.atomic import atomic_write
from nas.engine.common import CheckpointError, load_checkpoint, rng_state, set_rng_state
from nas.errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
NAN_POLICIES = ("stop", "rollback", "reload_best")
#: ``nan_policy=rollback`` gives up after this many rollbacks in one run (the lr is then 1/256 of its value);
#: ``nan_policy=reload_best`` after this many reloads of the same best checkpoint (no new best in between)
MAX_ROLLBACKS = 8
#: settings ``resume=`` accepts anew (they change neither what is computed on CPU nor the results' meaning;
#: ``nan_policy=rollback`` lets a run stopped by a NaN go on at a lower learning rate)
RUNTIME_KEYS = ("num_threads", "threads_recheck_seconds", "progress", "device", "nan_policy", "checkpoint_every")
_CHECKPOINT_VERSION = 1


class Interrupted(Exception):  # noqa: N818 (it is not an error: the run stopped on request)
    """The run stopped on SIGINT/SIGTERM after writing a checkpoint; ``exit_code`` = 128 + the signal number."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class RollbackLimit(NonFiniteLossError):
    """``nan_policy=rollback`` rolled back ``MAX_ROLLBACKS`` times (``reload_best``: reloaded the same best
    checkpoint ``MAX_ROLLBACKS`` times) and the loss is still not finite."""


# -- stop signals --------------------------------------------------------------------------------------------
_stop = {"signal": None, "depth": 0, "previous": {}}


def _on_signal(signum, frame):
    if _stop["signal"] is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint stays)
    _stop["signal"] = signum
    log.warning("%s received: the run stops at the end of the current step, with a checkpoint (Ctrl-C again to "
                "stop at once)",
                signal.Signals(signum).name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set a flag (see :func:`stop_requested`); nested blocks share it.

    Handlers can only be installed from the main thread; elsewhere the block is a no-op.
    """
    import threading

    main = threading.current_thread() is threading.main_thread()
    if main and _stop["depth"] == 0:
        _stop["signal"] = None
        for s in (signal.SIGINT, signal.SIGTERM):
            _stop["previous"][s] = signal.signal(s, _on_signal)
    _stop["depth"] += 1
    try:
        yield
    finally:
        _stop["depth"] -= 1
        if main and _stop["depth"] == 0:
            for s, handler in _stop["previous"].items():
                signal.signal(s, handler)
            _stop["previous"].clear()


def stop_requested() -> Optional[int]:
    """The signal number of a pending stop request, or None."""
    return _stop["signal"]


def interrupted(run_dir: str, script: str, where: str, saved: Optional[str] = None) -> Interrupted:
    """The :class:`Interrupted` to raise once the state of ``run_dir`` is saved (``saved`` says what was;
    default: its checkpoint)."""
    signum = _stop["signal"] or signal.SIGINT
    name = signal.Signals(signum).name
    saved = saved or f"checkpoint {os.path.join(run_dir, CHECKPOINT)} written"
    from nas.engine import common

    threads = ""
    if common._WATCH is not None and common._WATCH.every:  # a count chosen from the free cores (num_threads: null)
        n = torch.get_num_threads()
        threads = (f" (it ran on {n} CPU thread(s), chosen from the free cores: add num_threads={n} for a "
                   "continuation bit-identical to an uninterrupted run)")
    return Interrupted(f"{name}: stopped {where}; {saved}. Resume with: python {script} resume={run_dir}{threads}",
                       128 + int(signum))


# -- checkpoint files ------------------------------------------------------------------------------------------
def all_finite(*modules_or_tensors) -> bool:
    """True when every parameter of the given modules (or the given tensors) is finite."""
    for m in modules_or_tensors:
        if m is None:
            continue
        tensors = m.parameters() if isinstance(m, torch.nn.Module) else [m]
        for t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
    return True


def save_resume_checkpoint(run_dir: str, state: dict) -> str:
    """Write ``state`` as the run's ``checkpoint.pt`` atomically, keeping the one it replaces as
    ``checkpoint.prev.pt``.  Returns the path.

    Raises:
        CheckpointError: the file could not be written (e.g. a full disk); the previous checkpoint is intact.
    """
    path, prev = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS)
    state = {"version": _CHECKPOINT_VERSION, **state}

    def write(f):
        torch.save(state, f)

    try:
        if os.path.isfile(path):
            # a hard link keeps the current checkpoint reachable as `prev` while `path` is replaced
            if os.path.lexists(prev):
                os.remove(prev)
            try:
                os.link(path, prev)
            except OSError:  # a filesystem without hard links: keep no previous copy
                pass
        atomic_write(path, write)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path} ({err}); the previous checkpoint is intact "
                              f"(free space and resume with resume={run_dir})") from None
    return path


def load_resume_checkpoint(run_dir: str, kind: str, device: Optional[torch.device] = None) -> dict:
    """Load the resume checkpoint of ``run_dir`` and check it was written by a run of ``kind``.

    Raises:
        CheckpointError: none there, corrupt or truncated (the error names the intact previous one, if any),
        or written by another kind of run.
    """
    path, prev = os.path.join(run_dir, CHECKPOINT), os.path.join(run_dir, PREVIOUS)
    try:
        ckpt = load_checkpoint(path, map_location=device or torch.device("cpu"))
    except CheckpointError as err:
        hint = f"; remove {path} to start this run over in its dir"
        if os.path.isfile(prev):
            try:
                older = load_checkpoint(prev, map_location=torch.device("cpu"))
                hint = (f"; the previous checkpoint {prev} (step {older.get('state', {}).get('step', '?')}) is "
                        f"intact: `mv {prev} {path}` to resume from it")
            except CheckpointError:
                pass
        raise CheckpointError(f"cannot resume {run_dir}: {err}{hint}") from None
    if ckpt.get("kind") != kind or ckpt.get("version") != _CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a resume checkpoint of a {kind} run (kind {ckpt.get('kind')!r}, "
                              f"version {ckpt.get('version')!r})")
    return ckpt


def load_into(what: str, path: str, target, state) -> None:
    """``target.load_state_dict(state)``, turning a mismatch into a CheckpointError that names ``what``."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the {what} in the checkpoint do not fit this run ({err})") from None


# -- run dirs and configs ---------------------------------------------------------------------------------------
def run_dir_status(run_dir: str) -> Optional[str]:
    """``finished`` (metrics.json), ``unfinished`` (a checkpoint or trials record without metrics), or None."""
    if os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return "finished"
    if any(os.path.isfile(os.path.join(run_dir, f)) for f in (CHECKPOINT, "trials.jsonl")):
        return "unfinished"
    return None


def check_fresh_run_dir(run_dir: str, script: str) -> None:
    """Refuse to start a new run in a dir that already holds one (results are never mixed).

    Raises:
        ConfigError: naming the dir, what it holds, and what to do instead.
    """
    status = run_dir_status(run_dir)
    if status == "finished":
        raise ConfigError(f"run dir {run_dir} already holds a finished run (metrics.json); choose another "
                          "hydra.run.dir (a new run never overwrites an old one)")
    if status == "unfinished":
        raise ConfigError(f"run dir {run_dir} already holds an unfinished run; continue it with "
                          f"`python {script} resume={run_dir}` or choose another hydra.run.dir")


def check_resumable(run_dir: str, given: str, script: str) -> None:
    """Refuse ``resume=<given>`` (``run_dir``: its absolute path) unless it is an unfinished run of ``script``: the
    checks that read nothing but the dir, so the command line makes them before it takes the dir.

    Raises:
        ConfigError: no such dir, no ``config.yaml`` in it, a finished run, or a run of the other script (naming it).
    """
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir):
        raise ConfigError(f"resume={given}: no such run dir")
    if not os.path.isfile(path):
        raise ConfigError(f"resume={given}: {path} is missing, so this is not a run dir of search.py/train.py")
    if run_dir_status(run_dir) == "finished":
        raise ConfigError(f"resume={given}: that run has finished (metrics.json); nothing to resume")
    try:
        keys = OmegaConf.load(path).keys()
    except Exception:  # noqa: BLE001 (an unreadable config: resume_config reports it with the schema's error)
        return
    for key, owner in (("arch", "train.py"), ("strategy", "search.py")):
        if key in keys and owner != script:
            raise ConfigError(f"resume={given} is a run of {owner}: resume it with `python {owner} resume={given}`")


def resume_config(cfg, schema, given=RUNTIME_KEYS):
    """The config to resume ``cfg.resume`` with: that run's ``config.yaml`` (checked against ``schema``), with
    the :data:`RUNTIME_KEYS` in ``given`` and ``resume`` taken from ``cfg`` (the command line passes only the
    ones it sets: the others keep their saved values, so a resumed CPU run keeps its thread count and stays
    bit-identical).  Returns ``(config, run_dir)``.

    Raises:
        ConfigError: no such run dir, no config in it, or a config that does not fit the schema; the run there
        has already finished; or its config holds launch-relative paths (saved by an older version) and its launch
        directory is not recorded (:func:`nas.engine.paths.resolve_saved_paths`).
    """
    from omegaconf.errors import OmegaConfBaseException

    from nas.engine.common import absolute_path
    from nas.engine.paths import resolve_saved_paths

    run_dir = absolute_path(cfg.resume)
    path = os.path.join(run_dir, "config.yaml")
    check_resumable(run_dir, cfg.resume, "train.py" if "arch" in OmegaConf.structured(schema).keys() else "search.py")
    try:
        saved = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise ConfigError(f"resume={cfg.resume}: {path} is not a valid run config ({err})") from None
    resolve_saved_paths(saved, run_dir)  # a run saved before paths were resolved at its start (r02)
    for key in given:
        saved[key] = cfg[key]
    saved.resume = run_dir
    return saved, run_dir


def check_nan_policy(cfg, script: str = "train.py") -> None:
    """Raises ConfigError: an unknown ``nan_policy``, ``reload_best`` outside ``train.py`` (a search keeps no
    best checkpoint to go back to), or a negative ``checkpoint_every``."""
    valid = NAN_POLICIES if script == "train.py" else tuple(p for p in NAN_POLICIES if p != "reload_best")
    if cfg.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"nan_policy={cfg.nan_policy!r}; valid for {script}: {', '.join(valid)}")
    if cfg.nan_policy == "reload_best" and script != "train.py":
        raise ConfigError(f"nan_policy=reload_best goes back to retraining's best.pt (DARTS rnn/train.py); {script} "
                          "keeps no best checkpoint: use nan_policy=stop or rollback")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: at epoch ends only), got {cfg.checkpoint_every}")


def open_run(cfg, run_dir: Optional[str], schema, script: str, continue_same: bool = False):
    """Start or resume a run: ``(config, run dir, checkpoint or None)``.

    A fresh run (``resume`` unset) gets ``run_dir`` (default: Hydra's), refused if it already holds a run
    (:func:`check_fresh_run_dir`), and its resolved ``config.yaml``, where every path relative to the launch
    directory is made absolute first (:func:`nas.engine.paths.resolve_paths`: data root, cache dir, genotype file,
    storage file), so that a resume launched from anywhere reads the same files.  ``resume=<dir>`` returns that run's own
    config (:func:`resume_config`); the caller restores the checkpoint (a run killed before its first
    checkpoint starts over in its dir).  ``continue_same``: a run dir holding an unfinished run started with this
    very config is continued rather than refused (a worker of a shared study requeued by its scheduler with the
    same command, e.g. Hydra's submitit launcher after a preemption).  Either way this process takes the run dir
    (:func:`nas.engine.rundir.own_run_dir`); the engine entry points give it back when they return.

    Raises:
        ConfigError: the dir holds another run, or (:class:`~nas.engine.rundir.RunDirBusy`) another live process
        owns it; or :func:`resume_config`'s errors.
    """
    from nas.atomic import atomic_write_text
    from nas.engine.common import run_dir_from_hydra
    from nas.engine.paths import pin_data_folder, resolve_paths
    from nas.engine.rundir import own_run_dir

    from nas.config import check_ranges

    if cfg.get("resume"):
        cfg, run_dir = resume_config(cfg, schema)
        check_nan_policy(cfg, script)
        if distributed.is_writer():
            own_run_dir(run_dir, f"resume={cfg.resume}: the run dir")
        return cfg, run_dir, os.path.isfile(os.path.join(run_dir, CHECKPOINT))
    check_nan_policy(cfg, script)
    check_ranges(cfg)  # before anything is written: a refused run leaves nothing
    if "diagnostics" in cfg:  # search.py
        from nas.diagnostics import check_diagnostics

        check_diagnostics(cfg)
    resolve_paths(cfg)  # r02: a resume from another directory must read the very same files
    pin_data_folder(cfg)  # (and dataset.root=null: the folder $NAS_DATA or the cache gave)
    run_dir = os.path.abspath(run_dir or run_dir_from_hydra())
    if not distributed.is_writer():  # torchrun: rank 0 checks and writes the run dir
        return cfg, run_dir, False
    if continue_same and run_dir_status(run_dir) == "unfinished" and _same_config(run_dir, cfg):
        own_run_dir(run_dir)
        log.info("%s holds an unfinished run of this same config: continuing it", run_dir)
        return cfg, run_dir, True
    check_fresh_run_dir(run_dir, script)  # before taking the dir: a refused run creates nothing
    own_run_dir(run_dir)
    check_fresh_run_dir(run_dir, script)  # (a run that ended between the check and the lock)
    atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
    return cfg, run_dir, False


def _same_config(run_dir: str, cfg) -> bool:
    """Whether ``run_dir/config.yaml`` is ``cfg`` (resolved), apart from the runtime keys."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return False
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in RUNTIME_KEYS:
        saved.pop(key, None), now.pop(key, None)
    return saved == now


class Clock:
    """Wall seconds of a run across resumes: ``now()`` = seconds before the resume + seconds since."""

    def __init__(self, before: float = 0.0):
        self._t0, self.before = time.time(), before

    def now(self) -> float:
        return self.before + time.time() - self._t0


class Keeper:
    """The resume checkpoint of one run: periodic and epoch-end saves, stop requests, resume and rollback.

    ``snapshot()`` returns the engine's part of a checkpoint (weights, optimizers, data position...);
    ``restore(ckpt)`` puts it back.  ``state`` is the run's counter dict (``step`` required); ``lr_scale`` and
    ``rollbacks`` are kept in it for ``nan_policy=rollback``.  ``reload_best``: set by the language-model
    retraining loop for ``nan_policy=reload_best``, a callable that puts the best checkpoint back (weights,
    optimizer, loop position) and returns the epoch the run goes on with.
    """

    def __init__(self, cfg, run_dir: str, kind: str, script: str, state: dict, snapshot, restore,
                 device: Optional[torch.device] = None, modules=()):
        self.cfg, self.run_dir, self.kind, self.script = cfg, run_dir, kind, script
        self.state, self.snapshot, self.restore, self.device = state, snapshot, restore, device
        self.modules = modules
        state.setdefault("lr_scale", 1.0)
        state.setdefault("rollbacks", 0)
        state.setdefault("elapsed", 0.0)
        self.clock = Clock()
        self.last_saved_step = None
        self.reload_best = None
        self.writer = None  # the run's TensorBoard writer (start_run sets it): committed with each checkpoint

    def save(self) -> None:
        """Write the checkpoint now (nothing non-finite: raises NonFiniteLossError instead)."""
        if not all_finite(*self.modules):
            raise NonFiniteLossError(f"step {self.state['step']}: the weights became non-finite")
        self.state["elapsed"] = self.clock.now()
        payload = self.snapshot()  # under torchrun a collective (the global batch's hidden states)
        if distributed.is_writer():  # the ranks hold the same state: rank 0 writes it
            payload.update({"kind": self.kind, "config": OmegaConf.to_container(self.cfg, resolve=True),
                            "state": self.state, "rng": rng_state(), "threads": torch.get_num_threads()})
            save_resume_checkpoint(self.run_dir, payload)
        self.last_saved_step = self.state["step"]
        if self.writer is not None:  # the events up to this checkpoint, never further (nas.engine.tb.CommittedWriter)
            self.writer.commit()

    def step_done(self, where: str = "") -> None:
        """After each step: checkpoint every ``checkpoint_every`` steps; on a stop request, checkpoint and raise
        :class:`Interrupted`."""
        every = self.cfg.checkpoint_every
        if every and self.state["step"] % every == 0:
            self.save()
        self.check_stop(where or f"after step {self.state['step']}")

    def check_stop(self, where: str) -> None:
        """On a stop request (under torchrun: one on any rank, so all stop at the same step), checkpoint and raise
        :class:`Interrupted`."""
        signum = distributed.any_rank(stop_requested())
        if signum is not None:
            _stop["signal"] = signum
            if self.last_saved_step != self.state["step"]:
                self.save()
            raise interrupted(self.run_dir, self.script, where)

    def resume(self) -> dict:
        """Load the checkpoint and restore the run from it; returns the checkpoint."""
        ckpt = load_resume_checkpoint(self.run_dir, self.kind, self.device)
        self._restore(ckpt)
        log.info("resumed %s at step %d from %s", self.run_dir, self.state["step"],
                 os.path.join(self.run_dir, CHECKPOINT))
        saved, now = ckpt.get("threads"), torch.get_num_threads()
        if saved is not None and saved != now and (self.device is None or torch.device(self.device).type == "cpu"):
            log.warning("the checkpoint was written by a process on %d CPU thread(s) and this one runs on %d: the "
                        "floats, and so the figures, will not match an uninterrupted run bit for bit (resume with "
                        "num_threads=%d to match)", saved, now, saved)
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        self.state.clear()
        self.state.update(ckpt["state"])
        self.restore(ckpt)
        set_rng_state(ckpt["rng"])
        self.clock = Clock(self.state["elapsed"])
        self.last_saved_step = self.state["step"]

    def on_non_finite(self, err: Exception, writer=None, bar=None, bar_counter: str = "tokens") -> None:
        """``nan_policy=stop``: re-raise ``err``.  ``rollback``: reload the last checkpoint, halve the lr, go on
        (the progress ``bar`` goes back to the checkpoint's ``state[bar_counter]``).  ``reload_best``: call
        :attr:`reload_best` (DARTS ``rnn/train.py``: the best checkpoint and its optimizer, the same lr, the epoch
        after the best), count it in ``state["rollbacks"]`` and write a checkpoint of the reloaded state.

        Raises:
            NonFiniteLossError: the policy is stop, or ``reload_best`` before any best checkpoint exists.
            RollbackLimit: :data:`MAX_ROLLBACKS` rollbacks already (``reload_best``: reloads since the last new
            best).
        """
        writer = writer if writer is not None else self.writer
        if self.cfg.nan_policy == "stop":
            err.train_tokens = self.state.get("tokens", 0)  # the cost so far (a black-box trial records it)
            raise err
        if self.cfg.nan_policy == "reload_best":
            self._reload_best(err, writer)
            return
        rollbacks, scale = self.state["rollbacks"] + 1, self.state["lr_scale"]
        if rollbacks > MAX_ROLLBACKS:
            raise RollbackLimit(f"{err}; still non-finite after {MAX_ROLLBACKS} rollbacks (lr x {scale:g}); "
                                "the last checkpoint was kept") from None
        if self.writer is not None:  # the steps after the checkpoint are redone: their events must not stay
            self.writer.discard()
        ckpt = load_resume_checkpoint(self.run_dir, self.kind, self.device)
        self._restore(ckpt)
        self.state["lr_scale"] = min(scale, self.state["lr_scale"]) / 2
        self.state["rollbacks"] = rollbacks
        log.warning("%s; nan_policy=rollback: back to step %d of the last checkpoint, weight lr x %g (rollback %d "
                    "of at most %d)", err, self.state["step"], self.state["lr_scale"], rollbacks, MAX_ROLLBACKS)
        if writer is not None:  # by the rollback's number: two rollbacks can go back to the same step
            writer.add_scalar("faults/rollback_lr_scale", self.state["lr_scale"], rollbacks)
        if bar is not None:
            bar.reset(bar.total)
            bar.update(self.state[bar_counter])
        self.save()  # the halved lr and the count are part of the run now (and the fault's event is written)

    def _reload_best(self, err: Exception, writer=None) -> None:
        if self.reload_best is None:  # check_nan_policy refuses this configuration before a run starts
            raise ConfigError(f"nan_policy=reload_best is not supported by this {self.kind} run") from None
        reloads = self.state.get("reloads_since_best", 0) + 1
        if reloads > MAX_ROLLBACKS:
            raise RollbackLimit(f"{err}; still non-finite after reloading the best checkpoint {MAX_ROLLBACKS} times "
                                "without a new best; the last checkpoint was kept") from None
        epoch = self.reload_best(err)
        self.state["reloads_since_best"] = reloads
        self.state["rollbacks"] += 1
        log.warning("%s; nan_policy=reload_best: back to the best checkpoint, going on with epoch %d at the same lr "
                    "(reload %d of at most %d without a new best)", err, epoch, reloads, MAX_ROLLBACKS)
        if writer is not None:  # by the reload's number: a NaN at once after a reload leaves the step where it was
            writer.add_scalar("faults/reload_best_epoch", epoch, self.state["rollbacks"])
        self.save()  # a resume from here on starts from the reloaded state


def restore_weights_and_optimizer(cfg, where: str, model, opt: dict, averaging: bool, model_state: dict,
                                  optimizer_state: dict) -> bool:
    """Put back a retraining's weights and the optimizer state of a checkpoint taken when averaged SGD was
    (``averaging``) or was not on.  ``opt["optimizer"]`` is re-created first -- as ASGD, or as the configured
    optimizer -- when NT-ASGD switched between then and now.  Returns whether it was re-created.
    Raises CheckpointError (naming ``where``) when a state does not fit."""
    from nas.engine.asgd import is_averaging, make_asgd, make_optimizer

    switched = averaging != is_averaging(opt["optimizer"])
    if switched:
        opt["optimizer"] = (make_asgd(model.parameters(), cfg.lr, cfg.weight_decay) if averaging else
                            make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay))
    load_into("weights", where, model, model_state)
    load_into("optimizer state", where, opt["optimizer"], optimizer_state)
    return switched


def retrain_keeper(cfg, run_dir: str, kind: str, state: dict, model, opt: dict, position, device) -> Keeper:
    """The :class:`Keeper` of a retraining loop (language model or classifier): weights, the optimizer in
    ``opt["optimizer"]`` (re-created as ASGD when NT-ASGD had switched by the checkpoint, or back to the starting
    optimizer when it had not), and the loop's position: ``position.snapshot()`` -> dict, ``position.restore(ck)``.
    """
    from nas.engine.asgd import is_averaging

    def restore(ck):
        restore_weights_and_optimizer(cfg, run_dir, model, opt, ck["averaging"], ck["model"], ck["optimizer"])
        position.restore(ck)

    return Keeper(cfg, run_dir, kind, "train.py", state,
                  lambda: {"model": model.state_dict(), "optimizer": opt["optimizer"].state_dict(),
                           "averaging": is_averaging(opt["optimizer"]), **position.snapshot()},
                  restore, device, modules=(model,))


class NullWriter:
    """A TensorBoard writer that writes nothing (torchrun ranks other than 0): every method is a no-op."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def start_run(keeper: Keeper, resuming: bool, cfg_yaml: str, genotype=None, tags=()):
    """Resume ``keeper``'s run (or write its first checkpoint) and open its TensorBoard writer, a
    :class:`nas.engine.tb.CommittedWriter` of the script's tags (and the task's own ``tags``) that the keeper commits with each checkpoint (so a
    resumed run finds no events past its checkpoint, and purges nothing).  Returns the writer."""
    from torch.utils.tensorboard import SummaryWriter

    from nas.engine.tb import SCALAR_TAGS, CommittedWriter, log_genotype

    if resuming:
        keeper.resume()
    if not distributed.is_writer():  # torchrun: rank 0 writes the run's files, the others keep step
        if not resuming:
            keeper.save()  # (a collective on every rank)
        return NullWriter()
    writer = keeper.writer = CommittedWriter(SummaryWriter(os.path.join(keeper.run_dir, "tb")),
                                             (*SCALAR_TAGS[keeper.script], *tags))
    if not resuming:
        writer.add_text("config", f"```\n{cfg_yaml}\n```", 0)
        if genotype is not None:
            log_genotype(writer, genotype, 0)
        keeper.save()  # a first checkpoint: a rollback or a resume always has one
    return writer
