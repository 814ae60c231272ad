"""Retraining a genotype from scratch (DARTS, Liu et al. 2019, sec. 3.3 and A.2.2; AWD-LSTM regimen), written once
for every task.

The discrete model is the space's frozen supernet (``space.freeze(genotype, ...)``).  Training: the task's batches
and weight update (language models: variable bptt with the lr scaled by ``seq_len / bptt``, AWD-LSTM sec. 4.1,
AR/TAR), SGD with weight decay and gradient clipping, and NT-ASGD (:mod:`nas.engine.asgd`).  After each epoch the
model is evaluated on the validation split (with the averaged weights once ASGD is on); the best one is checkpointed
with its genotype and resolved config, and at the end it is reloaded and scored on the test split (perplexity:
exp(total NLL / target tokens), :func:`nas.tasks.language_modeling.evaluate`; accuracy for classifiers).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Callable, NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nas import distributed
from nas.atomic import atomic_write_text
from nas.engine.asgd import OPTIMIZERS, averaged_weights, is_averaging, make_asgd, make_optimizer, nonmono_trigger, set_lr
from nas.engine.common import (CheckpointError, absolute_path, atomic_torch_save, check_data_parallel, compile_model,
                               configure_runtime, device_summary, load_checkpoint, seed_everything)
from nas.engine.resume import open_run, resume_config, retrain_keeper, start_run, stop_signals
from nas.engine.rundir import scoped
from nas.engine.tb import log_genotype_figure
from nas.errors import ConfigError, NonFiniteLossError
from nas.precision import set_matmul_dtype
from nas.genotype import Genotype, GenotypeError
from nas.published import resolve_arch
from nas.spaces import build_space
from nas.tasks import Task, make_task

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"


@scoped  # the run dir this call takes is given back when it returns
def train(cfg, run_dir: Optional[str] = None, score_test: bool = True,
          on_epoch: Optional[Callable[[int, dict], bool]] = None) -> dict:
    """Retrain ``cfg.arch`` from scratch as configured; return the metrics written to ``metrics.json``.

    Args:
        cfg: a composed :class:`nas.config.TrainConfig` (``conf/train.yaml``).
        run_dir: output folder (default: the Hydra run directory).
        score_test: score the best checkpoint on the test split (False: the black-box search strategies,
            which select by validation only and must not spend time on, or look at, the test split).
        on_epoch: ``f(epoch, progress) -> stop`` called after each epoch's validation and checkpoint (``progress``:
            the ``metrics.json`` keys known so far -- ``best_valid_<metric>``, ``best_epoch``, ``valid_accuracy``,
            ``valid_cross_entropy``, ``params``, ``train_tokens``, ``history``); True ends the run there (a pruned
            black-box trial, :mod:`nas.engine.blackbox`): ``metrics.json`` is written as usual, with
            ``stopped_at_epoch`` (the epochs it ran) and the tokens it trained on.  An epoch reported before an
            interruption is not reported again by the resumed run.
    The task (``dataset.task``: :mod:`nas.tasks`) gives the data, the batches, the weight update and the metric
    (perplexity, accuracy).
    Outputs in ``run_dir``: ``genotype.png`` (the DAG), ``metrics.json`` (best valid metric, test metric; valid and test
        accuracy and cross-entropy; params,
        epochs, tokens/s, wall time, per-epoch history), ``best.pt`` (best-valid weights -- averaged ones under ASGD --
        with genotype and resolved config, and the optimizer state of that moment for ``nan_policy=reload_best``;
        :func:`load_trained` rebuilds it), ``genotype.json``, ``config.yaml``, ``tb/``.
    Raises:
        GenotypeError: ``arch`` unknown, or its file unreadable / invalid / of another space or task.
        nas.data.DataError: data missing or too small.  ValueError: an invalid setting.
        NonFiniteLossError: the training loss became NaN/inf (``best.pt`` is kept) under ``nan_policy=stop``, or
            under ``reload_best`` before the first validation wrote ``best.pt``.
        ConfigError: ``nan_policy=reload_best`` for a task without it (sentence classification).
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    from nas.config import TrainConfig

    checked = resume_config(cfg, TrainConfig)[0] if cfg.get("resume") else cfg
    task = make_task(checked)
    check_data_parallel(checked, task.data_parallel, "retraining")  # before anything is written
    if checked.nan_policy == "reload_best" and not task.reload_best:
        raise ConfigError("nan_policy=reload_best is the language-model retraining policy (DARTS rnn/train.py); "
                          f"{task.title or task.name} takes nan_policy=stop or rollback")
    cfg, run_dir, resuming = open_run(cfg, run_dir, TrainConfig, "train.py")
    _check(cfg)
    # a resumed run retrains the genotype it saved (the arch path may be gone or relative to another dir)
    arch = run_dir if cfg.get("resume") else cfg.arch
    genotype, arch_desc = resolve_arch(arch, base_dir=absolute_path("."))
    space = build_space(cfg.space)
    try:
        space.check_genotype(genotype)
        check_genotype_task(genotype, task, cfg.dataset.name)
    except GenotypeError as err:
        raise GenotypeError(f"arch={cfg.arch} ({arch_desc}): {err}") from None
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if distributed.is_writer():
        genotype.save(os.path.join(run_dir, "genotype.json"))
    task.check(cfg, space, "retraining")
    device = configure_runtime(cfg)
    np_rng = seed_everything(cfg.seed)
    data = task.prepare(cfg, device, alpha_split=None, retrain=True)
    model_args = task.model_args(data)
    try:
        model = space.freeze(genotype, data.ntoken, **model_args).to(device)
    except GenotypeError as err:
        raise GenotypeError(f"arch={cfg.arch} ({arch_desc}): {err}") from None
    set_matmul_dtype(model, cfg.get("matmul_dtype"))
    compile_model(model, cfg.compile)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train: arch %s\n  genotype %s\n  %d parameters, %s%s, device %s, run dir %s",
             arch_desc, genotype, n_params, cfg.dataset.name, task.describe(data), device_summary(device), run_dir)
    opt = {"optimizer": make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)}
    metric = task.metric
    state = {"step": 0, "tokens": 0, **{c: 0 for c in task.counters}, "train_seconds": 0.0, "history": [],
             "val_losses": [],
             "best": {metric: math.inf if task.direction == "minimize" else -math.inf, "loss": math.inf,
                      "epoch": None},
             "asgd_epoch": 0 if cfg.optimizer == "asgd" else None, "reloads_since_best": 0}
    best_path = os.path.join(run_dir, BEST_CHECKPOINT)
    pos = task.position(cfg, data, np_rng, search=False)

    keeper = retrain_keeper(cfg, run_dir, f"train_{task.kind}", state, model, opt, pos, device)
    if task.reload_best:
        keeper.reload_best = lambda err: _reload_best(cfg, best_path, model, opt, pos, state, device, err)
    writer = start_run(keeper, resuming, cfg_yaml, genotype, tags=task.scalar_tags)
    if distributed.is_writer():
        log_genotype_figure(writer, genotype, 0, os.path.join(run_dir, "genotype.png"))
    bar = task.progress_bar(cfg, data, "train", state)
    valid, stopped_at = None, None
    try:
        with stop_signals():
            while pos.epoch <= cfg.epochs:
                epoch, t0 = pos.epoch, time.time()
                try:
                    meter = _train_epoch(cfg, task, model, opt["optimizer"], data, np_rng, writer, bar, state, pos,
                                         keeper)
                except NonFiniteLossError as err:
                    state["train_seconds"] += time.time() - t0
                    keeper.on_non_finite(err, writer, bar, task.bar_counter)
                    continue
                state["train_seconds"] += time.time() - t0
                optimizer = opt["optimizer"]
                averaged = is_averaging(optimizer)
                with averaged_weights(model, optimizer):
                    valid = task.evaluate(model, data, "valid", cfg, max_batches=cfg.limit_eval_batches)
                value = task.value(valid)
                loss = valid.loss if math.isfinite(valid.loss) else math.inf
                figures, best = task.best_state(valid), state["best"]
                if best["epoch"] is None or task.selection_key(figures) > task.selection_key(best):
                    state["best"] = best = {**figures, "epoch": epoch}
                    state["reloads_since_best"] = 0
                    if distributed.is_writer():
                        with averaged_weights(model, optimizer):
                            _save_best(best_path, model, optimizer, genotype, cfg, data.ntoken, model_args, n_params,
                                       epoch, task.best_figures(valid), averaged)
                switched = False
                if cfg.optimizer == "ntasgd" and not averaged and nonmono_trigger(state["val_losses"], loss,
                                                                                  cfg.nonmono):
                    opt["optimizer"] = make_asgd(model.parameters(), cfg.lr, cfg.weight_decay)
                    state["asgd_epoch"], switched = epoch, True
                if not averaged:
                    state["val_losses"].append(loss)  # the trigger compares SGD-phase losses, as AWD-LSTM / DARTS
                state["history"].append({"epoch": epoch, **meter.figures(), **task.valid_figures(valid),
                                         "averaged": averaged, "seconds": time.time() - t0})
                # on the step axis, as every training tag (reload_best runs an epoch number again; the step goes on)
                writer.add_scalar(f"valid/{metric}", value, state["step"])
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar(f"train/epoch_{metric}", meter.value, state["step"])
                writer.add_scalar("optim/averaged", float(averaged), state["step"])
                writer.flush()
                pos.next_epoch()
                keeper.save()
                log.info("epoch %d: train %s %s, valid %s %s (loss %.4f)%s (best %s at epoch %d)%s", epoch, metric,
                         task.fmt(meter.value), metric, task.fmt(value), valid.loss,
                         " [averaged weights]" if averaged else "", task.fmt(best[metric]), best["epoch"],
                         "; switching to averaged SGD (non-monotone trigger)" if switched else "")
                bar.set_postfix({f"valid_{metric}": task.fmt(value)})
                if on_epoch is not None and on_epoch(epoch, _progress(metric, state, n_params)):
                    stopped_at = epoch
                    log.info("stopped after epoch %d of %d (on_epoch)", epoch, cfg.epochs)
                    break
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        bar.close()
        t0, test = time.time(), None
        if score_test:
            distributed.barrier()  # torchrun: best.pt is rank 0's file
            # the best checkpoint reloaded from disk, so the file is what is reported
            model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
            test = task.test(model, data, cfg)
            writer.add_scalar(f"test/{metric}", task.value(test), state["step"])
            writer.add_scalar("test/loss", test.loss, state["step"])
        writer.commit()  # the test figures (no checkpoint after them)
        test_seconds = time.time() - t0
    finally:
        bar.close()
        writer.close()
    wall, best = keeper.clock.now(), state["best"]
    metrics = {
        "task": task.name, "arch": cfg.arch, f"best_valid_{metric}": best[metric], "best_epoch": best["epoch"],
        f"test_{metric}": None if test is None else task.value(test), "test_loss": None if test is None else test.loss,
        **task.test_metrics(cfg, data, valid, test, best_path),
        # the three figures every run reports (accuracy, cross-entropy in nats, parameter count): held-out ones of
        # the kept epoch, and the test split's
        "valid_accuracy": best.get("accuracy"), "valid_cross_entropy": best["loss"],
        "test_accuracy": None if test is None else test.accuracy,
        "test_cross_entropy": None if test is None else test.loss, "params": n_params,
        "epochs": cfg.epochs, "steps": state["step"], **{f"train_{c}": state[c] for c in task.counters},
        "train_tokens": state["tokens"], "asgd_epoch": state["asgd_epoch"],
        "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"], "test_seconds": test_seconds, "wall_seconds": wall,
        "device": str(device), "rollbacks": state["rollbacks"], "processes": distributed.size(),
        "genotype": genotype.to_dict(), "history": state["history"],
        **({} if stopped_at is None else {"stopped_at_epoch": stopped_at}),
    }
    if not distributed.is_writer():
        return metrics
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    tested = (f"test {metric} {task.fmt(task.value(test))} ({test_seconds:.1f} s)" if test is not None
              else "test split not scored")
    if test is not None and metrics.get("exact_eval") is False:  # limit_eval_batches: a figure to check, not report
        tested += (f", over {metrics['test_tokens']:,} tokens only, not the whole split (limit_eval_batches="
                   f"{cfg.limit_eval_batches}; null scores all of it)")
    log.info("done in %.1f s: best valid %s %s (epoch %d), %s; %d params; %s", wall, metric, task.fmt(best[metric]),
             best["epoch"], tested, n_params, os.path.join(run_dir, "metrics.json"))
    return metrics


def _progress(metric: str, state: dict, n_params: int) -> dict:
    """What ``on_epoch`` sees after an epoch: the ``metrics.json`` keys of the run so far (see :func:`train`)."""
    best = state["best"]
    return {f"best_valid_{metric}": best[metric], "best_epoch": best["epoch"], "valid_accuracy": best.get("accuracy"),
            "valid_cross_entropy": best["loss"], "params": n_params, "train_tokens": state["tokens"],
            "history": list(state["history"])}


def check_genotype_task(genotype: Genotype, task: Task, dataset: str) -> None:
    """GenotypeError when ``genotype`` records another task than ``task``, the task of the run's ``dataset`` (a
    genotype without one fits any)."""
    if genotype.task is not None and genotype.task != task.name:
        where = f" on {genotype.dataset}" if genotype.dataset else ""
        raise GenotypeError(f"the genotype was searched for task {genotype.task}{where}, but dataset={dataset} is for "
                            f"task {task.name}: retrain it on a dataset of task {genotype.task}")


def _train_epoch(cfg, task: Task, model, optimizer, data, np_rng, writer, bar, state, pos, keeper):
    """The rest of the current epoch from position ``pos``; returns the epoch's meter (its training figures: raw
    loss, without AR/TAR).  Checkpoints and stop requests go through ``keeper``."""
    model.train()
    meter = task.meter(state, writer, bar, cfg.log_every, pos.partial)
    for step in task.batches(cfg, data, model, pos, np_rng, search=False):
        lr = cfg.lr * state["lr_scale"] * step.lr_factor  # AWD-LSTM: longer segments, larger steps
        set_lr(optimizer, lr)
        try:
            result = task.weight_step(model, optimizer, step.train, cfg)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"step {state['step'] + 1}: {err}") from None
        meter.record_step(result, {"lr": lr})
        pos.advance(step, result, None, meter.partial)
        keeper.step_done(f"at step {state['step']} (epoch {pos.epoch})")
    set_lr(optimizer, cfg.lr)
    return meter


def _save_best(path, model, optimizer, genotype: Genotype, cfg, ntoken: int, model_args: dict, n_params: int,
               epoch: int, figures: dict, averaged: bool) -> None:
    # the optimizer state beside the weights, as DARTS rnn/train.py saves optimizer.pt with model.pt:
    # nan_policy=reload_best goes back to both
    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "genotype": genotype.to_dict(),
                       "config": OmegaConf.to_container(cfg, resolve=True), "ntoken": ntoken, **model_args,
                       "model_args": sorted(model_args),
                       "params": n_params, "epoch": epoch, **figures, "averaged": averaged}, path)


def _reload_best(cfg, best_path: str, model, opt: dict, pos, state: dict, device, err: Exception) -> int:
    """``nan_policy=reload_best`` (DARTS ``rnn/train.py``, its ``except`` around ``train()``): put back the weights
    of ``best.pt`` (the averaged ones if ASGD was on then) and the optimizer of that moment -- ASGD with its
    averages if it had switched by then, else SGD --, keep the configured learning rate, and go on from the start
    of the epoch after the best one, with fresh hidden states.  The random states, the validation-loss history of
    the non-monotone trigger and the counters go on (as in the reference).  Returns the epoch the run goes on with.

    Raises:
        NonFiniteLossError: no ``best.pt`` yet (the NaN came before the first validation).
        CheckpointError: ``best.pt`` unreadable, or without an optimizer state (written by an older version).
    """
    from nas.engine.resume import restore_weights_and_optimizer

    distributed.barrier()  # torchrun: best.pt is rank 0's file
    if state["best"]["epoch"] is None or not os.path.isfile(best_path):
        raise NonFiniteLossError(f"{err}; nan_policy=reload_best: no best checkpoint yet (the NaN came before the "
                                 "first validation); the last checkpoint was kept: resume it with "
                                 "nan_policy=rollback, or start again with a lower lr") from None
    ckpt = load_checkpoint(best_path, map_location=device)
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{best_path} holds no optimizer state, which nan_policy=reload_best needs")
    # NT-ASGD switched after the best epoch: undone
    if restore_weights_and_optimizer(cfg, best_path, model, opt, ckpt["averaged"], ckpt["model"], ckpt["optimizer"]):
        state["asgd_epoch"] = state["asgd_epoch"] if ckpt["averaged"] else None
    set_lr(opt["optimizer"], cfg.lr)
    pos.epoch = ckpt["epoch"]
    pos.next_epoch()
    return pos.epoch


class Trained(NamedTuple):
    """What :func:`load_trained` returns: the rebuilt model (eval mode), its genotype, config and raw checkpoint."""

    model: torch.nn.Module
    genotype: Genotype
    cfg: object
    checkpoint: dict


def load_trained(path: str, device: Optional[torch.device] = None) -> Trained:
    """Rebuild a retrained model from ``best.pt`` alone (its genotype and resolved config are inside).

    Args:
        path: a ``best.pt`` file, or the run directory holding it.  device: where to put it (default cpu).
    Raises:
        CheckpointError: missing / corrupt file, or one whose genotype, config or weights do not fit together.
    """
    from nas.config import TrainConfig

    if os.path.isdir(path):
        path = os.path.join(path, BEST_CHECKPOINT)
    ckpt = load_checkpoint(path, map_location=device or torch.device("cpu"))
    missing = [k for k in ("model", "genotype", "config", "ntoken") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (missing {missing})")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), ckpt["config"])
        genotype = Genotype.from_dict(ckpt["genotype"], where=f"genotype in {path}")
        extra = {key: ckpt[key] for key in ckpt.get("model_args", ("num_classes",)) if key in ckpt}  # the task's
        model = build_space(cfg.space).freeze(genotype, ckpt["ntoken"], **extra)
        model.load_state_dict(ckpt["model"])
    except (GenotypeError, OmegaConfBaseException, RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"cannot rebuild the model of {path}: {err}") from None
    model.to(device or torch.device("cpu")).eval()
    return Trained(model, genotype, cfg, ckpt)


def _check(cfg) -> None:
    if OmegaConf.is_missing(cfg, "arch"):
        from nas.published import published_names

        raise GenotypeError(f"arch= is required: a published genotype ({', '.join(published_names())}) or a "
                            "genotype.json written by search.py, e.g. `python train.py arch=darts_v2`")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    for key in ("epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.nonmono < 0:
        raise ConfigError(f"nonmono must be >= 0, got {cfg.nonmono}")
