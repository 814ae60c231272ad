"""Black-box search strategies: random search and Bayesian optimization over a space's genotypes.

A black-box strategy (``kind = "black_box"``) proposes genotypes (``ask``), the engine trains each one as a
discrete model with the retraining code under a fixed per-trial budget and reports its validation metric
(``tell``), and the best one wins (:mod:`nas.engine.blackbox`).  A genotype is a combination of categorical
decisions, drawn define-by-run (:func:`nas.genotype.sample_decisions`; Optuna's define-by-run API,
https://optuna.readthedocs.io/en/stable/tutorial/10_key_features/002_configurations.html): only the decisions
active given the earlier answers are asked (stacked_rnn: a layer's only within the chosen depth), so a trial's
params are exactly its genotype's, and two trials of one genotype have the same params.  The DAG spaces'
decisions are all independent and always active (:func:`nas.genotype.dag_decisions`).

* ``random``: each active decision uniform (DAG spaces: genotypes uniform over the space; stacked_rnn: depth
  uniform, then each layer's decisions); never the same genotype twice (the search ends when the space is
  exhausted, at its genotype count), or with ``repeat=true`` independent draws with replacement, each trained with
  a seed of its own.  The baseline of Li & Talwalkar 2019 (sec. 4) without
  weight sharing.
* ``bayesian``: an Optuna study (Akiba et al. 2019) whose categorical parameters are the decisions, with the
  Gaussian-process sampler (``sampler=gp``) or TPE (Bergstra et al. 2011; ``sampler=tpe``).  The study lives in
  a storage URL -- default a SQLite file in the run directory, so an interrupted study resumes; any Optuna RDB
  URL (PostgreSQL, MySQL) lets several workers share one study.  A genotype the study proposes again is not
  trained again: its first result is reported (after waiting for it, if another worker is still training it).

Several workers (``strategy.storage`` set, for ``random`` too, which then draws through Optuna's RandomSampler):
each proposal is an Optuna trial of the shared study, and the budget (``trials`` finished trials) is the study's,
not the worker's.  With an RDB storage (``sqlite:///...`` on one machine, ``postgresql://...`` across machines)
a worker records a heartbeat for its running trial every ``heartbeat_interval`` seconds; a trial whose heartbeat
is older than ``grace_period`` (its worker died, or is paused) is marked FAIL by the next worker that looks
(``optuna.storages.fail_stale_trials``), and the study goes on without it.

Multi-fidelity (``strategy.pruner=asha|hyperband``, :class:`PrunerConfig`): random and Bayesian search with an Optuna
pruner that stops trials at the rungs of successive halving or Hyperband, epochs being the resource (ASHA-like with
``random``, BOHB-like with ``bayesian``); a pruned search always runs through an Optuna study (random: RandomSampler).
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import numpy as np

from nas.errors import ConfigError
from nas.genotype import Genotype, active_decisions, sample_decisions, space_genotype_count
from nas.strategies.base import STRATEGIES
from nas.strategies import shared_study

log = logging.getLogger(__name__)

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "gp", "nsga2")
#: ``strategy.objective`` -> (the trial metric's name, direction, the key of a retraining epoch's history record it is
#: read from; None: a figure of the whole run); null is the task's own metric (perplexity or accuracy, as
#: retraining selects)
OBJECTIVES = {"accuracy": ("valid_accuracy", "maximize", "valid_accuracy"),
              "cross_entropy": ("valid_cross_entropy", "minimize", "valid_loss"),
              "params": ("params", "minimize", None)}
#: what ``strategy.objectives`` may list: the task's own metric and the figures of :data:`OBJECTIVES`
PARETO_FIGURES = ("metric",) + tuple(OBJECTIVES)


@dataclass
class BlackBoxConfig:
    """What every black-box strategy is configured by: the per-trial training budget, the number of trials, what a
    trial is scored by, and the study's storage."""

    name: str = "random"
    #: genotypes to train and score (at most; fewer when ``budget_tokens`` or the space runs out first)
    trials: int = 10
    #: stop proposing once the trials together have trained on this many tokens (LM: target tokens;
    #: classification: the words of the training sentences); null: no cap.  The same currency as a one-shot search's ``train_tokens``.
    budget_tokens: Optional[int] = None
    #: epochs of retraining per trial (train.py's loop on the training split, validation each epoch)
    trial_epochs: int = 1
    #: cap on training batches per trial epoch (null: the top-level ``limit_train_batches``, whose default
    #: null means the whole split)
    trial_limit_train_batches: Optional[int] = None
    #: an Optuna storage URL shared by several workers (``sqlite:///<file>``, ``postgresql://user@host/db``,
    #: ``journal:<file>``); null: one worker (``bayesian``: its own ``sqlite:///<run dir>/study.db``)
    storage: Optional[str] = None
    study_name: str = "nas"
    #: seconds between a worker's heartbeats for its running trial (RDB storages; see the module docstring)
    heartbeat_interval: int = 10
    #: a running trial without a heartbeat for this long is marked failed (null: Optuna's 2 x heartbeat_interval)
    grace_period: Optional[int] = None
    #: the held-out figure a trial is scored by and the best trial chosen on: null = the task's metric (valid
    #: perplexity; SST-2: accuracy), or one of the evaluations of the seed article: ``accuracy``, ``cross_entropy``
    #: (nats; lower is better), ``params`` (fewest parameters)
    objective: Optional[str] = None
    #: several objectives at once (a Pareto search): ``metric`` (the task's metric; first if present) and any of
    #: ``accuracy``, ``cross_entropy``, ``params``, e.g. ``[metric, params]``; the study then has one direction per
    #: objective (Optuna's multi-objective samplers: TPE, NSGA-II, random; evolution: non-dominated rank), the run
    #: writes the front (``pareto.json``, ``pareto.png``) and ``genotype.json`` is the front's best on the first
    #: objective.  null: one objective (``objective``)
    objectives: Optional[List[str]] = None


#: ``strategy.pruner`` -> the Optuna pruner that halves the trials (see :class:`PrunerConfig`)
PRUNERS = ("asha", "hyperband")


@dataclass
class PrunerConfig:
    """Multi-fidelity search (random and Bayesian): the trials' epochs are the resource; each trial reports its
    validation value after every epoch to an Optuna pruner, which stops (prunes) it at a rung when it is not among
    the best ``1 / reduction_factor`` of the trials that reached that rung.

    * ``asha``: asynchronous successive halving (Li et al. 2020, "A System for Massively Parallel Hyperparameter
      Tuning", MLSys, Algorithm 2; ``optuna.pruners.SuccessiveHalvingPruner``): rungs at
      ``min_resource * reduction_factor ** (min_early_stopping_rate + k)`` epochs, k = 0, 1, ... below
      ``trial_epochs`` (a trial that reaches ``trial_epochs`` completes).  With ``strategy=random``: the ASHA baseline of
      Li & Talwalkar 2019 (sec. 4).
    * ``hyperband``: Hyperband (Li et al. 2018, JMLR, Algorithm 1; ``optuna.pruners.HyperbandPruner``, asynchronous):
      brackets of successive halving with early-stopping rates 0 .. floor(log_eta(trial_epochs / min_resource)), a
      trial's bracket a hash of the study name and its trial number.  With ``strategy=bayesian`` (TPE, which ranks
      pruned trials by the epoch they reached, then by their last value): BOHB-like (Falkner et al. 2018), not BOHB
      (one TPE model over all budgets, not one per budget).
    """

    #: null: no pruning (every trial trains ``trial_epochs``), ``asha`` or ``hyperband``
    pruner: Optional[str] = None
    #: epochs before the first rung (r in Li et al. 2020; Optuna's default for Hyperband, 1)
    min_resource: int = 1
    #: eta: a rung promotes the best 1/eta of the trials that reached it (3: Li et al. 2018 sec. 3.3 and Optuna's
    #: Hyperband default)
    reduction_factor: int = 3
    #: s (asha only): the first rung at min_resource * eta**s epochs (Li et al. 2020; Optuna's default 0)
    min_early_stopping_rate: int = 0


@dataclass
class RandomConfig(BlackBoxConfig, PrunerConfig):
    """``strategy=random``: :class:`BlackBoxConfig` plus whether a genotype may be drawn again."""

    name: str = "random"
    #: false: never the same genotype twice (the search ends when the space is exhausted).  true: draw with
    #: replacement, each trial's decisions uniform and independent of the earlier trials (random search as Bergstra &
    #: Bengio 2012, sec. 2); trial n trains with seed ``seed + n - 1``, so a genotype drawn again is a new training
    #: run (its seed variance), not a copy.  One worker only (not with ``storage``).
    repeat: bool = False


@dataclass
class BayesianConfig(BlackBoxConfig, PrunerConfig):
    """``strategy=bayesian``: :class:`BlackBoxConfig` plus the Optuna sampler."""

    name: str = "bayesian"
    #: ``gp`` (Gaussian-process BO, optuna.samplers.GPSampler), ``tpe`` (optuna.samplers.TPESampler; with several
    #: ``objectives`` MOTPE, Ozaki et al. 2020) or ``nsga2`` (optuna.samplers.NSGAIISampler, Deb et al. 2002; for a
    #: Pareto search, generations of ``n_startup_trials``)
    sampler: str = "tpe"
    #: random trials before the model-based proposals start (nsga2: the size of each generation, at least 2)
    n_startup_trials: int = 5


class Proposal(NamedTuple):
    """What ``ask`` returns: the genotype to evaluate and the strategy's handle for ``tell``; ``known`` is the
    value of an identical genotype already evaluated (then nothing needs training), else None."""

    genotype: Genotype
    handle: object
    known: Optional[float] = None
    #: the proposal's training seed (random search with ``repeat``); None: the search's seed
    seed: Optional[int] = None


#: what ``ask`` returns instead of a proposal when a shared study's trial budget was filled by other workers between
#: this worker's ``stopped()`` and its ``ask()``: nothing to train; the engine asks ``stopped()`` again (which waits
#: for the running trials, or frees the place again when one of them dies)
BUDGET_FULL = "budget_full"


def check_objectives(cfg) -> None:
    """ConfigError (one line) unless ``strategy.objectives`` is null or two or more distinct names of
    :data:`PARETO_FIGURES`, ``metric`` only first, without ``objective`` or a pruner (Optuna prunes single-objective
    studies only)."""
    objectives = getattr(cfg, "objectives", None)
    if objectives is None:
        return
    objectives = list(objectives)
    if len(objectives) < 2 or len(set(objectives)) != len(objectives) or not set(objectives) <= set(PARETO_FIGURES):
        raise ConfigError(f"strategy.objectives={objectives}: two or more distinct of {', '.join(PARETO_FIGURES)} "
                          "(e.g. [metric,params]); null: one objective")
    if "metric" in objectives[1:]:
        raise ConfigError(f"strategy.objectives={objectives}: `metric` (the task's metric) can only come first")
    if getattr(cfg, "objective", None) is not None:
        raise ConfigError("strategy.objective and strategy.objectives are both set: use objectives=[...] alone")
    if getattr(cfg, "pruner", None) is not None:
        raise ConfigError("strategy.pruner works on one objective (Optuna prunes single-objective studies only): "
                          "unset strategy.pruner or strategy.objectives")


def objective_directions(cfg, metric_direction: str) -> list:
    """The direction of each of ``strategy.objectives`` (``metric``: ``metric_direction``, the task's); one objective:
    ``[direction]`` of ``strategy.objective`` (null: ``metric_direction``)."""
    names = list(getattr(cfg, "objectives", None) or [getattr(cfg, "objective", None) or "metric"])
    return [metric_direction if n == "metric" else OBJECTIVES[n][1] for n in names]


def check_objective(objective: Optional[str]) -> None:
    """ConfigError unless ``objective`` is None or a key of :data:`OBJECTIVES`."""
    if objective is not None and objective not in OBJECTIVES:
        raise ConfigError(f"strategy.objective={objective!r}; valid: {', '.join(OBJECTIVES)} (null: the task's "
                          "metric)")


def _check_budget(cfg) -> None:
    check_objective(getattr(cfg, "objective", None))
    check_objectives(cfg)
    check_pruner(cfg)
    if getattr(cfg, "repeat", False) and cfg.storage:
        raise ConfigError("strategy.repeat=true draws with replacement for one worker; a shared study "
                          "(strategy.storage) never trains a genotype twice: leave one of them unset")
    if cfg.trials < 1:
        raise ConfigError(f"strategy.trials must be >= 1, got {cfg.trials}")
    if cfg.trial_epochs < 1:
        raise ConfigError(f"strategy.trial_epochs must be >= 1, got {cfg.trial_epochs}")
    if cfg.budget_tokens is not None and cfg.budget_tokens < 1:
        raise ConfigError(f"strategy.budget_tokens must be >= 1 or null, got {cfg.budget_tokens}")
    if cfg.heartbeat_interval < 1 or (cfg.grace_period is not None and cfg.grace_period <= cfg.heartbeat_interval):
        raise ConfigError(f"strategy.heartbeat_interval must be >= 1 s and strategy.grace_period longer than it (or "
                          f"null), got {cfg.heartbeat_interval} and {cfg.grace_period}")


def check_pruner(cfg) -> None:
    """ConfigError (one line) for a pruner setting that cannot work: an unknown name, ``trial_epochs`` with no rung
    below it (nothing to halve), ``repeat=true`` (each draw trained as its own run: no study to prune in), a bad
    ``min_resource`` / ``reduction_factor`` / ``min_early_stopping_rate``."""
    pruner = getattr(cfg, "pruner", None)
    if pruner is None:
        return
    if pruner not in PRUNERS:
        raise ConfigError(f"strategy.pruner={pruner!r}; valid: {', '.join(PRUNERS)} (null: no pruning)")
    if getattr(cfg, "repeat", False):
        raise ConfigError("strategy.pruner halves trials in an Optuna study, which never trains a genotype twice; "
                          "strategy.repeat=true draws with replacement: leave one of them unset")
    if cfg.min_resource < 1 or cfg.reduction_factor < 2 or cfg.min_early_stopping_rate < 0:
        raise ConfigError(f"strategy.pruner={pruner} needs min_resource >= 1, reduction_factor >= 2 and "
                          f"min_early_stopping_rate >= 0, got {cfg.min_resource}, {cfg.reduction_factor} and "
                          f"{cfg.min_early_stopping_rate}")
    first = cfg.min_resource * cfg.reduction_factor ** (cfg.min_early_stopping_rate if pruner == "asha" else 0)
    if first >= cfg.trial_epochs:
        raise ConfigError(f"strategy.pruner={pruner}: the first rung is at epoch {first}, not below "
                          f"strategy.trial_epochs={cfg.trial_epochs}, so nothing would be halved: raise trial_epochs "
                          f"(e.g. strategy.trial_epochs={max(3, first + 1)})"
                          + ("" if cfg.min_resource == 1 else " or lower min_resource"))


def rung_epochs(cfg, bracket: int = 0) -> list:
    """The epochs at which a trial may be pruned: ``min_resource * reduction_factor ** (s + k)`` below
    ``trial_epochs``, with ``s`` = ``min_early_stopping_rate`` (asha) or the trial's Hyperband ``bracket``."""
    s = cfg.min_early_stopping_rate if cfg.pruner == "asha" else bracket
    rungs, k = [], 0
    while cfg.min_resource * cfg.reduction_factor ** (s + k) < cfg.trial_epochs:
        rungs.append(cfg.min_resource * cfg.reduction_factor ** (s + k))
        k += 1
    return rungs


def make_pruner(cfg):
    """The Optuna pruner of ``cfg.pruner`` (None: ``optuna.pruners.NopPruner``): ``SuccessiveHalvingPruner(
    min_resource, reduction_factor, min_early_stopping_rate)`` or ``HyperbandPruner(min_resource,
    max_resource=trial_epochs, reduction_factor)``; the step of a report is the epoch (1 = after the first)."""
    import optuna

    pruner = getattr(cfg, "pruner", None)
    if pruner is None:
        return optuna.pruners.NopPruner()
    if pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource,
                                                      reduction_factor=cfg.reduction_factor,
                                                      min_early_stopping_rate=cfg.min_early_stopping_rate)
    return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource, max_resource=cfg.trial_epochs,
                                          reduction_factor=cfg.reduction_factor)


class EpochReporter:
    """The per-epoch hook a pruned trial's training calls: ``report(epoch, value)`` records the validation value
    after ``epoch`` (1-based; the trial's objective, as its result would be if it stopped there) as the Optuna
    trial's intermediate value and returns True when the pruner stops the trial there.  Never True at
    ``trial_epochs`` (a trial that trained every epoch completes); a value of None (not measured) is not reported.
    ``pruned``: the epoch it was stopped at, else None."""

    def __init__(self, trial, last_epoch: int):
        self.trial, self.last_epoch, self.pruned = trial, last_epoch, None

    def report(self, epoch: int, value: Optional[float]) -> bool:
        if value is None:
            return False
        with warnings.catch_warnings():  # an epoch reported before an interruption is reported again: ignored
            warnings.filterwarnings("ignore", message=".*is already reported")
            self.trial.report(float(value), int(epoch))
        if epoch < self.last_epoch and self.trial.should_prune():
            self.pruned = int(epoch)
            return True
        return False


@STRATEGIES.register("random", config=RandomConfig)
class RandomStrategy:
    """Uniform random search, without repeats unless ``cfg.repeat``.

    One worker: numpy draws, never the same genotype twice; with ``cfg.repeat`` each trial's draw is independent
    (a function of ``seed`` and the trial's number alone, so a resumed search draws what an uninterrupted one would)
    and trains with its own seed.  With ``cfg.storage`` (several workers): an Optuna
    study with ``RandomSampler`` shared through the storage, as :class:`BayesianStrategy` (a genotype drawn again
    is reported, not retrained).
    Args:
        cfg: :class:`RandomConfig`; space: gives ``decisions()`` (or ``sample_decisions(suggest)``, see
        :func:`nas.genotype.sample_decisions`) and ``from_decisions()``; seed: of the draws;
        direction: ``minimize`` (perplexity) or ``maximize`` (accuracy); run_dir: unused (the interface).
    """

    kind = "black_box"

    def __init__(self, cfg: RandomConfig, space, seed: int = 0, direction: str = "minimize",
                 run_dir: Optional[str] = None):
        _check_budget(cfg)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.cfg, self.space, self.direction = cfg, space, direction
        # distinct genotypes (stacked_rnn's decisions are conditional: counted by the space); ask() stops once every
        # genotype was proposed
        self.size = space_genotype_count(space)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.seen: set = set()
        self.asked = 0  # proposals so far (``repeat``: the next trial's number - 1)
        # a shared study, or a pruned search (the pruner lives in a study): Optuna trials drawn by RandomSampler
        self.shared = (BayesianStrategy(cfg, space, seed, direction, run_dir, sampler="random")
                       if cfg.storage or getattr(cfg, "pruner", None) else None)

    def ask(self) -> Optional[Proposal]:
        """A genotype not proposed before, uniform over the rest of the space; None once it is exhausted
        (``repeat``: any genotype, each decision uniform; never None)."""
        if self.shared is not None:
            return self.shared.ask()
        if self.cfg.repeat:  # with replacement: trial n's draw and training seed depend on (seed, n) only
            n, self.asked = self.asked, self.asked + 1
            rng = np.random.default_rng([self.seed, n])
            choice = sample_decisions(self.space, lambda name, choices: choices[rng.integers(len(choices))])
            return Proposal(self.space.from_decisions(choice), n, seed=self.seed + n)
        if len(self.seen) >= self.size:
            return None
        while True:  # rejection: the draw's law restricted to the unseen genotypes (cheap while the space is much larger)
            choice = sample_decisions(self.space, lambda name, choices: choices[self.rng.integers(len(choices))])
            genotype = self.space.from_decisions(choice)
            key = genotype.key()
            if key not in self.seen:
                self.seen.add(key)
                return Proposal(genotype, key)

    def tell(self, handle, value: Optional[float], train_tokens: int = 0) -> Optional[int]:
        """Random search learns nothing from results (a failed trial: ``value=None``); a shared study records it
        (returns the study trial's number, see :meth:`BayesianStrategy.tell`)."""
        if self.shared is not None:
            return self.shared.tell(handle, value, train_tokens)
        return None

    def reclaim(self, recorded: set) -> Optional[Proposal]:
        """A shared study's interrupted trial of this worker, taken back (:meth:`BayesianStrategy.reclaim`)."""
        return self.shared.reclaim(recorded) if self.shared is not None else None

    @property
    def pruner(self) -> Optional[str]:
        """``cfg.pruner`` (multi-fidelity: see :class:`PrunerConfig`)."""
        return getattr(self.cfg, "pruner", None)

    def reporter(self, handle) -> EpochReporter:
        """The per-epoch hook of a pruned search's trial (:meth:`BayesianStrategy.reporter`)."""
        return self.shared.reporter(handle)

    def tell_pruned(self, handle, epoch: int, train_tokens: int) -> int:
        """Record a trial the pruner stopped (:meth:`BayesianStrategy.tell_pruned`)."""
        return self.shared.tell_pruned(handle, epoch, train_tokens)

    def spent_tokens(self) -> Optional[int]:
        """A shared study's training tokens, every worker's (:meth:`BayesianStrategy.spent_tokens`); None alone."""
        return self.shared.spent_tokens() if self.shared is not None else None

    def mark_seen(self, genotypes) -> None:
        """Genotypes evaluated before a resume: never proposed again (``repeat``: their number is the trials done)."""
        genotypes = list(genotypes)
        self.seen.update(g.key() for g in genotypes)
        self.asked = len(genotypes)

    def study_best(self):
        """The shared study's best ``(value, genotype)`` (see :meth:`BayesianStrategy.study_best`); None alone."""
        return self.shared.study_best() if self.shared is not None else None

    def stopped(self, completed: int) -> bool:
        if self.shared is not None:
            return self.shared.stopped(completed)
        return completed >= self.cfg.trials


@STRATEGIES.register("bayesian", config=BayesianConfig)
class BayesianStrategy:
    """Bayesian optimization of the genotype's categorical decisions with an Optuna study.

    Args: as :class:`RandomStrategy`; ``run_dir`` holds the default SQLite study; ``sampler`` overrides
        ``cfg.sampler`` (``random``: the shared study of :class:`RandomStrategy`).
    Raises:
        ConfigError: unknown sampler, or a storage URL Optuna cannot open.
    """

    kind = "black_box"

    def __init__(self, cfg: BayesianConfig, space, seed: int = 0, direction: str = "minimize",
                 run_dir: Optional[str] = None, sampler: Optional[str] = None):
        import optuna

        _check_budget(cfg)
        self.sampler_name = sampler or cfg.sampler
        if self.sampler_name not in SAMPLERS + ("random", "evolution"):
            raise ConfigError(f"strategy.sampler={cfg.sampler!r}; valid: {', '.join(SAMPLERS)}")
        self.cfg, self.space, self.direction = cfg, space, direction
        #: one direction per objective (``strategy.objectives``; one objective: ``[direction]``)
        self.directions = objective_directions(cfg, direction) if getattr(cfg, "objectives", None) else [direction]
        self.size = space_genotype_count(space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if cfg.storage:
            # a shared study: workers started with the same seed would propose the same genotypes in the same
            # order, so each seeds its sampler apart (a multi-worker study is not reproducible anyway)
            seed = int.from_bytes(os.urandom(4), "little") ^ seed
        self.seed = seed
        self.rng = np.random.default_rng(seed)  # the draws of random search in a shared study
        self.me = shared_study.worker_id(os.path.abspath(run_dir or "."))
        sampler = self._sampler(seed)
        storage = cfg.storage or f"sqlite:///{os.path.join(os.path.abspath(run_dir or '.'), 'study.db')}"
        self.heartbeat: Optional[_Heartbeat] = None
        self._interrupted = None  # a pruned own study's interrupted trial, continued first (see _continued)
        try:
            # heartbeats only where other workers may share the study
            url = storage

            def open_study():
                storage = self.storage = _storage(url, cfg.heartbeat_interval if cfg.storage else None,
                                                  cfg.grace_period)
                return optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                           pruner=make_pruner(cfg), directions=self.directions,
                                           load_if_exists=True)

            self.study = _retry_creation_race(open_study)
        except Exception as err:  # SQLAlchemy's errors (bad URL, server down) share no base class with ours
            what = str(err) if isinstance(err, (ImportError, ValueError, RuntimeError)) else f"{type(err).__name__}: {err}"
            raise ConfigError(f"strategy.storage={cfg.storage!r}: cannot open the Optuna study "
                              f"({' '.join(what.split())}){_storage_hint(str(cfg.storage))}") from None
        if not cfg.storage:
            # this run's own study, resumed: a trial left RUNNING was interrupted with its process (nobody else
            # uses this study).  It is marked failed and interrupted, and its genotype is proposed again next,
            # so the resumed run evaluates exactly what an uninterrupted one would have (see `ask`).
            running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            self._interrupted = self._continued(running)
            for t in running:
                if t is self._interrupted:
                    continue
                if t.user_attrs.get("proposed") and self._complete(t.params):
                    self.study.enqueue_trial(dict(t.params), user_attrs={"resumes": t.number})
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        made = [d.name.lower() for d in self.study.directions]
        if made != self.directions:
            raise ConfigError(f"study {cfg.study_name!r} in {storage} was created to {' / '.join(made)}, this run needs "
                              f"to {' / '.join(self.directions)}")
        if cfg.storage:  # a shared study remembers the sampler of its first worker; another one is said once
            first = self.study.user_attrs.get("sampler")
            if first is None:
                self.study.set_user_attr("sampler", self.sampler_name)
            elif first != self.sampler_name:
                log.warning("study %r was started by a worker proposing with %s; this one proposes with %s, so the "
                            "study mixes both samplers' proposals (intended? else give this worker the other's "
                            "strategy)", cfg.study_name, first, self.sampler_name)

    def _continued(self, running: list):
        """A pruned search's own study, resumed: its interrupted trial (the newest RUNNING one with its params) goes
        on as the same Optuna trial (:meth:`reclaim`), keeping its number (Hyperband's bracket), its reported epochs and
        the rungs it passed; None without a pruner (the trial is proposed again as a new one)."""
        if getattr(self.cfg, "pruner", None) is None:
            return None
        return next((t for t in reversed(running) if t.user_attrs.get("proposed") and self._complete(t.params)), None)

    @property
    def pruner(self) -> Optional[str]:
        """``cfg.pruner`` (multi-fidelity: see :class:`PrunerConfig`)."""
        return getattr(self.cfg, "pruner", None)

    def reporter(self, handle) -> EpochReporter:
        """The per-epoch hook of ``handle``'s training (the Optuna trial of a proposal): see :class:`EpochReporter`."""
        return EpochReporter(handle, self.cfg.trial_epochs)

    def tell_pruned(self, handle, epoch: int, train_tokens: int) -> int:
        """Finish the Optuna trial as PRUNED at ``epoch`` (its value in the study is its last reported one; Optuna's
        best trial, and :meth:`study_best`, never take a pruned one), costing ``train_tokens``
        (:func:`nas.strategies.shared_study.record_pruned`).  Returns the study trial's number."""
        self._stop_heartbeat()
        return shared_study.record_pruned(self.study, handle, epoch, train_tokens)

    def ask(self, poll_seconds: float = 0.5) -> Optional[Proposal]:
        """The study's next proposal (a new Optuna trial).  ``known`` is set when an identical genotype has a
        finished trial in the study (by any worker); when an earlier trial of another worker is still training
        it, this waits for its result rather than training the same genotype twice.

        ``random`` in a shared study draws only genotypes no worker has evaluated or is training (as one worker
        never repeats one); None once every genotype of the space is evaluated (while the last ones are still
        being trained elsewhere, this waits: their worker may die and free them).  A proposal whose trial
        another worker marks failed while this one is choosing it (this worker was paused longer than the grace
        period) is dropped with one log line, and a new one made.  :data:`BUDGET_FULL` (no proposal) when other
        workers filled a shared study's budget since :meth:`stopped` (:meth:`_beyond_budget`).
        """
        # the sampler's random state is a function of the seed and of how many proposals came before (an
        # interrupted one that is proposed again not counted), not of the process's history: a resumed study proposes what an uninterrupted one would
        import optuna

        while True:
            self._fail_stale()
            trials = self.study.get_trials(deepcopy=False)
            resumed = {t.user_attrs.get("resumes") for t in trials} - {None}
            done = sum(1 for t in trials if t.state != optuna.trial.TrialState.WAITING and t.number not in resumed)
            self.study.sampler = self._sampler(int(np.random.SeedSequence([self.seed, done]).generate_state(1)[0]))
            if self.unique:
                if not self.heartbeats:  # a journal: a trial running for far too long belonged to a dead worker
                    trials = [t for t in trials if not (t.state == optuna.trial.TrialState.RUNNING and _stale(t, trials))]
                choice = self._fixed_choice(trials, done)
                if choice is None:
                    return None
                if choice == "wait":
                    time.sleep(poll_seconds)
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.sampler = optuna.samplers.PartialFixedSampler(choice, self.study.sampler)
            proposal = self._propose()
            if proposal is not None:
                return proposal

    @property
    def unique(self) -> bool:
        """Whether proposals never repeat a genotype of the study (random search in a shared or a pruned study;
        evolution's children, :mod:`nas.strategies.evolution`), each chosen by :meth:`_fixed_choice`."""
        return self.sampler_name == "random"

    def _fixed_choice(self, trials, done: int):
        """The decisions of the next proposal when :attr:`unique` (the sampler then only records them): a draw
        among the genotypes the study does not hold (:func:`nas.strategies.shared_study.unseen_choice`; ``"wait"``:
        the only ones left are being trained elsewhere; None: the space is exhausted).  ``trials``: the study's
        trials; ``done``: the proposals made before this one (the per-proposal seed's counter)."""
        # this run's own study (a pruned random search): the draw depends on (seed, proposals so far) alone, so a
        # resumed search draws what an uninterrupted one would
        rng = self.rng if self.cfg.storage else np.random.default_rng([self.seed, done])
        return shared_study.unseen_choice(self.space, self.size, trials, rng)

    def _propose(self) -> Optional[Proposal]:
        """One new trial with its params; None when it was lost (failed by another worker meanwhile, or, for
        :attr:`unique`, an earlier trial drew the same genotype at the same moment: marked FAIL, ``duplicate_of``);
        :data:`BUDGET_FULL` when a shared study's budget was filled meanwhile (:meth:`_beyond_budget`)."""
        import optuna

        with warnings.catch_warnings():  # we record the heartbeats ourselves (see _Heartbeat)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            trial = self.study.ask()
        if self.heartbeats:  # from now until tell(): other workers see this trial alive
            self.heartbeat = _Heartbeat(self.storage, trial._trial_id, self.cfg.heartbeat_interval)
        if self.cfg.storage and self._beyond_budget(trial.number):
            try:
                trial.set_user_attr("over_budget", True)
                self._stop_heartbeat()
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except shared_study._finished_error():
                pass  # failed already by another worker (this one was paused): discarded either way
            self._stop_heartbeat()
            log.info("trial %d of study %r is beyond the budget of %d trials (other workers took the last places "
                     "since this one looked): marked failed, not trained", trial.number, self.cfg.study_name,
                     self.cfg.trials)
            return BUDGET_FULL
        try:
            # define-by-run: only the active decisions become the trial's params
            choice = sample_decisions(self.space, lambda name, choices: trial.suggest_categorical(name, list(choices)))
            trial.set_user_attr("worker", self.me)
            trial.set_user_attr("proposed", True)  # its params are complete: other workers may compare with them
            twin = self._earlier_twin(choice, trial.number) if self.unique else None
            if twin is not None:
                trial.set_user_attr("duplicate_of", twin)
                self._stop_heartbeat()
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                return None
        except shared_study._finished_error():
            self._stop_heartbeat()
            log.warning("trial %d of study %r was marked failed by another worker while this one was proposing it "
                        "(paused longer than grace_period): proposing again", trial.number, self.cfg.study_name)
            return None
        return Proposal(self.space.from_decisions(choice), trial, self._result_of(choice, trial.number))

    def _beyond_budget(self, number: int) -> bool:
        """Whether a shared study's new trial ``number`` has no place in the budget (``cfg.trials``): the trials
        numbered before it that are evaluated (:func:`nas.strategies.shared_study.holds`) or running (their params
        chosen or not) fill it already.  :meth:`stopped` and :meth:`ask` are two calls, so two workers can both find
        the last place free; the storage numbers their trials in order, so the earlier trial keeps the place and the
        later one is found beyond it here (marked FAIL, ``over_budget``).  A running trial that fails later (its
        worker died, a duplicate draw) frees its place for the next ``stopped()``."""
        import optuna

        State = optuna.trial.TrialState
        earlier = [t for t in self.study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED,
                                                                            State.RUNNING, State.FAIL))
                   if t.number < number]
        taken = sum((t.state == State.RUNNING and not t.user_attrs.get("over_budget"))
                    or shared_study.holds(t) == "done" for t in earlier)
        return taken >= self.cfg.trials

    def _complete(self, params: dict) -> bool:
        """Whether a trial's params are a whole draw: every active decision, nothing else."""
        return active_decisions(self.space, params) == dict(params)

    def _earlier_twin(self, choice: dict, number: int, poll_seconds: float = 0.2) -> Optional[int]:
        """The number of an earlier trial that holds the same genotype (evaluated, or being trained), else None;
        waits (up to 30 s) for earlier trials still choosing their params."""
        import optuna

        State = optuna.trial.TrialState
        key = shared_study._key(choice)
        deadline = time.time() + 30.0
        while True:
            earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < number]
            twins = [t.number for t in earlier if shared_study._key(t.params) == key and shared_study.holds(t)]
            if twins:
                return twins[0]
            if time.time() > deadline or not any(t.state == State.RUNNING and not t.user_attrs.get("proposed")
                                                 for t in earlier):
                return None
            time.sleep(poll_seconds)

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _sampler(self, seed: int):
        if self.sampler_name in ("random", "evolution"):  # (evolution fixes every decision; see _fixed_choice)
            import optuna

            return optuna.samplers.RandomSampler(seed=seed)
        return _sampler(self.cfg, seed)

    @property
    def heartbeats(self) -> bool:
        """Whether running trials are kept alive by heartbeats (a shared RDB storage), so a dead worker's trial
        is told apart from a slow one."""
        interval = getattr(self.storage, "get_heartbeat_interval", None)  # RDBStorage's; a journal has none
        return interval is not None and interval() is not None

    def _fail_stale(self) -> None:
        """Mark FAIL the running trials whose heartbeat stopped (their worker died), with a warning naming them."""
        if not self.heartbeats:
            return
        import optuna

        State = optuna.trial.TrialState
        running = {t.number for t in self.study.get_trials(deepcopy=False, states=(State.RUNNING,))}
        if not running:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        failed = [t.number for t in self.study.get_trials(deepcopy=False, states=(State.FAIL,)) if t.number in running]
        for number in failed:
            log.warning("trial %d of study %r sent no heartbeat for %s s (its worker died, or is paused: one that comes "
                        "back keeps its result as a new trial): marked failed; the study goes on without it", number, self.cfg.study_name, self.storage.get_heartbeat_interval() * 2
                        if self.cfg.grace_period is None else self.cfg.grace_period)

    def _result_of(self, choice: dict, number: int, poll_seconds: float = 0.2) -> Optional[float]:
        """The value of an earlier trial with the same decisions; None when there is none (or it failed).

        Only earlier-numbered trials count (the earlier one trains, so two workers never wait for each other).
        A trial still choosing its params is waited for (up to 30 s); a running twin is waited for unless it
        has run more than twice as long as the longest finished trial plus a minute (its worker has died).
        """
        import optuna

        State = optuna.trial.TrialState
        proposal_deadline = time.time() + 30.0
        while True:
            trials = self.study.get_trials(deepcopy=False, states=(State.COMPLETE, State.RUNNING))
            earlier = [t for t in trials if t.number < number]
            done = [t for t in earlier if t.state == State.COMPLETE and t.params == choice]
            if done:
                return _study_value(done[0])
            choosing = [t for t in earlier if t.state == State.RUNNING and not t.user_attrs.get("proposed")]
            running = [t for t in earlier if t.state == State.RUNNING and t.user_attrs.get("proposed")
                       and t.params == choice and (self.heartbeats or not _stale(t, trials))]
            if not running and (not choosing or time.time() > proposal_deadline):
                return None
            time.sleep(poll_seconds)
            self._fail_stale()

    def tell(self, handle, value: Optional[float], train_tokens: int = 0) -> int:
        """Finish the Optuna trial with ``value`` (None or non-finite: the trial is marked failed), costing
        ``train_tokens``.  A trial another worker marked failed meanwhile keeps its result as a new trial
        (:func:`nas.strategies.shared_study.record_result`).  Returns the number of the study trial that holds
        the result."""
        self._stop_heartbeat()
        return shared_study.record_result(self.study, handle, value, train_tokens)

    def reclaim(self, recorded: set) -> Optional[Proposal]:
        """After ``resume=`` of a worker of a shared study: its trials that its ``trials.jsonl`` does not record
        (``recorded``: the study trial numbers it does) were cut off when it was killed.  The newest one with its
        params is returned as the proposal to finish first (the engine's next trial dir is that trial's, so its
        checkpoint is resumed when it has one), whatever its state now: a result for a trial failed meanwhile is
        added as a new one, one told before the kill is not told twice.  The others still RUNNING are marked FAIL
        now rather than after the grace period.  None when nothing is to be resumed (and always for this run's
        own study, which re-proposes an interrupted trial itself)."""
        import optuna

        if not self.cfg.storage:
            return self._take_interrupted()
        State = optuna.trial.TrialState
        mine = shared_study.own_trials(self.study, self.me, recorded)
        match = next((t for t in reversed(mine) if t.user_attrs.get("proposed") and self._complete(t.params)), None)
        for t in mine:
            if t is not match and t.state == State.RUNNING:
                try:
                    self.study.tell(t.number, state=State.FAIL)
                    log.info("trial %d of study %r was this worker's, cut off when it stopped: marked failed", t.number,
                             self.cfg.study_name)
                except shared_study._finished_error():
                    pass  # another worker failed it first
        if match is None:
            return None
        trial = optuna.trial.Trial(self.study, match._trial_id)
        if match.state == State.RUNNING and self.heartbeats:
            self.heartbeat = _Heartbeat(self.storage, match._trial_id, self.cfg.heartbeat_interval)
        log.info("resuming trial %d of study %r (%s now), this worker's trial cut off when it stopped", match.number,
                 self.cfg.study_name, match.state.name)
        known = None if match.state == State.COMPLETE else self._result_of(dict(match.params), match.number)
        return Proposal(self.space.from_decisions(match.params), trial, known)

    def _take_interrupted(self) -> Optional[Proposal]:
        """This run's own pruned study, resumed: the interrupted trial (see :meth:`_continued`) as the proposal to
        finish first (once); None when there is none."""
        import optuna

        match, self._interrupted = self._interrupted, None
        if match is None:
            return None
        log.info("resuming trial %d of the study (interrupted), as the same trial", match.number)
        return Proposal(self.space.from_decisions(match.params), optuna.trial.Trial(self.study, match._trial_id))

    def spent_tokens(self) -> Optional[int]:
        """The training tokens of every worker's results in a shared study (each result once), for a study-wide
        ``budget_tokens``; None for this run's own study (the worker's ``trials.jsonl`` counts them)."""
        return shared_study.spent_tokens(self.study) if self.cfg.storage else None

    def study_best(self):
        """``(value, genotype)`` of the best finished trial of a *shared* study (any worker's), or None for this
        run's own study or before any trial finished."""
        import optuna

        if not self.cfg.storage:
            return None
        done = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.values and math.isfinite(_first_value(t))]
        if not done:
            return None
        best = (min if self.direction == "minimize" else max)(done, key=_first_value)
        return _first_value(best), self.space.from_decisions(best.params)

    def stopped(self, completed: int, poll_seconds: float = 1.0) -> bool:
        """The study's budget (``trials`` evaluated trials: finished, pruned -- as ASHA and Hyperband count the
        configurations started --, or failed by their own training, e.g. a diverged one, as one worker's random
        search counts them) is shared by every worker.  While the evaluated
        ones fall short but other workers' running trials would fill the budget, this waits: for their results, or
        (with heartbeats) until a dead worker's trial is marked failed (not evaluated: it does not count) and this
        worker takes its place.  Without heartbeats (a journal file), evaluated plus running trials count."""
        import optuna

        State = optuna.trial.TrialState
        while True:
            self._fail_stale()
            trials = self.study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.RUNNING,
                                                                   State.FAIL))
            done = sum(t.state != State.RUNNING and shared_study.holds(t) == "done" for t in trials)
            running = sum(t.state == State.RUNNING for t in trials)
            if done >= self.cfg.trials:
                return True
            if done + running < self.cfg.trials:
                return False
            if not self.heartbeats:
                return True
            time.sleep(poll_seconds)


def _first_value(trial) -> float:
    """A finished trial's (first) objective value: its metric (``strategy.objectives`` start with it)."""
    return trial.values[0]


def _study_value(trial):
    """A finished trial's result as the engine takes it: its value, or the list of its values (several objectives)."""
    return trial.values[0] if len(trial.values) == 1 else list(trial.values)


def _sampler(cfg, seed: int):
    import optuna

    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials,
                                         warn_independent_sampling=False)
    if cfg.sampler == "nsga2":  # generations of n_startup_trials (its first generation: random draws)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, cfg.n_startup_trials))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True)


def _stale(trial, trials) -> bool:
    """A running trial that has run more than twice as long as the longest finished one, plus a minute."""
    import datetime

    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    limit = 2 * max(durations, default=1800.0) + 60.0
    return (datetime.datetime.now() - trial.datetime_start).total_seconds() > limit


def _storage_hint(url: str) -> str:
    """What to try for a storage URL that did not open (empty when nothing specific applies)."""
    if url.startswith("postgres:"):
        return " (SQLAlchemy spells the scheme postgresql://)"
    if url.startswith("postgresql+psycopg2"):
        return " (this URL needs the psycopg2 driver: pip install psycopg2-binary; plain postgresql:// uses psycopg 3)"
    if url.startswith("postgresql"):
        return " (a PostgreSQL URL needs a driver and a reachable server: pip install 'psycopg[binary]')"
    return ""


#: what a storage says when another worker created its tables or the study a moment earlier
_RACE_MESSAGES = ("UNIQUE constraint failed", "already exists", "duplicate key", "database is locked")


def _retry_creation_race(open_study, attempts: int = 8):
    """``open_study()``, tried again when it lost a race with another worker creating the same storage tables or
    study (SQLAlchemy's IntegrityError / OperationalError naming a unique key or an existing table): the second
    try finds them made.  Any other error, or the race lost ``attempts`` times, is raised."""
    for attempt in range(attempts):
        try:
            return open_study()
        except Exception as err:  # SQLAlchemy's errors share no base class with ours
            if attempt == attempts - 1 or not any(m in str(err) for m in _RACE_MESSAGES):
                raise
            time.sleep(0.05 * (attempt + 1) * (1 + np.random.default_rng().random()))


#: seconds a worker waits for a SQLite study file that another (paused) worker holds locked
SQLITE_LOCK_WAIT = 3600.0


def _storage(url: str, heartbeat_interval: Optional[int] = None, grace_period: Optional[int] = None):
    """An Optuna storage for ``url``: ``journal:<file>`` gives a journal file (no heartbeats), anything else an RDB
    URL, with heartbeats every ``heartbeat_interval`` seconds when given."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    with warnings.catch_warnings():  # (heartbeats are "experimental" in Optuna 4-5, stable since Optuna 2)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # SQLite: a worker paused (SIGSTOP, a scheduler's suspend) in the middle of a write keeps the file locked
        # until it continues; the others wait for it (up to an hour) instead of failing after SQLite's 5 s
        kwargs = {"connect_args": {"timeout": SQLITE_LOCK_WAIT}} if url.startswith("sqlite") else None
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                          grace_period=grace_period if heartbeat_interval else None)


class _Heartbeat:
    """Records a running trial's heartbeat in the storage every ``interval`` seconds from a daemon thread, until
    :meth:`stop` (``storage.record_heartbeat``, what ``study.optimize`` does for its own trials; ask-and-tell
    code has to do it itself)."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        storage.record_heartbeat(trial_id)
        self._thread = threading.Thread(target=self._run, name=f"optuna-heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # a storage hiccup must not kill the trial; the next beat retries
                log.warning("heartbeat of trial %d not recorded: %s", self.trial_id, err)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
