"""What the ``search.py`` / ``train.py`` entry points share: override checks and clean error reporting.

Hydra's ``+key=value`` adds a key that the schema does not have, and ``~key`` deletes one; a misspelled
option would then run silently with its default.  Both are refused here.  The project's own errors (missing
data, a bad genotype or checkpoint, a NaN loss, an invalid setting) are reported as one clear line, written
to the run log too, with exit status 1 and no traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from omegaconf import DictConfig

log = logging.getLogger("nas")


class UsageError(ValueError):  # noqa: N818 (reads better in the one-line message)
    """A command-line override the schemas do not allow."""


def check_overrides(overrides) -> None:
    """Refuse ``+key=...`` / ``++key=...`` (adds a key) and ``~key`` (deletes one).

    Raises:
        UsageError: naming the offending overrides and how to list the valid keys.
    """
    bad = [o for o in overrides if o.startswith(("+", "~"))]
    if bad:
        raise UsageError(f"overrides {bad} would add or delete config keys; every option already exists in "
                         f"the schema (list them with --cfg job), so set it without '+' or '~'")


def prepare_argv(argv: list, script: str) -> list:
    """Before Hydra starts (it writes ``.hydra/`` into the run dir first): refuse ``hydra.run.dir=<a dir holding a
    run>`` unless resuming, and send a resume command's own Hydra files to ``<run dir>/resumes/<time>/`` so the
    run's ``.hydra/`` stays the record of how it was started.  Returns the argv to run Hydra with.

    Under ``torchrun`` the processes join their group here; rank 0 decides the run dir (its default is a time
    stamp, which would differ between processes) and every rank uses it; the other ranks get no ``.hydra/`` and
    no log file (their log goes to stderr).
    Exits with status 1 and a one-line message for a dir already in use, or for ``--multirun`` under torchrun.
    """
    from nas import distributed

    world = distributed.launched()
    if world is None:
        return _prepare_argv(argv, script)
    distributed.init()
    decision = None
    if world.rank == 0:
        if any(a in ("-m", "--multirun") for a in argv[1:]):
            decision = ("exit", "--multirun under torchrun: launch one torchrun per run (or sweep without torchrun)")
        else:
            try:
                argv0 = _prepare_argv(argv, script)
                decision = ("run", _resolved_run_dir(argv0, script))
            except SystemExit as err:
                decision = ("exit", None if err.code in (0, 1) else str(err.code))
    decision = distributed.broadcast_object(decision)
    if decision[0] == "exit":
        if decision[1] and world.rank == 0:
            print(f"UsageError: {decision[1]}", file=sys.stderr)
        sys.exit(1)
    run_dir = decision[1]
    base = [a for a in (argv0 if world.rank == 0 else argv) if not a.startswith("hydra.run.dir=")]
    extra = [f"hydra.run.dir={run_dir}"]
    if world.rank != 0:
        extra += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    return base + extra


def _resolved_run_dir(argv: list, script: str) -> str:
    """The run dir Hydra would use for ``argv`` (its ``hydra.run.dir=`` or the script's config default), with
    ``${now:...}`` resolved once, here."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()  # Hydra's resolvers, ``now`` among them

    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("hydra.run.dir=")]
    if given:
        pattern = given[-1]
    else:
        conf = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "conf", os.path.splitext(script)[0] + ".yaml")
        pattern = OmegaConf.to_container(OmegaConf.load(conf).hydra.run)["dir"]  # unresolved: ${now:...}
    return os.path.abspath(str(OmegaConf.create({"dir": pattern}).dir))


def _prepare_argv(argv: list, script: str) -> list:
    from nas.engine.resume import check_fresh_run_dir

    args = dict(a.split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    if args.get("resume"):
        if "hydra.run.dir" not in args:
            return argv + [f"hydra.run.dir={os.path.join(args['resume'], 'resumes', '${now:%Y-%m-%d_%H-%M-%S_%f}')}"]
        return argv
    if args.get("hydra.run.dir"):
        from nas.errors import ConfigError

        try:
            check_fresh_run_dir(os.path.abspath(args["hydra.run.dir"]), script)
        except ConfigError as err:
            print(f"ConfigError: {err}", file=sys.stderr)
            sys.exit(1)
    return argv


def check_resume_overrides(overrides) -> None:
    """With ``resume=<run dir>`` only the settings of :data:`nas.engine.resume.RUNTIME_KEYS` may be given: the
    run goes on with the config it was started with.

    Raises:
        UsageError: naming the other overrides.
    """
    from nas.engine.resume import RUNTIME_KEYS

    keys = [o.split("=", 1)[0] for o in overrides]
    if "resume" not in keys:
        return
    bad = [o for o, k in zip(overrides, keys) if k != "resume" and k not in RUNTIME_KEYS and not k.startswith("hydra.")]
    if bad:
        raise UsageError(f"resume= continues a run with the config it was started with (its config.yaml); drop "
                         f"{bad} (only {', '.join(RUNTIME_KEYS)} may be set when resuming)")


def _log_to_resumed_run(cfg: DictConfig) -> None:
    """Append this process's log to the resumed run's own log file too (Hydra's goes to a new dir)."""
    from hydra.core.hydra_config import HydraConfig

    from nas.engine.common import absolute_path

    run_dir = absolute_path(cfg.resume)
    if not os.path.isdir(run_dir) or os.path.samefile(run_dir, HydraConfig.get().runtime.output_dir):
        return  # (hydra.run.dir=<the run dir>: Hydra's own log file is that one already)
    handler = logging.FileHandler(os.path.join(run_dir, f"{HydraConfig.get().job.name}.log"), mode="a")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)


def _tag_rank_in_log() -> None:
    """Under torchrun, prefix the console log lines of ranks other than 0 (whose lines look alike) with the rank."""
    from nas import distributed

    if distributed.is_writer():
        return
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None:
            fmt = handler.formatter._fmt or "%(message)s"
            handler.setFormatter(logging.Formatter(fmt.replace("%(message)s", f"[rank {distributed.rank()}] %(message)s")))


def run_entry(fn: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Check the overrides, run ``fn(cfg)``, and turn the project's known errors into one-line exits (status 1;
    an interrupted run: 128 + the signal number, after its checkpoint is written)."""
    from hydra.core.hydra_config import HydraConfig

    from nas import distributed
    from nas.data import DataError
    from nas.engine.common import CheckpointError
    from nas.engine.lm import NonFiniteLossError
    from nas.engine.resume import Interrupted, stop_signals
    from nas.errors import ConfigError
    from nas.genotype import GenotypeError

    try:
        overrides = HydraConfig.get().overrides.task
        check_overrides(overrides)
        check_resume_overrides(overrides)
        if cfg.get("resume"):
            from nas.config import SearchConfig, TrainConfig
            from nas.engine.resume import RUNTIME_KEYS, resume_config

            given = {o.split("=", 1)[0] for o in overrides} & set(RUNTIME_KEYS)
            cfg, _ = resume_config(cfg, TrainConfig if "arch" in cfg.keys() else SearchConfig, given)
            if distributed.is_writer():  # torchrun: rank 0 writes the run's log
                _log_to_resumed_run(cfg)
        _tag_rank_in_log()
        with stop_signals():  # the whole run: a signal during start-up or wrap-up is not lost either
            fn(cfg)
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C
        run_dir = cfg.get("resume") or HydraConfig.get().runtime.output_dir
        log.warning("stopped at once by a second Ctrl-C; the last checkpoint stays. Resume with: python %s "
                    "resume=%s", HydraConfig.get().job.name + ".py", run_dir)
        sys.exit(130)
    except (UsageError, ConfigError, DataError, GenotypeError, CheckpointError, NonFiniteLossError) as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(1)
