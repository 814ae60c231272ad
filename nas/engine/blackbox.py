"""The black-box search loop (``strategy=random|bayesian``) and the trial record every strategy writes.

Each trial: the strategy proposes a genotype, :func:`train_trial` retrains it from scratch with the code of
``train.py`` for the strategy's per-trial budget (``trial_epochs``, ``trial_limit_train_batches``) at the
search config's model size, and its best validation metric (perplexity, or held-out accuracy on SST-2) goes
back to the strategy.  The test split is never scored during a search.  The best genotype is written as
``genotype.json``, so ``train.py arch=<run dir>`` retrains it like a DARTS result.

``trials.jsonl`` (one JSON object per line, appended and flushed after each candidate, by every strategy):
``{"strategy", "trial", "genotype", "metric", "value", "wall_seconds", "train_tokens", "cum_wall_seconds",
"cum_train_tokens", "seed", "best_value"}`` -- ``train_tokens`` counts training target tokens (LM) or the words of
the training sentences (classification), the one cost currency of all strategies.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, NamedTuple, Optional

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from nas.atomic import atomic_write_text
from nas.engine.common import run_dir_from_hydra
from nas.engine.tb import log_genotype, log_genotype_figure
from nas.genotype import Genotype
from nas.spaces import build_space
from nas.strategies import STRATEGIES

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.jsonl"


class TrialResult(NamedTuple):
    """One evaluated candidate: validation ``value`` (None: the trial failed), its cost, and where it ran."""

    value: Optional[float]
    wall_seconds: float
    train_tokens: int
    run_dir: Optional[str] = None


def task_metric(cfg):
    """``(metric name, direction)`` of the configured dataset: valid ppl (minimize) or accuracy (maximize)."""
    from nas.engine.classify import is_classification

    return ("valid_accuracy", "maximize") if is_classification(cfg) else ("valid_ppl", "minimize")


def better(a: Optional[float], b: Optional[float], direction: str) -> bool:
    """True when value ``a`` beats ``b`` (None never beats anything; anything beats None)."""
    if a is None or not math.isfinite(a):
        return False
    if b is None:
        return True
    return a < b if direction == "minimize" else a > b


class TrialLog:
    """Appends the common per-candidate record to ``trials.jsonl`` and logs best-so-far against cost to
    TensorBoard (``search/best_vs_tokens`` with step = cumulative training tokens, ``search/best_vs_seconds``
    with step = cumulative wall seconds, ``search/value`` per trial)."""

    def __init__(self, run_dir: str, strategy: str, metric: str, direction: str, seed: int, writer=None):
        self.path = os.path.join(run_dir, TRIALS_FILE)
        self.strategy, self.metric, self.direction, self.seed = strategy, metric, direction, seed
        self.writer = writer
        self.n, self.cum_wall, self.cum_tokens, self.best, self.best_genotype = 0, 0.0, 0, None, None
        self.genotypes: list = []

    def resume(self) -> int:
        """Continue an existing ``trials.jsonl`` of this run dir (a resumed study): trial numbers, cumulative
        cost and the best so far carry on.  Returns the number of records found."""
        if not os.path.isfile(self.path):
            return 0
        with open(self.path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        for r in records:
            self.n, self.cum_wall, self.cum_tokens = r["trial"], r["cum_wall_seconds"], r["cum_train_tokens"]
            genotype = Genotype.from_dict(r["genotype"])
            self.genotypes.append(genotype)
            if better(r["value"], self.best, self.direction):
                self.best, self.best_genotype = r["value"], genotype
        return len(records)

    def add(self, genotype: Genotype, value: Optional[float], wall_seconds: float, train_tokens: int,
            **extra) -> dict:
        self.n += 1
        self.cum_wall += wall_seconds
        self.cum_tokens += int(train_tokens)
        if better(value, self.best, self.direction):
            self.best, self.best_genotype = value, genotype
        record = {"strategy": self.strategy, "trial": self.n, "genotype": genotype.to_dict(), "metric": self.metric,
                  "value": value, "wall_seconds": wall_seconds, "train_tokens": int(train_tokens),
                  "cum_wall_seconds": self.cum_wall, "cum_train_tokens": self.cum_tokens, "seed": self.seed,
                  "best_value": self.best, **extra}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None and self.best is not None:
            self.writer.add_scalar("search/best_vs_tokens", self.best, self.cum_tokens)
            self.writer.add_scalar("search/best_vs_seconds", self.best, int(self.cum_wall))
            if value is not None:
                self.writer.add_scalar("search/value", value, self.n)
            self.writer.flush()
        return record


def trial_config(cfg, arch: str):
    """The ``train.py`` config of one trial: the search config's data, model size, optimizer settings and seed,
    with the strategy's per-trial epochs and batch cap, eager (``compile=false``), no progress bar."""
    from nas.config import TrainConfig

    base = OmegaConf.structured(TrainConfig)
    keys = {f.name for f in dataclasses.fields(TrainConfig)}  # (`in` on the config is False for MISSING ones)
    shared = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k in keys and k not in ("strategy", "arch")}
    s = cfg.strategy
    # eager: every trial is a new genotype, which torch.compile would compile anew (a minute or more each)
    return OmegaConf.merge(base, shared, {"arch": arch, "epochs": s.trial_epochs, "progress": False,
                                          "limit_train_batches": s.trial_limit_train_batches
                                          if s.trial_limit_train_batches is not None else cfg.limit_train_batches,
                                          "compile": False})


def train_trial(cfg, genotype: Genotype, trial_dir: str) -> TrialResult:
    """Retrain ``genotype`` for the per-trial budget (``train.py``'s code, test split not scored)."""
    from nas.engine.train import train

    os.makedirs(trial_dir, exist_ok=True)
    arch = os.path.join(trial_dir, "candidate.json")
    genotype.save(arch)
    start = time.time()
    m = train(trial_config(cfg, arch), run_dir=trial_dir, score_test=False)
    value = m.get("best_valid_accuracy", m.get("best_valid_ppl"))
    tokens = m.get("train_tokens", 0)
    return TrialResult(value if value is not None and math.isfinite(value) else None, time.time() - start,
                       tokens, trial_dir)


def search_black_box(cfg, run_dir: Optional[str] = None,
                     evaluate: Optional[Callable[[Genotype, str], TrialResult]] = None) -> dict:
    """Run a black-box search (random or Bayesian) as configured; returns the metrics of ``metrics.json``.

    Args:
        cfg: a composed SearchConfig with ``strategy=random|bayesian``.
        run_dir: output folder (default: the Hydra run directory).
        evaluate: ``f(genotype, trial_dir) -> TrialResult`` (default :func:`train_trial`; tests pass a toy
            objective).
    Outputs in ``run_dir``: ``trials.jsonl``, ``trials/NNNN/`` (each trial's train.py outputs),
        ``genotype.json`` and ``genotype.png`` (the best), ``metrics.json``, ``tb/``, ``config.yaml``,
        ``study.db`` (bayesian with the default storage).
    Raises:
        ConfigError: a bad budget, sampler or storage.  RuntimeError: every trial failed.
    """
    run_dir = run_dir or run_dir_from_hydra()
    os.makedirs(run_dir, exist_ok=True)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_text(os.path.join(run_dir, "config.yaml"), cfg_yaml)
    metric, direction = task_metric(cfg)
    space = build_space(cfg.space)
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, space, seed=cfg.seed, direction=direction,
                                                 run_dir=run_dir)
    evaluate = evaluate or (lambda g, d: train_trial(cfg, g, d))
    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    writer.add_text("config", f"```\n{cfg_yaml}\n```", 0)
    trials = TrialLog(run_dir, cfg.strategy.name, metric, direction, cfg.seed, writer)
    if trials.resume():
        log.info("resuming: %d trials in %s, best %s so far %s", trials.n, trials.path, metric, trials.best)
        if hasattr(strategy, "mark_seen"):
            strategy.mark_seen(trials.genotypes)
    log.info("search: space=%s strategy=%s%s on %s: up to %d trials of %d epoch(s)%s, %s genotypes in the space, "
             "run dir %s", cfg.space.name, cfg.strategy.name,
             f" (sampler {cfg.strategy.sampler})" if "sampler" in cfg.strategy else "", cfg.dataset.name, cfg.strategy.trials,
             cfg.strategy.trial_epochs, f", budget {cfg.strategy.budget_tokens} tokens"
             if cfg.strategy.budget_tokens else "", f"{strategy.size:,}", run_dir)
    start = time.time()
    bar = tqdm(total=cfg.strategy.trials, desc=cfg.strategy.name, unit="trial", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        while not strategy.stopped(trials.n):
            if cfg.strategy.budget_tokens and trials.cum_tokens >= cfg.strategy.budget_tokens:
                log.info("token budget reached (%d >= %d)", trials.cum_tokens, cfg.strategy.budget_tokens)
                break
            proposal = strategy.ask()
            if proposal is None:
                log.info("the space is exhausted after %d genotypes", trials.n)
                break
            if proposal.known is not None:  # the same genotype again (Bayesian): report, do not retrain
                result = TrialResult(proposal.known, 0.0, 0)
            else:
                trial_dir = os.path.join(run_dir, "trials", f"{trials.n + 1:04d}")
                try:
                    result = evaluate(proposal.genotype, trial_dir)
                except Exception:
                    strategy.tell(proposal.handle, None)  # the study marks it failed; a worker never loses it
                    raise
            strategy.tell(proposal.handle, result.value)
            was_best = better(result.value, trials.best, direction)
            trials.add(proposal.genotype, result.value, result.wall_seconds, result.train_tokens,
                       repeated=proposal.known is not None)
            if was_best:
                log_genotype(writer, proposal.genotype, trials.n)
            log.info("trial %d: %s = %s (best %s), %.1f s, %d tokens: %s", trials.n, metric, result.value,
                     trials.best, result.wall_seconds, result.train_tokens, proposal.genotype)
            bar.update(1)
            bar.set_postfix(best=f"{trials.best:.4g}" if trials.best is not None else "-")
    finally:
        bar.close()
    best_genotype = trials.best_genotype
    if best_genotype is None:
        writer.close()
        raise RuntimeError(f"no trial of {cfg.strategy.name} succeeded; see {trials.path}")
    best_genotype.save(os.path.join(run_dir, "genotype.json"))
    log_genotype_figure(writer, best_genotype, trials.n, os.path.join(run_dir, "genotype.png"))
    writer.close()
    wall = time.time() - start
    metrics = {"task": "classification" if metric == "valid_accuracy" else "language_modeling", "metric": metric,
               "strategy": cfg.strategy.name, f"best_{metric}": trials.best,
               "trials": trials.n, "train_tokens": trials.cum_tokens, "wall_seconds": wall,
               "genotype": best_genotype.to_dict()}
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    log.info("done in %.1f s: %d trials, best %s %.4g: %s written to %s", wall, trials.n, metric, trials.best,
             best_genotype, os.path.join(run_dir, "genotype.json"))
    return metrics
