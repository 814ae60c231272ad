"""What the ``search.py`` / ``train.py`` entry points share: checks before Hydra starts, run-dir ownership, and
clean error reporting.

Before Hydra writes anything (:func:`prepare_argv`): Hydra's ``+key=value`` (adds a key the schema does not have)
and ``~key`` (deletes one) are refused, since a misspelled option would then run silently with its default; a
preset of the other script is refused naming the right one; the config is composed once, so that a misspelled
key or option gets the closest valid one (not Hydra's ``+key`` hint); and the process takes the run dir
(:mod:`nas.engine.rundir`), refused if another live process owns it.  The project's own errors (missing data, a
bad genotype or checkpoint, a NaN loss, an invalid setting) are reported as one clear line on stderr, with exit
status 1 and no traceback; a run refused before it wrote a run file of its own leaves nothing behind (no
``outputs/...`` dir), and a NaN stops a run that keeps its files and log.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional

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
    """Before Hydra starts (it writes ``.hydra/`` and the log into the run dir first): the checks of
    :func:`_prepare_argv` (overrides, preset, composition, a dir holding a run, a dir another process owns), then
    the run dir taken for this process (:mod:`nas.engine.rundir`) and given to Hydra as an absolute
    ``hydra.run.dir``; a resume command's own Hydra files go to ``<run dir>/resumes/<time>/`` so the run's
    ``.hydra/`` stays the record of how it was started.  Returns the argv to run Hydra with.

    Under ``torchrun`` the processes join their group here; rank 0 decides the run dir (its default is a time
    stamp, which would differ between processes) and every rank uses it; the other ranks get no ``.hydra/`` and
    no log file (their log goes to stderr).
    Exits with status 1 and a one-line message for a refused run (nothing written), or for ``--multirun`` under
    torchrun.
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
                decision = ("run", _resolved_run_dir(argv0, script), argv0)
            except SystemExit as err:
                decision = ("exit", None if err.code in (0, 1) else str(err.code))
    decision = distributed.broadcast_object(decision)
    if decision[0] == "exit":
        if decision[1] and world.rank == 0:
            print(f"UsageError: {decision[1]}", file=sys.stderr)
        sys.exit(1)
    run_dir = decision[1]
    # rank 0's command line: with what its checks added (train.py: the space and dataset of the genotype)
    base = [a for a in decision[2] if not a.startswith("hydra.run.dir=")]
    extra = [f"hydra.run.dir={run_dir}"]
    if world.rank != 0:
        extra += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    return base + extra


def _resolved_run_dir(argv: list, script: str) -> str:
    """The run dir of ``argv``, which :func:`_prepare_argv` gave as an absolute ``hydra.run.dir=`` (``${now:...}``
    resolved once, there); without one (``-m`` or ``--help``), the script's config default, resolved here."""
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


#: the presets in ``conf/experiment/`` and the scripts they are for (tests check that every file is listed)
PRESETS = {
    "darts_ptb": ("search.py",),
    "darts_ptb_2nd": ("search.py",),
    "darts_ptb_es": ("search.py",),
    "rsws_ptb": ("search.py",),
    "seed_example": ("search.py",),
    "darts_ptb_retrain": ("train.py",),
    "darts_wt2_retrain": ("train.py",),
    "smoke": ("search.py", "train.py"),
}

#: flags of Hydra's command line that take a value (``--cfg job``): the value is not an override
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}

# what this process created before Hydra started, so that a refused run can take it away again
_created: dict = {}


def check_preset(overrides, script: str) -> None:
    """Refuse ``experiment=<preset of the other script>`` (it would compose, with settings meant for the other
    script, or fail with a schema error naming a key), and an unknown preset name.

    Raises:
        UsageError: naming the script the preset is for, and this script's presets.
    """
    import difflib

    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+") != "experiment" or value in ("", "null"):
            continue
        mine = sorted(n for n, scripts in PRESETS.items() if script in scripts)
        if value not in PRESETS:
            close = difflib.get_close_matches(value, mine, n=1)
            raise UsageError(f"experiment={value}: no such preset{f'; did you mean experiment={close[0]}?' if close else ''}"
                             f" ({script} presets: {', '.join(mine)})")
        if script not in PRESETS[value]:
            raise UsageError(f"experiment={value} is a {PRESETS[value][0]} preset: run `python {PRESETS[value][0]} "
                             f"experiment={value} ...`; {script} presets are: {', '.join(mine)}")


def _task_overrides(argv: list) -> Optional[list]:
    """The overrides of a Hydra command line (None for one that only asks for help or information)."""
    out, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a in _FLAGS_WITH_VALUE:
            skip = True
        elif a in ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"):
            return None
        elif not a.startswith("-"):
            out.append(a)
    return out


def _composition_error(err: Exception, overrides: list, config_name: str) -> str:
    """One line for a failed composition: an unknown key or option gets the closest valid one (never Hydra's
    ``+key`` hint, which the project refuses anyway)."""
    import difflib
    import re

    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:  # strategy=dart
        group, option = missing.groups()
        options = GlobalHydra.instance().config_loader().get_group_options(group)
        close = difflib.get_close_matches(option, options, n=1)
        return (f"{group}={option}: no such option{f'; did you mean {group}={close[0]}?' if close else ''} "
                f"(options: {', '.join(options)})")
    bad = re.search(r"Could not override '([^']+)'", text)
    if bad:  # strategy.unroled=true, stratgy=darts
        key = bad.group(1)
        rest = [o for o in overrides if o.split("=", 1)[0] != key]
        try:
            cfg = compose(config_name, rest, return_hydra_config=True)
        except Exception:  # noqa: BLE001 (another bad override: suggest from the config alone)
            cfg = compose(config_name, [], return_hydra_config=True)
        owners = _owners(key)
        if owners:  # a key of another option of the group: say which ones take it, not the nearest spelling
            group = key.split(".", 1)[0]
            return (f"{key}: {group}={cfg.hydra.runtime.choices.get(group)} has no such key; it belongs to "
                    f"{group}={', '.join(owners)}")
        keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
        groups = [g for g in ("dataset", "space", "strategy", "experiment") if g in cfg.hydra.runtime.choices]
        close = difflib.get_close_matches(key, keys + groups, n=1, cutoff=0.6)
        return (f"{key}: no such config key{f'; did you mean {close[0]}?' if close else ''} (every valid key: "
                f"python {config_name}.py --cfg job)")
    if getattr(err, "override", None):  # OverrideParseException: the override's syntax
        return f"cannot parse the override {err.override!r}: {text.strip().splitlines()[0]} (Hydra's override grammar)"
    cause = err.__cause__  # e.g. "Error merging override lr=abc" <- "Value 'abc' ... could not be converted to Float"
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    head = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"{head}: {detail}" if detail else head


def _owners(key: str) -> list:
    """The registered strategies or spaces whose schema has the field of ``key`` (``strategy.objectives`` ->
    random, bayesian, evolution); empty for any other key."""
    import dataclasses

    group, _, field = key.partition(".")
    if group not in ("strategy", "space") or not field or "." in field:
        return []
    from nas.spaces import SPACES
    from nas.strategies import STRATEGIES

    registry = STRATEGIES if group == "strategy" else SPACES
    return [name for name in registry.names() if registry.schema(name) is not None
            and field in {f.name for f in dataclasses.fields(registry.schema(name))}]


def _dotted_keys(node, prefix: str = "") -> list:
    """Every key of a nested dict as ``a.b.c`` (the dicts themselves included)."""
    keys = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            keys.append(path)
            keys += _dotted_keys(v, path + ".")
    return keys


def _compose(argv: list, script: str, overrides: list):
    """Compose the config as Hydra will (same conf dir, same overrides), before Hydra writes anything.

    Raises:
        UsageError: one line for a composition error (see :func:`_composition_error`).
    """
    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "conf")
    name = os.path.splitext(script)[0]
    with initialize_config_dir(config_dir=conf, version_base="1.3", job_name=name):
        try:
            return compose(name, overrides, return_hydra_config=True)
        except Exception as err:  # noqa: BLE001 (Hydra's composition errors have several types)
            raise UsageError(_composition_error(err, overrides, name)) from None


def _prepare_argv(argv: list, script: str) -> list:
    """The checks that must happen before Hydra creates the run dir, then the run dir taken for this process.

    Refused (exit 1, one line on stderr, nothing written anywhere): ``+key``/``~key`` overrides, a preset of the
    other script, a config that does not compose (a misspelled key gets the closest valid one), a ``resume=`` of no
    run or of a run another process is running, a ``hydra.run.dir`` that holds a run or that another process owns.
    """
    from nas.engine.resume import check_fresh_run_dir, check_resumable
    from nas.engine.rundir import own_run_dir
    from nas.errors import ConfigError

    overrides = _task_overrides(argv)
    if overrides is None:  # --help, --info ...: Hydra answers, nothing is run
        return argv
    multirun = any(a in ("-m", "--multirun") for a in argv[1:])
    args = dict(o.split("=", 1) for o in overrides if "=" in o)
    try:
        check_overrides(overrides)
        check_preset(overrides, script)
        check_resume_overrides(overrides)
        if multirun or any(a in _FLAGS_WITH_VALUE - {"--cfg", "-c", "--package", "-p"} for a in argv[1:]):
            return argv  # sweeps (range(4)...) and other config dirs: Hydra composes, each job locks its own dir
        resume = args.get("resume")
        if resume:
            resume = os.path.abspath(resume)
            check_resumable(resume, args["resume"], script)  # before taking the dir: reads nothing else
            if "hydra.run.dir" not in args:  # Hydra's files of this command: <run dir>/resumes/<time>/
                overrides = overrides + [f"hydra.run.dir={os.path.join(resume, 'resumes', '${now:%Y-%m-%d_%H-%M-%S_%f}')}"]
                argv = argv + [overrides[-1]]
        cfg = _compose(argv, script, overrides)
        conf_dir = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "conf")
        taken = arch_origin_overrides(cfg, args, conf_dir) if script == "train.py" and not resume else []
        if taken:
            overrides, argv = overrides + taken, argv + taken
            cfg = _compose(argv, script, overrides)
            print(f"{script}: {' '.join(taken)} taken from the genotype of arch={args['arch']}", file=sys.stderr)
        if any(a in ("--cfg", "-c") for a in argv[1:]):
            return argv  # prints the config; runs nothing
        run_dir = os.path.abspath(str(cfg.hydra.run.dir))
        if not resume:
            check_fresh_run_dir(run_dir, script)
        _remember_created(run_dir)
        own_run_dir(resume or run_dir, f"resume={args['resume']}: the run dir" if resume else "run dir")
        if not resume:
            check_fresh_run_dir(run_dir, script)  # (a run that ended between the first check and the lock)
    except (UsageError, ConfigError) as err:
        _discard_refused_run()
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    return [a for a in argv if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def arch_origin_overrides(cfg, args: dict, conf_dir: str) -> list:
    """``train.py arch=<genotype file or run dir>``: the overrides that take the space and the dataset the genotype
    was searched with (``Genotype.space``, ``.dataset``), for the keys the command line (or a preset) leaves at their
    defaults (``conf_dir``: the script's ``conf/``).  An ``arch`` that does not resolve here gives none (``train``
    reports it).

    Raises:
        UsageError: an explicit ``space=`` other than the genotype's, or an explicit dataset of another task than the
            genotype's (a dataset of the same task is fine: a PTB cell retrained on WikiText-2).
    """
    from nas.genotype import GenotypeError
    from nas.published import resolve_arch
    from nas.tasks.base import task_name

    arch = args.get("arch")
    if not arch:
        return []
    try:
        genotype, where = resolve_arch(arch, base_dir=os.getcwd())
    except GenotypeError:
        return []
    choices, out = cfg.hydra.runtime.choices, []
    origin = f"arch={arch} is a genotype of space {genotype.space}" + (
        f", searched for {genotype.task} on {genotype.dataset}" if genotype.task else "")
    if cfg.space.name != genotype.space:
        if "space" in args:
            raise UsageError(f"{origin}; space={args['space']} contradicts it: drop space= (train.py takes the space "
                             "from the genotype)")
        if genotype.space in _options(conf_dir, "space"):
            out.append(f"space={genotype.space}")
    if genotype.dataset is None or cfg.dataset.name == genotype.dataset:
        return out
    explicit = "dataset" in args or "dataset.name" in args or cfg.dataset.name != choices.get("dataset")
    if explicit:
        if genotype.task is not None and task_name(cfg) != genotype.task:
            given = args.get("dataset") or args.get("dataset.name") or cfg.dataset.name
            raise UsageError(f"{origin}; dataset={given} is for task {task_name(cfg)}: drop dataset= (train.py takes "
                             f"dataset={genotype.dataset} from the genotype) or give a dataset of task {genotype.task}")
    elif genotype.dataset in _options(conf_dir, "dataset"):
        out.append(f"dataset={genotype.dataset}")
    elif genotype.task is not None and task_name(cfg) != genotype.task:
        raise UsageError(f"{origin}; there is no conf/dataset/{genotype.dataset}.yaml to take it from: give a dataset "
                         f"of task {genotype.task} (dataset options: {', '.join(sorted(_options(conf_dir, 'dataset')))})")
    return out


def _options(conf_dir: str, group: str) -> list:
    """The options of a config group (``<conf_dir>/<group>/*.yaml``)."""
    folder = os.path.join(conf_dir, group)
    return [os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(".yaml")] if os.path.isdir(folder) else []


def _remember_created(run_dir: str) -> None:
    """Note what of ``run_dir``'s path exists before this process writes (for :func:`_discard_refused_run`)."""
    top = run_dir
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    _created.update(run_dir=run_dir, top=None if os.path.exists(run_dir) else top,
                    entries=set(os.listdir(run_dir)) if os.path.isdir(run_dir) else set())


def _discard_refused_run() -> None:
    """Take away what this process created for a run that was refused before it wrote a run file of its own
    (checkpoint, ``trials.jsonl``, ``metrics.json``): Hydra's ``.hydra/`` and log, the lock file, and the dirs made
    for them (``outputs/<script>/<date>/<time>``, or a resume's ``resumes/<time>``), up to the first that was there
    before or that holds something else.  A refused run leaves nothing behind."""
    import shutil

    from nas.engine.resume import run_dir_status
    from nas.engine.rundir import release_run_dir

    run_dir = _created.get("run_dir")
    if not run_dir or not os.path.isdir(run_dir) or run_dir_status(run_dir) is not None:
        return
    release_run_dir(run_dir)
    if _created["top"] is None:  # the dir was there: remove only what is new in it
        for name in set(os.listdir(run_dir)) - _created["entries"]:
            path = os.path.join(run_dir, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent, top = os.path.dirname(run_dir), _created["top"]
    while parent.startswith(top) and len(parent) >= len(top):
        try:
            os.rmdir(parent)  # only if empty: another run may have started beside this one
        except OSError:
            break
        parent = os.path.dirname(parent)


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
    from nas.errors import NonFiniteLossError
    from nas.engine.resume import Interrupted, stop_signals
    from nas.errors import ConfigError, SearchFailed
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
    except (UsageError, ConfigError, DataError, GenotypeError, CheckpointError, NonFiniteLossError,
            SearchFailed) as err:
        log.error("%s: %s", type(err).__name__, err)
        if not isinstance(err, (NonFiniteLossError, SearchFailed)):  # a refusal (a run that ran keeps its files)
            _discard_refused_run()
        sys.exit(1)
