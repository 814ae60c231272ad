"""The one-shot search loop (DARTS, Liu et al. 2019, Algorithm 1; RNN settings of sec. 3.2 / A.1.2).

Per training segment: sample a variable bptt length (AWD-LSTM sec. 4.1) and scale the weight learning
rate by ``seq_len / bptt``; update α on a held-out segment (``strategy.step``); then update the weights on
the training segment with SGD, gradient clipping and AR/TAR.  Hidden states are carried across segments
and detached.  Each epoch: exact validation perplexity of the supernet, the derived genotype, TensorBoard,
and an atomic checkpoint.  Everything lands in the run directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
from functools import partial
from typing import NamedTuple, Optional

import torch
from omegaconf import OmegaConf

from nas.data import bptt_segments, get_batch
from nas.engine.common import check_data_parallel, compile_model, configure_runtime, seed_everything
from nas.engine.resume import Keeper, load_into, open_run, resume_config, start_run, stop_signals
from nas.engine.rundir import scoped
from nas.engine.asgd import SEARCH_OPTIMIZERS, make_optimizer, set_lr
from nas.engine.lm import (EpochMeter, LMData, LMLoop, NonFiniteLossError, evaluate, lm_objective,
                           prepare_lm_data, token_progress_bar, weight_step)
from nas.engine.blackbox import TrialLog
from nas.engine.tb import log_alphas, log_genotype, log_genotype_figure
from nas import distributed
from nas.atomic import atomic_write_text
from nas.spaces import build_space
from nas.strategies import STRATEGIES
from nas.errors import ConfigError
from nas.strategies.darts import Batch

log = logging.getLogger(__name__)


class SearchSetup(NamedTuple):
    """Everything a one-shot search step needs (see :func:`build_search`)."""

    device: torch.device
    data: LMData
    space: object
    model: torch.nn.Module
    strategy: object
    w_optimizer: torch.optim.Optimizer


def build_search(cfg, data: Optional[LMData] = None) -> SearchSetup:
    """Build data, space, supernet, strategy and the weight optimizer from a SearchConfig.

    Call :func:`nas.engine.common.seed_everything` first for a reproducible initialization.
    ``data`` may be passed to reuse already batchified splits.
    Raises:
        KeyError: unknown space or strategy.  nas.data.DataError: data missing or too small.
    """
    device = configure_runtime(cfg)
    strategy_cls = STRATEGIES.get(cfg.strategy.name)
    if data is None:
        data = prepare_lm_data(cfg, device, alpha_split=cfg.strategy.get("alpha_split", "valid"),
                               score_batch_size=cfg.strategy.get("score_batch_size"))
    space = build_space(cfg.space)
    model = space.build_supernet(data.ntoken).to(device)
    compile_model(model, cfg.compile)
    objective = partial(lm_objective, ar_alpha=cfg.ar_alpha, tar_beta=cfg.tar_beta)
    strategy = strategy_cls(cfg.strategy, space, model, objective, weight_decay=cfg.weight_decay, clip=cfg.clip,
                            seed=cfg.seed)
    w_optimizer = make_search_optimizer(cfg, model)
    return SearchSetup(device, data, space, model, strategy, w_optimizer)


def make_search_optimizer(cfg, model) -> torch.optim.Optimizer:
    """The weights' optimizer of a search (``cfg.optimizer``: sgd or adam). Raises ConfigError otherwise."""
    if cfg.optimizer not in SEARCH_OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}; valid for search.py: {', '.join(SEARCH_OPTIMIZERS)}")
    return make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)


def search_step(setup: SearchSetup, cfg, train: Batch, valid: Batch, lr_scale: float = 1.0):
    """One bilevel step: α on the held-out segment, then the weights on the training segment.

    The weight lr is ``cfg.lr * lr_scale * seq_len / bptt`` (AWD-LSTM sec. 4.1; ``lr_scale`` < 1 after a
    ``nan_policy=rollback``) for this step, and ξ of the second-order update is that same lr (DARTS
    reference code).
    Returns ``(raw training NLL in nats/token, hidden [B, H], hidden_valid [B, H])``, both detached.
    Raises:
        NonFiniteLossError: the training loss is NaN/inf (no weight update was made).
    """
    lr = cfg.lr * lr_scale * train.data.size(0) / cfg.bptt
    set_lr(setup.w_optimizer, lr)
    hidden_valid = setup.strategy.step(train, valid, lr)
    raw, hidden = weight_step(setup.model, setup.w_optimizer, train.data, train.targets, train.hidden, cfg.clip,
                              cfg.ar_alpha, cfg.tar_beta, setup.strategy.edge_weights())
    return raw, hidden, hidden_valid


def strategy_summary(strategy_cfg) -> str:
    """The strategy for the start-of-run log line: its name, and for DARTS the order and the second-order mode."""
    name = strategy_cfg.name
    if "unrolled" not in strategy_cfg:
        return name
    if not strategy_cfg.unrolled:
        return f"{name} (first order)"
    return (f"{name} (second order, hypergradient={strategy_cfg.hypergradient}, "
            f"fd_masks={strategy_cfg.fd_masks})")


def _alpha_shape(strategy):
    return tuple(strategy.alphas.shape) if hasattr(strategy, "alphas") else None


def _lrs(w_optimizer, strategy) -> dict:
    """The learning rates to log: the weights', and α's when the strategy has α."""
    out = {"lr/weights": w_optimizer.param_groups[0]["lr"]}
    if hasattr(strategy, "optimizer"):
        out["lr/alphas"] = strategy.optimizer.param_groups[0]["lr"]
    return out


class OneShotOutputs:
    """What a one-shot search writes, shared by the language-model and the classification loops: after each
    epoch the derived genotype (``genotypes/epoch_NNN.json``), its ``trials.jsonl`` record, α heatmap, genotype
    text and picture in TensorBoard; at the end ``genotype.json`` and ``genotype.png``.  All TensorBoard output goes through the run's one ``writer``."""

    def __init__(self, run_dir: str, cfg, writer, space, strategy, metric: str, direction: str):
        self.run_dir, self.cfg, self.writer, self.space, self.strategy = run_dir, cfg, writer, space, strategy
        self.trials = TrialLog(run_dir, cfg.strategy.name, metric, direction, cfg.seed, writer)

    def epoch(self, epoch: int, genotype, value: float, seconds: float, tokens: int) -> None:
        """Record the epoch's genotype and its validation ``value``, which cost ``seconds`` and ``tokens`` (the
        caller then writes the resume checkpoint).  Under torchrun the ranks' genotypes are compared first
        (RuntimeError if they differ) and rank 0 writes."""
        distributed.check_same(str(genotype), f"genotype of epoch {epoch}")
        if not distributed.is_writer():
            return
        genotype.save(os.path.join(self.run_dir, "genotypes", f"epoch_{epoch:03d}.json"))
        self.trials.add(genotype, value, seconds, tokens, epoch=epoch, supernet=True)
        if hasattr(self.strategy, "alphas"):
            log_alphas(self.writer, self.strategy.alphas, self.space.ops, epoch)
        log_genotype(self.writer, genotype, epoch)
        log_genotype_figure(self.writer, genotype, epoch)
        self.writer.flush()

    def final(self):
        """Write the strategy's final genotype (``genotype.json``, ``genotype.png``) and return it."""
        genotype = self.strategy.export()
        distributed.check_same(str(genotype), "final genotype")
        if not distributed.is_writer():
            log.info("final genotype %s (the same as rank 0's)", genotype)  # (the log tags the rank)
            return genotype
        genotype.save(os.path.join(self.run_dir, "genotype.json"))
        log_genotype_figure(self.writer, genotype, self.cfg.epochs, os.path.join(self.run_dir, "genotype.png"))
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
    """Run a one-shot architecture search as configured; return the metrics written to ``metrics.json``.

    Args:
        cfg: a composed :class:`nas.config.SearchConfig` (``conf/search.yaml``); ``cfg.resume`` set: continue
            that run dir from its checkpoint (:mod:`nas.engine.resume`).
        run_dir: output folder (default: the Hydra run directory); refused if it already holds a run.
    A sentence-classification dataset (sst2) runs :func:`nas.engine.classify.search_classifier` instead, a
    black-box strategy :func:`nas.engine.blackbox.search_black_box`.
    Outputs in ``run_dir``: ``genotype.json`` (final), ``genotype.png`` (its DAG), ``genotypes/epoch_NNN.json``,
        ``metrics.json``, ``checkpoint.pt`` (resume state, every ``checkpoint_every`` steps and each epoch end),
        ``tb/`` (TensorBoard events), ``config.yaml`` (resolved config).
    Raises:
        nas.data.DataError: data missing or too small.  NonFiniteLossError: the loss became NaN/inf under
        ``nan_policy=stop`` (the last checkpoint is kept and nothing non-finite is written).
        nas.engine.resume.Interrupted: SIGINT/SIGTERM (a checkpoint was written).  CheckpointError: a checkpoint
        to resume from is damaged or does not fit.  ConfigError: a run dir that already holds a run.
    """
    from nas.config import SearchConfig
    from nas.engine.classify import is_classification, search_classifier

    if cfg.get("resume"):
        cfg, _ = resume_config(cfg, SearchConfig)
    _check_data_parallel(cfg, is_classification(cfg))
    if STRATEGIES.get(cfg.strategy.name).kind == "black_box":
        from nas.engine.blackbox import search_black_box

        return search_black_box(cfg, run_dir)
    if is_classification(cfg):
        return search_classifier(cfg, run_dir)
    cfg, run_dir, resuming = open_run(cfg, run_dir, SearchConfig, "search.py")
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    np_rng = seed_everything(cfg.seed)
    setup = build_search(cfg)
    data, space, model, strategy, w_optimizer = (setup.data, setup.space, setup.model, setup.strategy,
                                                 setup.w_optimizer)
    device = setup.device
    n_params = sum(p.numel() for p in model.parameters())
    log.info("search: space=%s strategy=%s on %s, device %s, %d weights, alphas %s, run dir %s",
             cfg.space.name, strategy_summary(cfg.strategy), cfg.dataset.name, device, n_params, _alpha_shape(strategy),
             run_dir)
    state = {"step": 0, "tokens": 0, "best_valid_ppl": math.inf, "history": [], "epoch_start": 0.0,
             "epoch_tokens": 0}
    loop = LMLoop()
    keeper = Keeper(cfg, run_dir, "search_lm", "search.py", state,
                    lambda: {"model": model.state_dict(), "strategy": strategy.state_dict(),
                             "w_optimizer": w_optimizer.state_dict(), **loop.snapshot(np_rng)},
                    lambda ck: (load_into("weights", run_dir, model, ck["model"]),
                                load_into("architecture state (α)", run_dir, strategy, ck["strategy"]),
                                load_into("weight optimizer state", run_dir, w_optimizer, ck["w_optimizer"]),
                                loop.restore(ck, np_rng)),
                    device, modules=(model, getattr(strategy, "alphas", None)))
    writer = start_run(keeper, resuming, cfg_yaml)
    bar = token_progress_bar(cfg, data.train, "search")
    bar.update(state["tokens"])
    outputs = OneShotOutputs(run_dir, cfg, writer, space, strategy, "valid_ppl", "minimize")
    if distributed.is_writer():
        outputs.trials.resume(keep=lambda r: r["epoch"] < loop.epoch)
    try:
        with stop_signals():
            while loop.epoch <= cfg.epochs:
                try:
                    epoch = loop.epoch
                    if loop.batch == 0:
                        state["epoch_start"], state["epoch_tokens"] = keeper.clock.now(), state["tokens"]
                    train_ppl = _train_epoch(cfg, setup, np_rng, writer, bar, state, loop, keeper)
                except NonFiniteLossError as err:
                    keeper.on_non_finite(err, writer, bar)
                    continue
                over = data.over_ranks("valid")
                scored, over_scored = ((data.valid, over) if data.score is None
                                       else (data.score, data.over_ranks("score")))
                select_path(strategy, lambda w, n: evaluate(model, scored, cfg.bptt, w,
                                                            n if n is not None else cfg.limit_eval_batches,
                                                            over_ranks=over_scored).ppl, final=epoch == cfg.epochs)
                valid = evaluate(model, data.valid, cfg.bptt, strategy.eval_weights(), cfg.limit_eval_batches,
                                 over_ranks=over)
                genotype = strategy.export()
                state["best_valid_ppl"] = min(state["best_valid_ppl"], valid.ppl)
                state["history"].append({"epoch": epoch, "train_ppl": train_ppl, "valid_ppl": valid.ppl,
                                         "genotype": genotype.to_dict()})
                # on the step axis, as every training tag: an epoch's figures at the step that ended it
                writer.add_scalar("valid/ppl", valid.ppl, state["step"])
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar("train/epoch_ppl", train_ppl, state["step"])
                outputs.epoch(epoch, genotype, valid.ppl, keeper.clock.now() - state["epoch_start"],
                              state["tokens"] - state["epoch_tokens"])
                loop.next_epoch()
                keeper.save()
                log.info("epoch %d: train ppl %.2f, valid ppl %.2f, genotype %s", epoch, train_ppl, valid.ppl,
                         genotype)
                bar.set_postfix(valid_ppl=f"{valid.ppl:.1f}")
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        genotype = outputs.final()
        writer.commit()  # the final genotype's picture (no checkpoint after it)
    finally:
        bar.close()
        writer.close()
    wall = keeper.clock.now()
    metrics = {"task": "language_modeling", "final_valid_ppl": state["history"][-1]["valid_ppl"],
               "best_valid_ppl": state["best_valid_ppl"],
               "epochs": cfg.epochs, "steps": state["step"], "train_tokens": state["tokens"],
               "wall_seconds": wall, "tokens_per_second": state["tokens"] / max(wall, 1e-9),
               "params": n_params, "rollbacks": state["rollbacks"], "processes": distributed.size(),
               "genotype": genotype.to_dict(),
               "history": state["history"]}
    if distributed.is_writer():
        atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
        log.info("done in %.1f s: genotype %s written to %s", wall, genotype, os.path.join(run_dir, "genotype.json"))
    return metrics


def _check_data_parallel(cfg, classification: bool) -> None:
    """Under torchrun: only the one-shot language-model search runs data parallel (ConfigError otherwise)."""
    if distributed.launched() is None:
        return
    if STRATEGIES.get(cfg.strategy.name).kind == "black_box":
        raise ConfigError(f"strategy={cfg.strategy.name} evaluates independent trials: run several plain "
                          "`python search.py` workers on one strategy.storage instead of torchrun (README: Scaling out)")
    check_data_parallel(cfg, classification, "search")


def _train_epoch(cfg, setup: SearchSetup, np_rng, writer, bar, state, loop: LMLoop, keeper) -> float:
    """The rest of the current epoch from ``loop``'s position; returns the epoch's training perplexity (raw
    NLL, no AR/TAR).  Checkpoints and stop requests go through ``keeper`` after every step."""
    model, data, strategy = setup.model, setup.data, setup.strategy
    model.train()
    hidden = loop.hidden if loop.hidden is not None else model.init_hidden(data.train.size(1))
    hidden_valid = loop.hidden_valid if loop.hidden_valid is not None else model.init_hidden(data.train.size(1))
    meter = EpochMeter(state, writer, bar, cfg.log_every, loop.partial)
    segments = bptt_segments(data.train, cfg.bptt, variable=True, rng=np_rng,
                             max_len=cfg.bptt + cfg.max_seq_len_delta, start=loop.row, sampler=cfg.seq_len_sampler)
    for n, (i, seq_len) in enumerate(segments, loop.batch):
        if cfg.limit_train_batches and n >= cfg.limit_train_batches:
            break
        data_t, targets_t = get_batch(data.train, i, seq_len)
        # DARTS reads the held-out segment at the same row (wrapped), with the nominal bptt
        data_v, targets_v = get_batch(data.search, i % (data.search.size(0) - 1), cfg.bptt)
        try:
            raw, hidden, hidden_valid = search_step(setup, cfg, Batch(data_t, targets_t, hidden),
                                                    Batch(data_v, targets_v, hidden_valid), state["lr_scale"])
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"step {state['step'] + 1}: {err}") from None
        meter.record(raw, targets_t.numel() * distributed.size(), _lrs(setup.w_optimizer, strategy))
        loop.advance(seq_len, hidden, hidden_valid, meter.partial)
        keeper.step_done(f"at step {state['step']} (epoch {loop.epoch})")
    set_lr(setup.w_optimizer, cfg.lr)
    return meter.ppl
