"""The black-box search loop (``strategy=random|bayesian``), written once for every task.

Each trial: the strategy proposes a genotype, :func:`train_trial` retrains it from scratch with the code of
``train.py`` for the strategy's per-trial budget (``trial_epochs``, ``trial_limit_train_batches``) at the
search config's model size, and its best validation metric (perplexity, or held-out accuracy on SST-2) goes
back to the strategy.  The test split is never scored during a search.  The best genotype is written as
``genotype.json``, so ``train.py arch=<run dir>`` retrains it like a DARTS result.

Every candidate is recorded in ``trials.jsonl`` (:mod:`nas.engine.trials`).  A candidate whose training diverges
(:class:`nas.errors.NonFiniteLossError` under ``nan_policy=stop``) is a failed trial (value None, its cost
counted) and the search goes on; any other error ends it.

Multi-fidelity (``strategy.pruner``, :class:`nas.strategies.blackbox.PrunerConfig`): each trial reports its value
after every epoch to the study's pruner (``evaluate``'s ``report`` hook, :func:`train_trial`), which may stop it at
a rung; a pruned trial is recorded with ``"pruned": <epoch>`` and the tokens it trained on, counts as one of
``strategy.trials`` and in ``budget_tokens``, and is never the best (its value is not a finished result).
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
from nas.engine.progress import silenced
from nas.engine.resume import Clock, Interrupted, interrupted, open_run, stop_requested, stop_signals
from nas.engine.rundir import scoped
from nas.engine.tb import log_genotype, log_genotype_figure
from nas.engine.trials import RESULTS_FILE, TRIALS_FILE, TrialLog, better  # noqa: F401  (TRIALS_FILE: the file every strategy writes)
from nas.errors import NonFiniteLossError, SearchFailed
from nas.genotype import Genotype
from nas.spaces import build_space
from nas.strategies import STRATEGIES
from nas.strategies.blackbox import BUDGET_FULL, OBJECTIVES, check_objective, check_objectives
from nas.tasks import make_task

log = logging.getLogger(__name__)

class TrialResult(NamedTuple):
    """One evaluated candidate: validation ``value`` (None: the trial failed), its cost, where it ran, and
    ``figures``: the three evaluations of the kept epoch, ``{"accuracy", "cross_entropy", "params"}`` (held-out
    accuracy, cross-entropy in nats, parameter count; None: not measured, e.g. a toy objective)."""

    value: Optional[float]
    wall_seconds: float
    train_tokens: int
    run_dir: Optional[str] = None
    figures: Optional[dict] = None
    #: the epoch the pruner stopped the trial at (``value``: its value there, not a finished result); None: it ran
    #: every epoch
    pruned: Optional[int] = None


def scored_objective(cfg) -> Optional[str]:
    """The figure a trial's ``value`` is: ``strategy.objective``, or the first of ``strategy.objectives`` (a Pareto
    search); None: the task's metric.  Raises ConfigError for a bad ``objectives`` list."""
    objectives = cfg.strategy.get("objectives")
    if objectives:
        check_objectives(cfg.strategy)
        return None if objectives[0] == "metric" else objectives[0]
    return cfg.strategy.get("objective")


def task_metric(cfg, task=None):
    """``(metric name, direction)`` a black-box search scores trials by: the task's metric (e.g.
    ``("valid_ppl", "minimize")``), or the one ``strategy.objective`` names (e.g. ``("valid_cross_entropy",
    "minimize")``), or the first of ``strategy.objectives``.  Raises ConfigError for an unknown objective."""
    objective = scored_objective(cfg)
    if objective is None:
        task = task if task is not None else make_task(cfg)
        return f"valid_{task.metric}", task.direction
    check_objective(objective)
    return OBJECTIVES[objective][:2]


def trial_figures(cfg, m: dict) -> tuple:
    """``(value, figures)`` of a finished trial's ``metrics.json`` ``m``: the objective's value and the three
    evaluations (accuracy, cross-entropy, params) of the epoch it picks.  The task's metric and ``params`` take
    retraining's kept epoch; ``accuracy`` / ``cross_entropy`` the epoch with the best held-out value of that
    figure (so a trial's value and its figures come from one epoch)."""
    objective = scored_objective(cfg)
    kept = {k: m.get(name) for k, (name, _, _) in OBJECTIVES.items()}
    if objective is None:
        return m[f"best_{task_metric(cfg)[0]}"], kept
    name, direction, key = OBJECTIVES[objective]
    if key is None:
        return m.get(name), kept
    best = None
    for h in m.get("history", []):
        if better(h.get(key), None if best is None else best[key], direction):
            best = h
    if best is None:
        return None, kept
    return best[key], {k: best.get(hkey) if hkey else m.get(name) for k, (name, _, hkey) in OBJECTIVES.items()}


def trial_config(cfg, arch: str):
    """The ``train.py`` config of one trial: the search config's data, model size, optimizer settings and seed,
    with the strategy's per-trial epochs and batch cap, eager (``compile=false``), no progress bar."""
    from nas.config import TrainConfig

    base = OmegaConf.structured(TrainConfig)
    keys = {f.name for f in dataclasses.fields(TrainConfig)}  # (`in` on the config is False for MISSING ones)
    shared = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k in keys and k not in ("strategy", "arch", "resume")}
    s = cfg.strategy
    # eager: every trial is a new genotype, which torch.compile would compile anew (a minute or more each)
    return OmegaConf.merge(base, shared, {"arch": arch, "epochs": s.trial_epochs, "progress": False,
                                          "limit_train_batches": s.trial_limit_train_batches
                                          if s.trial_limit_train_batches is not None else cfg.limit_train_batches,
                                          "compile": False})


def train_trial(cfg, genotype: Genotype, trial_dir: str, seed: Optional[int] = None, report=None) -> TrialResult:
    """Retrain ``genotype`` for the per-trial budget (``train.py``'s code, test split not scored); ``seed``: its
    training seed (None: the search's ``seed``); ``report``: a pruned search's per-epoch hook
    (:class:`nas.strategies.blackbox.EpochReporter`): after each epoch it gets the trial's value so far (as
    :func:`trial_figures` reads it) and may stop the training there (the result's ``pruned``: that epoch).

    A trial dir left by an interrupted search is reused: a finished trial of the same genotype is read back, an
    unfinished one resumes from its checkpoint, anything else is cleared and the trial starts over.
    Raises:
        nas.engine.resume.Interrupted: SIGINT/SIGTERM during the trial (its checkpoint was written).
    """
    import shutil

    from nas.engine.resume import CHECKPOINT, run_dir_status
    from nas.engine.train import train

    arch = os.path.join(trial_dir, "candidate.json")
    overrides = {}
    status = run_dir_status(trial_dir)
    same = status and os.path.isfile(arch) and Genotype.load(arch) == genotype
    if same and status == "finished":
        with open(os.path.join(trial_dir, "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
    else:
        if same and os.path.isfile(os.path.join(trial_dir, CHECKPOINT)):
            overrides = {"resume": trial_dir}
            log.info("resuming the interrupted trial in %s", trial_dir)
        elif os.path.isdir(trial_dir):
            shutil.rmtree(trial_dir)  # what an interrupted trial left before its first checkpoint
        if not overrides:
            os.makedirs(trial_dir, exist_ok=True)
            genotype.save(arch)
        on_epoch = None if report is None else (lambda epoch, m: report.report(epoch, trial_figures(cfg, m)[0]))
        with silenced():  # the search logs a line per trial; the trial's own progress lines would bury them
            m = train(OmegaConf.merge(trial_config(cfg, arch), {} if seed is None else {"seed": seed}, overrides),
                      run_dir=trial_dir, score_test=False, on_epoch=on_epoch)
    value, figures = trial_figures(cfg, m)
    tokens = m.get("train_tokens", 0)
    return TrialResult(value if value is not None and math.isfinite(value) else None, m["wall_seconds"],
                       tokens, trial_dir, figures, m.get("stopped_at_epoch"))


#: a Pareto search's front (``strategy.objectives``): its trials, best first objective first
PARETO_FILE = "pareto.json"


def objective_values(cfg, result: TrialResult) -> Optional[list]:
    """A Pareto search's values of ``result`` in the order of ``strategy.objectives`` (``metric``, first: its
    ``value``; the others: its figures, of the same epoch; :func:`trial_figures`), or None: one objective, or a
    failed / pruned trial, or a figure not measured."""
    objectives = cfg.strategy.get("objectives")
    if not objectives or result.value is None or result.pruned is not None:
        return None
    values = [result.value] + [(result.figures or {}).get(name) for name in objectives[1:]]
    return None if any(v is None or not math.isfinite(v) for v in values) else [float(v) for v in values]


def known_figures(cfg, known) -> Optional[dict]:
    """The figures an earlier trial's study values carry (several objectives: the ones named by
    ``strategy.objectives``), for a repeated proposal this worker has no record of."""
    if not isinstance(known, list):
        return None
    return {name: v for name, v in zip(cfg.strategy.objectives, known) if name in OBJECTIVES}


def strategy_directions(strategy) -> list:
    """The direction of each objective (the strategy's study's; random search alone: from its config)."""
    from nas.strategies.blackbox import objective_directions

    return list(getattr(strategy, "directions", None) or objective_directions(strategy.cfg, strategy.direction))


def pareto_front(records: list, objectives: list, directions: list) -> list:
    """The records (``trials.jsonl``'s) of the non-dominated trials among those with every objective's value
    (:func:`nas.strategies.evolution.non_dominated_ranks`), best first objective first (ties: by the next
    objectives); a genotype repeated counts once."""
    from nas.strategies.evolution import non_dominated_ranks

    seen, scored = set(), []
    for r in records:
        values = r.get("objectives")
        key = Genotype.from_dict(r["genotype"]).key()
        if values and key not in seen:
            seen.add(key)
            scored.append(r)
    ranks = non_dominated_ranks([[r["objectives"][n] for n in objectives] for r in scored], directions)
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    # best first objective first; a tie on it goes to the better next objective (a front member with the same metric
    # and more parameters is not the one to retrain)
    return sorted((r for r, k in zip(scored, ranks) if k == 0),
                  key=lambda r: [s * r["objectives"][n] for s, n in zip(signs, objectives)])


def write_pareto(run_dir: str, records: list, front: list, objectives: list, directions: list) -> None:
    """Write ``front`` (the records :func:`pareto_front` picks from ``records``) as ``pareto.json`` (per member: trial, genotype, each objective's
    value, accuracy, cross-entropy, params) and ``pareto.png`` (the first objective against the second, every trial
    a dot, the front joined and highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # `metric` is named by the task's metric (e.g. valid_ppl)
    label = {n: (records[0]["metric"] if n == "metric" and records else n) for n in objectives}
    members = [{"trial": r["trial"], "genotype": r["genotype"],
                **{label[n]: r["objectives"][n] for n in objectives}, **{k: r.get(k) for k in OBJECTIVES}}
               for r in front]
    atomic_write_text(os.path.join(run_dir, PARETO_FILE),
                      json.dumps({"objectives": [label[n] for n in objectives], "directions": directions,
                                  "front": members}, indent=2) + "\n")
    x, y = objectives[1], objectives[0]
    scored = [r for r in records if r.get("objectives")]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["objectives"][x] for r in scored], [r["objectives"][y] for r in scored], s=18, color="0.6",
               label="trials")
    pts = sorted((r["objectives"][x], r["objectives"][y]) for r in front)
    if len(objectives) == 2:  # the front is a staircase in these two axes
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front", drawstyle="steps-post")
    else:  # a front over more objectives is no curve in two of them: its members, marked
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="C3",
                label=f"Pareto front over {', '.join(label[n] for n in objectives)}")
        ax.set_title(f"front over {len(objectives)} objectives, drawn in the first two", fontsize=9)
    for r in front:
        ax.annotate(str(r["trial"]), (r["objectives"][x], r["objectives"][y]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"{label[x]} ({directions[1]})")
    ax.set_ylabel(f"{label[y]} ({directions[0]})")
    ax.legend()
    fig.tight_layout()
    tmp = os.path.join(run_dir, ".pareto.png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, os.path.join(run_dir, "pareto.png"))


@scoped  # the run dir this call takes is given back when it returns
def _figure(value) -> str:
    """A trial's metric for the log: 6 significant digits (``4723.28``, ``0.834512``); None (failed) as is."""
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def search_black_box(cfg, run_dir: Optional[str] = None,
                     evaluate: Optional[Callable[[Genotype, str], TrialResult]] = None) -> dict:
    """Run a black-box search (random or Bayesian) as configured; returns the metrics of ``metrics.json``.

    Args:
        cfg: a composed SearchConfig with ``strategy=random|bayesian``.
        run_dir: output folder (default: the Hydra run directory).
        evaluate: ``f(genotype, trial_dir) -> TrialResult`` (default :func:`train_trial`; tests pass a toy
            objective); with ``strategy.pruner`` it is called with ``report=`` the per-epoch hook
            (:class:`nas.strategies.blackbox.EpochReporter`: ``report.report(epoch, value)`` -> stop) and returns
            ``TrialResult(..., pruned=epoch)`` when the hook stopped it.
    Outputs in ``run_dir``: ``trials.jsonl``, ``trials/NNNN/`` (each trial's train.py outputs),
        ``genotype.json`` and ``genotype.png`` (the best; of the whole study when ``strategy.storage`` is shared), ``metrics.json``, ``tb/``, ``config.yaml``,
        ``study.db`` (bayesian with the default storage).
    Raises:
        ConfigError: a bad budget, sampler or storage.  SearchFailed: every trial failed.
    """
    from nas.config import SearchConfig

    # a worker of a shared study, started again with the same command (a requeued job), continues its run dir
    cfg, run_dir, _ = open_run(cfg, run_dir, SearchConfig, "search.py", continue_same=bool(cfg.strategy.get("storage")))
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    task = make_task(cfg)
    metric, direction = task_metric(cfg, task)
    space = build_space(cfg.space)
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, space, seed=cfg.seed, direction=direction,
                                                 run_dir=run_dir)
    evaluate = evaluate or (lambda g, d, seed=None, report=None: train_trial(cfg, g, d, seed, report))
    pruner = getattr(strategy, "pruner", None)  # multi-fidelity: trials report each epoch, the study may stop them
    writer = SummaryWriter(os.path.join(run_dir, "tb"))
    writer.add_text("config", f"```\n{cfg_yaml}\n```", 0)
    trials = TrialLog(run_dir, cfg.strategy.name, metric, direction, cfg.seed, writer)
    if trials.resume():
        log.info("resuming: %d trials in %s, best %s so far %s", trials.n, trials.path, metric, trials.best)
        if hasattr(strategy, "mark_seen"):
            strategy.mark_seen(trials.genotypes)
    # a worker of a shared study that was killed takes its interrupted trial back first (it was admitted under the
    # budget), to go on from that trial's checkpoint; None for anything else
    reclaimed = strategy.reclaim(trials.study_trials) if hasattr(strategy, "reclaim") else None
    log.info("search: space=%s strategy=%s%s on %s: up to %d trials of %d epoch(s)%s, %s genotypes in the space, "
             "run dir %s", cfg.space.name, cfg.strategy.name,
             (f" (sampler {cfg.strategy.sampler})" if "sampler" in cfg.strategy else "")
             + (f" (population {strategy.population_size}, sample {strategy.sample_size})"
                if hasattr(strategy, "population_size") else "")
             + (f" (pruner {cfg.strategy.pruner}: min_resource {cfg.strategy.min_resource}, reduction_factor "
                f"{cfg.strategy.reduction_factor})" if cfg.strategy.get("pruner") else "")
             + (f" (objectives {', '.join(cfg.strategy.objectives)})" if cfg.strategy.get("objectives") else ""),
             cfg.dataset.name, cfg.strategy.trials,
             cfg.strategy.trial_epochs, f", budget {cfg.strategy.budget_tokens} tokens"
             if cfg.strategy.budget_tokens else "", f"{strategy.size:,}", run_dir)
    # the search's wall seconds across resumes: the earlier processes' (as the last record has them) + this one's
    clock = Clock(trials.search_seconds)
    budget_met = False
    bar = tqdm(total=cfg.strategy.trials, desc=cfg.strategy.name, unit="trial", disable=not cfg.progress,
               dynamic_ncols=True)
    try:
        with stop_signals():
            while reclaimed is not None or not strategy.stopped(trials.n):
                if stop_requested() is not None:
                    raise interrupted(run_dir, "search.py", f"after trial {trials.n}", "trials.jsonl is up to date")
                if reclaimed is not None:
                    proposal, reclaimed = reclaimed, None
                else:
                    # a shared study's token budget is the study's (every worker's results), as its trial budget
                    spent = strategy.spent_tokens() if hasattr(strategy, "spent_tokens") else None
                    spent = trials.cum_tokens if spent is None else spent
                    if cfg.strategy.budget_tokens and spent >= cfg.strategy.budget_tokens:
                        log.info("token budget reached (%d >= %d)", spent, cfg.strategy.budget_tokens)
                        break
                    proposal = strategy.ask()
                    if proposal is BUDGET_FULL:  # other workers took the study's last places: stopped() waits or ends
                        continue
                if proposal is not None:  # the candidate records where it is searched (train.py arch= reads it)
                    proposal = proposal._replace(genotype=task.record_origin(proposal.genotype, cfg))
                if proposal is None:
                    log.info("the space is exhausted after %d genotypes", trials.n)
                    break
                if stop_requested() is not None:  # Ctrl-C while the strategy proposed: stop before training it (the
                    # proposal is not recorded; a resume proposes it again, as for a trial cut off in training)
                    raise interrupted(run_dir, "search.py", f"after trial {trials.n}", "trials.jsonl is up to date")
                failure = None
                if proposal.known is not None:  # the same genotype again (Bayesian): report, do not retrain
                    known = proposal.known  # several objectives: the earlier trial's values
                    result = TrialResult(known[0] if isinstance(known, list) else known, 0.0, 0,
                                         figures=trials.figures_of(proposal.genotype)
                                         or known_figures(cfg, known))
                else:
                    trial_dir = os.path.join(run_dir, "trials", f"{trials.n + 1:04d}")
                    t0 = time.time()
                    # a pruned search's trial reports each epoch to the study (no repeat=true with a pruner)
                    hook = {"report": strategy.reporter(proposal.handle)} if pruner else {}
                    try:  # a proposal with a seed of its own (random search with repeat=true) trains with it
                        result = (evaluate(proposal.genotype, trial_dir, **hook) if proposal.seed is None
                                  else evaluate(proposal.genotype, trial_dir, proposal.seed))
                    except NonFiniteLossError as err:
                        # the candidate's training diverged (nan_policy=stop): a failed trial, as Optuna counts one,
                        # with what it cost; the search goes on
                        log.warning("trial %d failed: %s (%s)", trials.n + 1, err, trial_dir)
                        result, failure = TrialResult(None, time.time() - t0, getattr(err, "train_tokens", 0),
                                                      trial_dir), f"{type(err).__name__}: {err}"
                    except Interrupted:
                        # left as it is (an Optuna trial stays RUNNING): a resume evaluates this genotype again, from
                        # the trial's checkpoint
                        raise interrupted(run_dir, "search.py", f"in trial {trials.n + 1}",
                                          f"the trial's checkpoint is in {trial_dir}") from None
                    except Exception:
                        strategy.tell(proposal.handle, None)  # the study marks it failed; a worker never loses it
                        raise
                    # a trial resumed from its checkpoint reports its seconds in the earlier process too
                    clock.before += max(0.0, result.wall_seconds - (time.time() - t0))
                finished = failure is None and result.pruned is None and proposal.known is None
                if finished and (result.value is None or not math.isfinite(result.value)):
                    # trained to the end, but its held-out figure is nan / inf (e.g. a valid perplexity that
                    # overflowed): failed as a diverged trial is, with a record and a warning that say so
                    failure = f"the trial's {metric} is not finite (its held-out loss overflowed)"
                    log.warning("trial %d failed: %s (%s)", trials.n + 1, failure, result.run_dir)
                values = objective_values(cfg, result)
                if result.pruned is not None:  # stopped at a rung: a PRUNED study trial, its tokens counted
                    told = strategy.tell_pruned(proposal.handle, result.pruned, result.train_tokens)
                else:  # a Pareto search tells the study every objective's value
                    told = strategy.tell(proposal.handle, result.value if values is None else values,
                                         result.train_tokens)
                was_best = result.pruned is None and better(result.value, trials.best, direction)
                # a shared study's trial number links the worker's record to the study (this run's own study
                # renumbers a trial cut off by an interruption, so its records carry none, unless pruned: then the
                # interrupted trial goes on as itself); a result whose trial another worker failed meanwhile went to
                # a new trial (`told`)
                number = told if cfg.strategy.get("storage") or pruner else None
                trials.add(proposal.genotype, result.value, result.wall_seconds, result.train_tokens,
                           repeated=proposal.known is not None, figures=result.figures,
                           **({} if failure is None else {"failed": failure}),
                           **({} if result.pruned is None else {"pruned": result.pruned}),
                           **({} if values is None else {"objectives": dict(zip(cfg.strategy.objectives, values))}),
                           **({} if number is None else {"study_trial": number}),
                           **({} if proposal.seed is None else {"train_seed": proposal.seed}),
                           search_seconds=clock.now())
                if was_best:
                    log_genotype(writer, proposal.genotype, trials.n)
                log.info("trial %d%s: %s = %s%s (best %s), %.1f s, %d tokens: %s", trials.n,
                         f" (study trial {number})" if cfg.strategy.get("storage") and number is not None else "",
                         metric, _figure(result.value),
                         "" if result.pruned is None else f" (pruned after epoch {result.pruned})",
                         _figure(trials.best), result.wall_seconds, result.train_tokens, proposal.genotype)
                bar.update(1)
                bar.set_postfix(best=f"{trials.best:.4g}" if trials.best is not None else "-")
            else:  # the loop's condition ended it: the trial budget is met (not the tokens', not an exhausted space)
                budget_met = True
    finally:
        bar.close()
    if budget_met and trials.n == 0 and cfg.strategy.get("storage"):
        log.info("study %r had its budget of %d trials filled already (other workers' trials): this worker trained "
                 "nothing; strategy.trials=<more> with the same study goes on with it", cfg.strategy.study_name,
                 cfg.strategy.trials)
    best_genotype, best_value = trials.best_genotype, trials.best
    shared = strategy.study_best() if hasattr(strategy, "study_best") else None
    # the three evaluations of the best trial: this worker's record of it (None when another worker of a shared
    # study trained it)
    figures = trials.best_figures
    objectives = list(cfg.strategy.get("objectives") or [])
    front = pareto_front(trials.records, objectives, strategy_directions(strategy)) if objectives else None
    if front and front[0]["value"] == best_value:  # a Pareto search: a tie on the first objective goes to the next
        best_genotype, figures = Genotype.from_dict(front[0]["genotype"]), {k: front[0].get(k) for k in OBJECTIVES}
    if shared is not None and better(shared[0], best_value, direction):  # another worker's trial of the study
        best_value, best_genotype = shared
        figures = trials.figures_of(best_genotype)
        log.info("the shared study's best trial is another worker's: %s = %s", metric, _figure(best_value))
    if best_genotype is None:
        writer.close()
        raise SearchFailed(f"no trial of {cfg.strategy.name} succeeded (this worker's or, in a shared study, "
                           f"another's), so there is no genotype; see {trials.path} and the log")
    best_genotype = task.record_origin(best_genotype, cfg)  # train.py arch= reads them (a shared study's: none yet)
    best_genotype.save(os.path.join(run_dir, "genotype.json"))
    log_genotype_figure(writer, best_genotype, trials.n, os.path.join(run_dir, "genotype.png"))
    writer.close()
    wall = clock.now()
    table = trials.results_table()
    atomic_write_text(os.path.join(run_dir, RESULTS_FILE), table)
    log.info("trials (%s):\n%s", os.path.join(run_dir, RESULTS_FILE), table)
    metrics = {"task": task.name, "metric": metric,
               "strategy": cfg.strategy.name, f"best_{metric}": best_value,
               **{name: (figures or {}).get(k) for k, (name, _, _) in OBJECTIVES.items()},
               "trials": trials.n, "train_tokens": trials.cum_tokens, "wall_seconds": wall,
               "genotype": best_genotype.to_dict()}
    if front is not None:  # a Pareto search: the front of this worker's trials
        write_pareto(run_dir, trials.records, front, objectives, strategy_directions(strategy))
        metrics["pareto_front"] = len(front)
        log.info("Pareto front of %s: %d of %d trials (%s, %s)", " / ".join(cfg.strategy.objectives), len(front),
                 trials.n, os.path.join(run_dir, PARETO_FILE), os.path.join(run_dir, "pareto.png"))
    if pruner:  # trials stopped at a rung (counted in trials and train_tokens)
        metrics["pruned_trials"] = sum(r.get("pruned") is not None for r in trials.records)
    if shared is not None:  # several workers: best_* and genotype are the study's; trials and cost this worker's
        metrics.update({"shared_study": cfg.strategy.study_name, f"worker_best_{metric}": trials.best})
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    log.info("done in %.1f s: %d trials, best %s %.4g: %s written to %s", wall, trials.n, metric, best_value,
             best_genotype, os.path.join(run_dir, "genotype.json"))
    return metrics
