"""The one-shot search loop (DARTS, Liu et al. 2019, Algorithm 1), written once for every task.

Per training step: the task gives the weights' batch and a held-out batch for α (:meth:`nas.tasks.base.Task.batches`;
language models: variable-length BPTT segments, the step's lr scaled by ``seq_len / bptt`` as in AWD-LSTM sec. 4.1);
the strategy updates α on the held-out batch (``strategy.step``), then the task's weight update runs (gradient
clipping; AR/TAR for language models).  Each epoch: the supernet's validation metric (perplexity or accuracy), the
derived genotype, TensorBoard, and an atomic checkpoint.  Everything lands in the run directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import NamedTuple, Optional

import torch
from omegaconf import OmegaConf

from nas import distributed
from nas.atomic import atomic_write_text
from nas.engine.asgd import SEARCH_OPTIMIZERS, make_optimizer, set_lr
from nas.engine.common import (check_data_parallel, compile_model, configure_runtime, device_summary,
                               seed_everything)
from nas.engine.resume import Keeper, load_into, open_run, resume_config, start_run, stop_signals
from nas.engine.rundir import scoped
from nas.diagnostics import CollapseMonitor
from nas.engine.tb import log_alphas, log_genotype, log_genotype_figure
from nas.genotype import Genotype
from nas.engine.trials import TrialLog
from nas.errors import ConfigError, NonFiniteLossError
from nas.precision import set_matmul_dtype
from nas.spaces import build_space
from nas.strategies import STRATEGIES
from nas.tasks import Step, Task, make_task

log = logging.getLogger(__name__)


class SearchSetup(NamedTuple):
    """Everything a one-shot search step needs (see :func:`build_search`)."""

    device: torch.device
    data: object
    space: object
    model: torch.nn.Module
    strategy: object
    w_optimizer: torch.optim.Optimizer
    task: Optional[Task] = None


def build_search(cfg, data=None, task: Optional[Task] = None) -> SearchSetup:
    """Build data, space, supernet, strategy and the weight optimizer from a SearchConfig, for its task
    (``dataset.task``; ``task`` given: that one).

    Call :func:`nas.engine.common.seed_everything` first for a reproducible initialization.
    ``data`` may be passed to reuse already prepared splits.
    Raises:
        KeyError: unknown space or strategy.  nas.data.DataError: data missing or too small.  ConfigError: a space
        that cannot build the task's models, a setting the task does not take, or a space config a one-shot strategy
        cannot search (``space.check_one_shot``: stacked_rnn with several units choices).
    """
    task = task or make_task(cfg)
    device = configure_runtime(cfg)
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    space = build_space(cfg.space)
    task.check(cfg, space, "search")
    if hasattr(space, "check_one_shot"):  # what a space refuses to one-shot strategies (stacked_rnn: units), before the data loads
        space.check_one_shot()
    if data is None:
        data = task.prepare(cfg, device, alpha_split=cfg.strategy.get("alpha_split", "valid"))
    model = space.build_supernet(data.ntoken, **task.model_args(data)).to(device)
    set_matmul_dtype(model, cfg.get("matmul_dtype"))
    compile_model(model, cfg.compile)
    strategy = strategy_cls(cfg.strategy, space, model, task.objective(cfg), weight_decay=cfg.weight_decay,
                            clip=cfg.clip, seed=cfg.seed)
    w_optimizer = make_search_optimizer(cfg, model)
    return SearchSetup(device, data, space, model, strategy, w_optimizer, task)


def make_search_optimizer(cfg, model) -> torch.optim.Optimizer:
    """The weights' optimizer of a search (``cfg.optimizer``: sgd or adam). Raises ConfigError otherwise."""
    if cfg.optimizer not in SEARCH_OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}; valid for search.py: {', '.join(SEARCH_OPTIMIZERS)}")
    return make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)


def one_shot_step(setup: SearchSetup, cfg, step: Step, lr_scale: float = 1.0):
    """One bilevel step: α on ``step.alpha``, then the weights on ``step.train`` (the other way round for a strategy
    with ``weights_first``: GDAS).

    The weight lr is ``cfg.lr * lr_scale * step.lr_factor`` (``lr_scale`` < 1 after a ``nan_policy=rollback``) for
    this step, and ξ of the second-order update is that same lr (DARTS reference code).
    Returns ``(StepResult of the weight update, what the strategy's step returned)`` (a language model: the α
    batch's hidden state [B, H], detached).
    Raises:
        NonFiniteLossError: the training loss is NaN/inf (no weight update was made).
    """
    lr = cfg.lr * lr_scale * step.lr_factor
    set_lr(setup.w_optimizer, lr)
    strategy = setup.strategy
    if getattr(strategy, "weights_first", False):  # GDAS: the reference updates w, then α
        result = setup.task.weight_step(setup.model, setup.w_optimizer, step.train, cfg, strategy.edge_weights())
        return result, strategy.step(step.train, step.alpha, lr)
    alpha_carry = strategy.step(step.train, step.alpha, lr)
    result = setup.task.weight_step(setup.model, setup.w_optimizer, step.train, cfg, strategy.edge_weights())
    return result, alpha_carry


def search_step(setup: SearchSetup, cfg, train, valid, lr_scale: float = 1.0):
    """:func:`one_shot_step` for a language model's segments (:class:`nas.tasks.base.Batch`): the lr factor is
    ``seq_len / bptt`` (AWD-LSTM sec. 4.1).
    Returns ``(raw training NLL in nats/token, hidden [B, H], hidden_valid [B, H])``, both detached."""
    result, hidden_valid = one_shot_step(setup, cfg, Step(train, valid, train.data.size(0) / cfg.bptt), lr_scale)
    return result.loss, result.carry, hidden_valid


def strategy_summary(strategy_cfg) -> str:
    """The strategy for the start-of-run log line: its name, and for DARTS the order and the second-order mode."""
    name = strategy_cfg.name
    if "unrolled" not in strategy_cfg:
        return name
    if not strategy_cfg.unrolled:
        return f"{name} (first order)"
    return (f"{name} (second order, hypergradient={strategy_cfg.hypergradient}, "
            f"fd_masks={strategy_cfg.fd_masks})")


def alpha_shape(strategy):
    """The shape of the strategy's α for the log (None: a strategy without α)."""
    return tuple(strategy.alphas.shape) if hasattr(strategy, "alphas") else None


def learning_rates(w_optimizer, strategy) -> dict:
    """The learning rates to log: the weights', and α's when the strategy has α."""
    out = {"lr/weights": w_optimizer.param_groups[0]["lr"]}
    if hasattr(strategy, "optimizer"):
        out["lr/alphas"] = strategy.optimizer.param_groups[0]["lr"]
    return out


class OneShotOutputs:
    """What a one-shot search writes: after each
    epoch the derived genotype (``genotypes/epoch_NNN.json``), its ``trials.jsonl`` record, α heatmap, genotype
    text and picture in TensorBoard; at the end ``genotype.json`` and ``genotype.png``.  All TensorBoard output goes through the run's one ``writer``."""

    def __init__(self, run_dir: str, cfg, writer, space, strategy, metric: str, direction: str):
        self.run_dir, self.cfg, self.writer, self.space, self.strategy = run_dir, cfg, writer, space, strategy
        self.trials = TrialLog(run_dir, cfg.strategy.name, metric, direction, cfg.seed, writer)

    def epoch(self, epoch: int, genotype, value: float, seconds: float, tokens: int,
              figures: Optional[dict] = None) -> None:
        """Record the epoch's genotype and its validation ``value``, which cost ``seconds`` and ``tokens`` (the
        caller then writes the resume checkpoint); ``figures``: the supernet's held-out accuracy, cross-entropy
        and parameter count (:data:`nas.engine.trials.FIGURES`).  Under torchrun the ranks' genotypes are compared first
        (RuntimeError if they differ) and rank 0 writes."""
        distributed.check_same(str(genotype), f"genotype of epoch {epoch}")
        if not distributed.is_writer():
            return
        genotype.save(os.path.join(self.run_dir, "genotypes", f"epoch_{epoch:03d}.json"))
        self.trials.add(genotype, value, seconds, tokens, figures, epoch=epoch, supernet=True)
        if hasattr(self.strategy, "alphas"):
            log_alphas(self.writer, self.strategy.alphas, self.space.ops, epoch,
                       row_labels=getattr(self.space, "alpha_rows", None))
        log_genotype(self.writer, genotype, epoch)
        log_genotype_figure(self.writer, genotype, epoch)
        self.writer.flush()

    def final(self, record=lambda genotype: genotype, genotype=None, step=None):
        """Write the strategy's final genotype (``genotype`` given: that one, e.g. DARTS-ES's) to ``genotype.json``
        and ``genotype.png`` (TensorBoard: ``genotype/final_dag``, so that ``genotype/dag`` holds one picture per
        epoch, at ``step``: default the configured epochs), passed through ``record`` (which adds its origin), and
        return it."""
        genotype = record(self.strategy.export() if genotype is None else genotype)
        distributed.check_same(str(genotype), "final genotype")
        if not distributed.is_writer():
            log.info("final genotype %s (the same as rank 0's)", genotype)  # (the log tags the rank)
            return genotype
        genotype.save(os.path.join(self.run_dir, "genotype.json"))
        log_genotype_figure(self.writer, genotype, self.cfg.epochs if step is None else step,
                            os.path.join(self.run_dir, "genotype.png"), tag="genotype/final_dag")
        return genotype


def select_path(strategy, score, direction: str = "minimize", final: bool = False) -> None:
    """random_ws: after an epoch (``final``: the last), pick the best of random paths with the shared weights
    (no-op for DARTS).

    ``score(weights, max_batches)``; ``max_batches=None`` means the configured whole split."""
    if hasattr(strategy, "select"):
        ranked = strategy.select(score, direction, final=final)
        if ranked:
            log.info("selected %s (score %.4g, best of %d ranked)", ranked[0][0], ranked[0][1], len(ranked))


@scoped  # the run dir this call takes is given back when it returns
def search(cfg, run_dir: Optional[str] = None) -> dict:
    """Run an architecture search as configured; return the metrics written to ``metrics.json``.

    Args:
        cfg: a composed :class:`nas.config.SearchConfig` (``conf/search.yaml``); ``cfg.resume`` set: continue
            that run dir from its checkpoint (:mod:`nas.engine.resume`).
        run_dir: output folder (default: the Hydra run directory); refused if it already holds a run.
    A black-box strategy runs :func:`nas.engine.blackbox.search_black_box`; a one-shot strategy the loop here, for
    the config's task (``dataset.task``: :mod:`nas.tasks`).
    Outputs in ``run_dir``: ``genotype.json`` (final), ``genotype.png`` (its DAG), ``genotypes/epoch_NNN.json``,
        ``metrics.json``, ``checkpoint.pt`` (resume state, every ``checkpoint_every`` steps and each epoch end),
        ``tb/`` (TensorBoard events), ``config.yaml`` (resolved config).
    Raises:
        nas.data.DataError: data missing or too small.  NonFiniteLossError: the loss became NaN/inf under
        ``nan_policy=stop`` (the last checkpoint is kept and nothing non-finite is written).
        nas.engine.resume.Interrupted: SIGINT/SIGTERM (a checkpoint was written).  CheckpointError: a checkpoint
        to resume from is damaged or does not fit.  ConfigError: a run dir that already holds a run, a space that
        cannot build the task's models.
    """
    from nas.config import SearchConfig

    if cfg.get("resume"):
        cfg, _ = resume_config(cfg, SearchConfig)
    task = make_task(cfg)
    _check_data_parallel(cfg, task)
    if STRATEGIES.get(cfg.strategy.name).kind == "black_box":
        from nas.engine.blackbox import search_black_box

        return search_black_box(cfg, run_dir)
    cfg, run_dir, resuming = open_run(cfg, run_dir, SearchConfig, "search.py")
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    np_rng = seed_everything(cfg.seed)
    setup = build_search(cfg, task=task)
    data, space, model, strategy, w_optimizer = (setup.data, setup.space, setup.model, setup.strategy,
                                                 setup.w_optimizer)
    device, metric = setup.device, task.metric
    n_params = sum(p.numel() for p in model.parameters())
    log.info("search: space=%s strategy=%s on %s%s, device %s, %d weights, alphas %s, run dir %s",
             cfg.space.name, strategy_summary(cfg.strategy), cfg.dataset.name, task.describe(data),
             device_summary(device), n_params, alpha_shape(strategy), run_dir)
    best_start = math.inf if task.direction == "minimize" else -math.inf
    state = {"step": 0, "tokens": 0, **{c: 0 for c in task.counters}, "best_value": best_start, "history": [],
             "epoch_start": 0.0, "epoch_tokens": 0}
    pos = task.position(cfg, data, np_rng, search=True)
    keeper = Keeper(cfg, run_dir, f"search_{task.kind}", "search.py", state,
                    lambda: {"model": model.state_dict(), "strategy": strategy.state_dict(),
                             "w_optimizer": w_optimizer.state_dict(), **pos.snapshot()},
                    lambda ck: (load_into("weights", run_dir, model, ck["model"]),
                                load_into("architecture state (α)", run_dir, strategy, ck["strategy"]),
                                load_into("weight optimizer state", run_dir, w_optimizer, ck["w_optimizer"]),
                                pos.restore(ck)),
                    device, modules=(model, getattr(strategy, "alphas", None)))
    writer = start_run(keeper, resuming, cfg_yaml, tags=task.scalar_tags)
    bar = task.progress_bar(cfg, data, "search", state)
    outputs = OneShotOutputs(run_dir, cfg, writer, space, strategy, f"valid_{metric}", task.direction)
    monitor = CollapseMonitor(cfg, space, model, strategy, task, data, writer)
    if distributed.is_writer():
        outputs.trials.resume(keep=lambda r: r["epoch"] < pos.epoch)
    pick = min if task.direction == "minimize" else max
    try:
        with stop_signals():
            while pos.epoch <= cfg.epochs and not state.get("early_stop"):  # (a resume after DARTS-ES: done)
                try:
                    epoch = pos.epoch
                    if pos.batch == 0:
                        state["epoch_start"], state["epoch_tokens"] = keeper.clock.now(), state["tokens"]
                    meter = _train_epoch(cfg, setup, np_rng, writer, bar, state, pos, keeper)
                except NonFiniteLossError as err:
                    keeper.on_non_finite(err, writer, bar, task.bar_counter)
                    continue
                select_path(strategy, lambda w, n: task.value(task.evaluate(
                    model, data, "score", cfg, w, n if n is not None else cfg.limit_eval_batches)),
                    task.direction, final=epoch == cfg.epochs)
                valid = task.evaluate(model, data, "valid", cfg, strategy.eval_weights(), cfg.limit_eval_batches)
                value = task.value(valid)
                genotype = task.record_origin(strategy.export(), cfg)
                diagnostics = monitor.epoch(epoch, genotype, state["step"], keeper.clock.now)
                state["best_value"] = pick(state["best_value"], value)
                penalty = getattr(strategy, "penalty", None)  # strategy.param_penalty: the expected count it weighs
                expected = None if penalty is None else float(penalty.expected(strategy.alphas.detach()))
                state["history"].append({"epoch": epoch, **meter.figures(), **task.valid_figures(valid),
                                         "genotype": genotype.to_dict(),
                                         **({} if expected is None else {"expected_params": expected}),
                                         **({} if diagnostics is None else {"diagnostics": diagnostics})})
                # on the step axis, as every training tag: an epoch's figures at the step that ended it
                writer.add_scalar(f"valid/{metric}", value, state["step"])
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar(f"train/epoch_{metric}", meter.value, state["step"])
                outputs.epoch(epoch, genotype, value, keeper.clock.now() - state["epoch_start"],
                              state["tokens"] - state["epoch_tokens"],
                              {"accuracy": valid.accuracy, "cross_entropy": valid.loss, "params": n_params})
                monitor.log_history(state["history"], epoch)
                stop = monitor.early_stop(state["history"], epoch)  # DARTS-ES (diagnostics.early_stop)
                if stop is not None:
                    state["early_stop"] = stop
                pos.next_epoch()
                keeper.save()
                log.info("epoch %d: train %s %s, valid %s %s (loss %.4f), genotype %s%s", epoch, metric,
                         task.fmt(meter.value), metric, task.fmt(value), valid.loss, genotype,
                         "" if expected is None else f"; expected params under softmax(α) {expected:,.0f}")
                bar.set_postfix({f"valid_{metric}": task.fmt(value)})
                if stop is not None:
                    log.info("DARTS-ES: the Hessian's eigenvalue grew by %.2fx (local means %.4g -> %.4g, more than "
                             "diagnostics.early_stop.factor=%g): search stopped after epoch %d; the genotype is "
                             "epoch %d's", stop["ratio"], stop["previous"], stop["current"],
                             cfg.diagnostics.early_stop.factor, epoch, stop["genotype_epoch"])
                    break
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        early = state.get("early_stop")
        genotype = outputs.final(lambda g: task.record_origin(g, cfg), None if early is None else Genotype.from_dict(
            next(h["genotype"] for h in state["history"] if h["epoch"] == early["genotype_epoch"])),
            step=state["history"][-1]["epoch"])  # (DARTS-ES: the epoch it stopped after)
        decided = monitor.report(genotype)
        writer.commit()  # the final genotype's picture (no checkpoint after it)
    finally:
        bar.close()
        writer.close()
    wall, history = keeper.clock.now(), state["history"]
    metrics = {"task": task.name, f"final_valid_{metric}": history[-1][f"valid_{metric}"],
               "final_valid_loss": history[-1]["valid_loss"], f"best_valid_{metric}": state["best_value"],
               # the three figures every run reports (the last epoch's held-out accuracy and cross-entropy in nats;
               # params: the supernet's)
               "valid_accuracy": history[-1].get("valid_accuracy"), "valid_cross_entropy": history[-1]["valid_loss"],
               "epochs": cfg.epochs, "steps": state["step"], **{f"train_{c}": state[c] for c in task.counters},
               "train_tokens": state["tokens"], "wall_seconds": wall,
               "tokens_per_second": state["tokens"] / max(wall, 1e-9), "params": n_params,
               "rollbacks": state["rollbacks"], "processes": distributed.size(), "genotype": genotype.to_dict(),
               # issue 20: DARTS-ES's decision (null: ran to the end) and how decided the final α is
               "epochs_run": len(history), "early_stop": state.get("early_stop"), "decidedness": decided,
               "history": history}
    if distributed.is_writer():
        atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
        log.info("done in %.1f s: genotype %s written to %s", wall, genotype, os.path.join(run_dir, "genotype.json"))
    return metrics


def _check_data_parallel(cfg, task: Task) -> None:
    """Under torchrun: only a one-shot search of a data-parallel task runs (ConfigError otherwise)."""
    if distributed.launched() is None:
        return
    if STRATEGIES.get(cfg.strategy.name).kind == "black_box":
        raise ConfigError(f"strategy={cfg.strategy.name} evaluates independent trials: run several plain "
                          "`python search.py` workers on one strategy.storage instead of torchrun (README: Scaling out)")
    check_data_parallel(cfg, task.data_parallel, "search")


def _train_epoch(cfg, setup: SearchSetup, np_rng, writer, bar, state, pos, keeper):
    """The rest of the current epoch from position ``pos``; returns the epoch's meter (its training figures: raw
    loss, no AR/TAR).  Checkpoints and stop requests go through ``keeper`` after every step."""
    task, model, strategy = setup.task, setup.model, setup.strategy
    if hasattr(strategy, "start_epoch"):  # GDAS: the epoch's temperature (also after a resume or a rollback)
        strategy.start_epoch(pos.epoch, cfg.epochs)
    model.train()
    meter = task.meter(state, writer, bar, cfg.log_every, pos.partial)
    for step in task.batches(cfg, setup.data, model, pos, np_rng, search=True):
        try:
            result, alpha_carry = one_shot_step(setup, cfg, step, state["lr_scale"])
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"step {state['step'] + 1}: {err}") from None
        meter.record_step(result, learning_rates(setup.w_optimizer, strategy))
        pos.advance(step, result, alpha_carry, meter.partial)
        keeper.step_done(f"at step {state['step']} (epoch {pos.epoch})")
    set_lr(setup.w_optimizer, cfg.lr)
    return meter
