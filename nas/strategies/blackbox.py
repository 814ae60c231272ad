"""Black-box search strategies: random search and Bayesian optimization over a space's genotypes.

A black-box strategy (``kind = "black_box"``) proposes genotypes (``ask``), the engine trains each one as a
discrete model with the retraining code under a fixed per-trial budget and reports its validation metric
(``tell``), and the best one wins (:mod:`nas.engine.blackbox`).  A genotype is a combination of independent
categorical decisions (:meth:`space.decisions`, :func:`nas.genotype.dag_decisions`), which is what both
strategies search over.

* ``random``: each decision uniform, so genotypes are drawn uniformly from the space; never the same genotype
  twice (the search ends when the space is exhausted).  The baseline of Li & Talwalkar 2019 (sec. 4) without
  weight sharing.
* ``bayesian``: an Optuna study (Akiba et al. 2019) whose categorical parameters are the decisions, with the
  Gaussian-process sampler (``sampler=gp``) or TPE (Bergstra et al. 2011; ``sampler=tpe``).  The study lives in
  a storage URL -- default a SQLite file in the run directory, so an interrupted study resumes; any Optuna RDB
  URL (PostgreSQL, MySQL) lets several workers share one study.  A genotype the study proposes again is not
  trained again: its first result is reported (after waiting for it, if another worker is still training it).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from nas.errors import ConfigError
from nas.genotype import Genotype, genotype_count
from nas.strategies import STRATEGIES

DIRECTIONS = ("minimize", "maximize")
SAMPLERS = ("tpe", "gp")


@dataclass
class RandomConfig:
    """``strategy=random``: the per-trial training budget and the number of trials."""

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


@dataclass
class BayesianConfig(RandomConfig):
    """``strategy=bayesian``: :class:`RandomConfig`'s budget, plus the Optuna sampler and storage."""

    name: str = "bayesian"
    #: ``gp`` (Gaussian-process BO, optuna.samplers.GPSampler) or ``tpe`` (optuna.samplers.TPESampler)
    sampler: str = "tpe"
    #: random trials before the model-based proposals start
    n_startup_trials: int = 5
    #: Optuna storage URL; null: ``sqlite:///<run dir>/study.db``.  A journal file (``journal:<path>``)
    #: also works for several workers on one machine.
    storage: Optional[str] = None
    study_name: str = "nas"


class Proposal(NamedTuple):
    """What ``ask`` returns: the genotype to evaluate and the strategy's handle for ``tell``; ``known`` is the
    value of an identical genotype already evaluated (then nothing needs training), else None."""

    genotype: Genotype
    handle: object
    known: Optional[float] = None


def _check_budget(cfg) -> None:
    if cfg.trials < 1:
        raise ConfigError(f"strategy.trials must be >= 1, got {cfg.trials}")
    if cfg.trial_epochs < 1:
        raise ConfigError(f"strategy.trial_epochs must be >= 1, got {cfg.trial_epochs}")
    if cfg.budget_tokens is not None and cfg.budget_tokens < 1:
        raise ConfigError(f"strategy.budget_tokens must be >= 1 or null, got {cfg.budget_tokens}")


@STRATEGIES.register("random", config=RandomConfig)
class RandomStrategy:
    """Uniform random search without repeats.

    Args:
        cfg: :class:`RandomConfig`; space: gives ``decisions()`` / ``from_decisions()``; seed: of the draws;
        direction: ``minimize`` (perplexity) or ``maximize`` (accuracy); run_dir: unused (the interface).
    """

    kind = "black_box"

    def __init__(self, cfg: RandomConfig, space, seed: int = 0, direction: str = "minimize",
                 run_dir: Optional[str] = None):
        _check_budget(cfg)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.cfg, self.space, self.direction = cfg, space, direction
        self.decisions = space.decisions()
        self.size = genotype_count(self.decisions)
        self.rng = np.random.default_rng(seed)
        self.seen: set = set()

    def ask(self) -> Optional[Proposal]:
        """A genotype not proposed before, uniform over the rest of the space; None once it is exhausted."""
        if len(self.seen) >= self.size:
            return None
        while True:  # rejection: uniform over the unseen genotypes (cheap while the space is much larger)
            choice = {name: choices[self.rng.integers(len(choices))] for name, choices in self.decisions}
            genotype = self.space.from_decisions(choice)
            key = genotype.to_json()
            if key not in self.seen:
                self.seen.add(key)
                return Proposal(genotype, key)

    def tell(self, handle, value: Optional[float]) -> None:
        """Random search learns nothing from results (a failed trial: ``value=None``)."""

    def mark_seen(self, genotypes) -> None:
        """Genotypes evaluated before a resume: never proposed again."""
        self.seen.update(g.to_json() for g in genotypes)

    def stopped(self, completed: int) -> bool:
        return completed >= self.cfg.trials


@STRATEGIES.register("bayesian", config=BayesianConfig)
class BayesianStrategy:
    """Bayesian optimization of the genotype's categorical decisions with an Optuna study.

    Args: as :class:`RandomStrategy`; ``run_dir`` holds the default SQLite study.
    Raises:
        ConfigError: unknown sampler, or a storage URL Optuna cannot open.
    """

    kind = "black_box"

    def __init__(self, cfg: BayesianConfig, space, seed: int = 0, direction: str = "minimize",
                 run_dir: Optional[str] = None):
        import optuna

        _check_budget(cfg)
        if cfg.sampler not in SAMPLERS:
            raise ConfigError(f"strategy.sampler={cfg.sampler!r}; valid: {', '.join(SAMPLERS)}")
        self.cfg, self.space, self.direction = cfg, space, direction
        self.decisions = space.decisions()
        self.size = genotype_count(self.decisions)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if cfg.storage:
            # a shared study: workers started with the same seed would propose the same genotypes in the same
            # order, so each seeds its sampler apart (a multi-worker study is not reproducible anyway)
            seed = int.from_bytes(os.urandom(4), "little") ^ seed
        self.seed = seed
        sampler = _sampler(cfg, seed)
        storage = cfg.storage or f"sqlite:///{os.path.join(os.path.abspath(run_dir or '.'), 'study.db')}"
        try:
            storage = _storage(storage)
            self.study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler,
                                             direction=direction, load_if_exists=True)
        except (ImportError, ValueError, RuntimeError) as err:
            hint = (" (a PostgreSQL URL needs a driver: pip install psycopg2-binary)"
                    if str(cfg.storage).startswith("postgresql") else "")
            raise ConfigError(f"strategy.storage={cfg.storage!r}: cannot open the Optuna study ({err}){hint}") \
                from None
        except Exception as err:  # SQLAlchemy's errors (bad URL, server down) share no base class with ours
            raise ConfigError(f"strategy.storage={cfg.storage!r}: cannot open the Optuna study "
                              f"({type(err).__name__}: {err})") from None
        if not cfg.storage:
            # this run's own study, resumed: a trial left RUNNING was interrupted with its process (nobody else
            # uses this study).  It is marked failed and interrupted, and its genotype is proposed again next,
            # so the resumed run evaluates exactly what an uninterrupted one would have (see `ask`).
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.user_attrs.get("proposed") and len(t.params) == len(self.decisions):
                    self.study.enqueue_trial(dict(t.params), user_attrs={"resumes": t.number})
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if self.study.direction.name.lower() != direction:
            raise ConfigError(f"study {cfg.study_name!r} in {storage} was created to {self.study.direction.name.lower()}"
                              f", this run needs to {direction}")

    def ask(self) -> Optional[Proposal]:
        """The study's next proposal (a new Optuna trial).  ``known`` is set when an identical genotype has a
        finished trial in the study (by any worker); when an earlier trial of another worker is still training
        it, this waits for its result rather than training the same genotype twice."""
        # the sampler's random state is a function of the seed and of how many proposals came before (an
        # interrupted one that is proposed again not counted), not of the process's history: a resumed study proposes what an uninterrupted one would
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        resumed = {t.user_attrs.get("resumes") for t in trials} - {None}
        done = sum(1 for t in trials if t.state != optuna.trial.TrialState.WAITING and t.number not in resumed)
        self.study.sampler = _sampler(self.cfg, int(np.random.SeedSequence([self.seed, done]).generate_state(1)[0]))
        trial = self.study.ask()
        choice = {name: trial.suggest_categorical(name, list(choices)) for name, choices in self.decisions}
        trial.set_user_attr("proposed", True)  # its params are complete: other workers may compare with them
        return Proposal(self.space.from_decisions(choice), trial, self._result_of(choice, trial.number))

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
                return done[0].value
            choosing = [t for t in earlier if t.state == State.RUNNING and not t.user_attrs.get("proposed")]
            running = [t for t in earlier if t.state == State.RUNNING and t.user_attrs.get("proposed")
                       and t.params == choice and not _stale(t, trials)]
            if not running and (not choosing or time.time() > proposal_deadline):
                return None
            time.sleep(poll_seconds)

    def tell(self, handle, value: Optional[float]) -> None:
        """Finish the Optuna trial with ``value`` (None or non-finite: the trial is marked failed)."""
        import optuna

        if value is None or not math.isfinite(value):
            self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(handle, value)

    def stopped(self, completed: int) -> bool:
        """The study's budget is shared by every worker: finished plus running trials count."""
        import optuna

        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        return len(self.study.get_trials(deepcopy=False, states=states)) >= self.cfg.trials


def _sampler(cfg, seed: int):
    import optuna

    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials,
                                         warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True)


def _stale(trial, trials) -> bool:
    """A running trial that has run more than twice as long as the longest finished one, plus a minute."""
    import datetime

    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    limit = 2 * max(durations, default=1800.0) + 60.0
    return (datetime.datetime.now() - trial.datetime_start).total_seconds() > limit


def _storage(url: str):
    """An Optuna storage for ``url``: ``journal:<file>`` gives a journal file, anything else an RDB URL."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    return optuna.storages.RDBStorage(url)
