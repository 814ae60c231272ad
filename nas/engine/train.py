"""Retraining a genotype from scratch (DARTS, Liu et al. 2019, sec. 3.3 and A.2.2; AWD-LSTM regimen).

The discrete model is the space's frozen supernet (``space.freeze(genotype, ntoken)``).  Training: variable
bptt with the learning rate scaled by ``seq_len / bptt`` (AWD-LSTM sec. 4.1), SGD with weight decay, gradient
clipping, AR/TAR, and NT-ASGD (:mod:`nas.engine.asgd`).  After each epoch the model is evaluated on the whole
validation split (with the averaged weights once ASGD is on); the best one is checkpointed with its genotype
and resolved config, and at the end it is reloaded and scored on the test split.  Perplexity is always
exp(total NLL / target tokens) (:func:`nas.engine.lm.evaluate`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import NamedTuple, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from nas.data import bptt_segments, get_batch
from nas.engine.asgd import (OPTIMIZERS, averaged_weights, is_averaging, make_asgd, make_optimizer, nonmono_trigger,
                             set_lr)
from nas.engine.common import (CheckpointError, absolute_path, atomic_torch_save, check_data_parallel, compile_model,
                               configure_runtime, load_checkpoint, seed_everything)
from nas.engine.lm import (EpochMeter, EvalResult, LMLoop, NonFiniteLossError, evaluate, prepare_lm_data,
                           token_progress_bar, weight_step)
from nas.engine.resume import open_run, resume_config, retrain_keeper, start_run, stop_signals
from nas.engine.rundir import scoped
from nas.engine.tb import log_genotype_figure
from nas import distributed
from nas.atomic import atomic_write_text
from nas.genotype import Genotype, GenotypeError
from nas.published import resolve_arch
from nas.spaces import build_space
from nas.errors import ConfigError

log = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"


def evaluate_lm(model, source: torch.Tensor, bptt: int, optimizer: Optional[torch.optim.Optimizer] = None,
                max_batches: Optional[int] = None, progress=None, over_ranks: bool = False) -> EvalResult:
    """Exact perplexity of ``model`` on ``source`` [T, B], with ASGD's averaged weights if ``optimizer`` averages.

    Leaves the model's ``training`` flag, its parameters and the optimizer state exactly as they were
    (the averaged weights are copied in and the raw ones back, see :func:`nas.engine.asgd.averaged_weights`).
    An overflowing loss gives ``ppl == inf``, not an exception.  ``over_ranks``: see :func:`nas.engine.lm.evaluate`.
    """
    with averaged_weights(model, optimizer):
        return evaluate(model, source, bptt, max_batches=max_batches, progress=progress, over_ranks=over_ranks)


@scoped  # the run dir this call takes is given back when it returns
def train(cfg, run_dir: Optional[str] = None, score_test: bool = True) -> dict:
    """Retrain ``cfg.arch`` from scratch as configured; return the metrics written to ``metrics.json``.

    Args:
        cfg: a composed :class:`nas.config.TrainConfig` (``conf/train.yaml``).
        run_dir: output folder (default: the Hydra run directory).
        score_test: score the best checkpoint on the test split (False: the black-box search strategies,
            which select by validation only and must not spend time on, or look at, the test split).
    A sentence-classification dataset (sst2) runs :func:`nas.engine.classify.train_classifier` instead
    (accuracy instead of perplexity).
    Outputs in ``run_dir``: ``genotype.png`` (the DAG), ``metrics.json`` (best valid ppl, test ppl, params,
        epochs, tokens/s, wall time, per-epoch history), ``best.pt`` (best-valid weights -- averaged ones under ASGD -- with genotype and
        resolved config, and the optimizer state of that moment for ``nan_policy=reload_best``; :func:`load_trained`
        rebuilds it), ``genotype.json``, ``config.yaml``, ``tb/``.
    Raises:
        GenotypeError: ``arch`` unknown, or its file unreadable / invalid / of another space.
        nas.data.DataError: data missing or too small.  ValueError: an invalid setting.
        NonFiniteLossError: the training loss became NaN/inf (``best.pt`` is kept) under ``nan_policy=stop``, or
            under ``reload_best`` before the first validation wrote ``best.pt``.
        ConfigError: ``nan_policy=reload_best`` for a sentence classifier.
    """
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    from nas.config import TrainConfig
    from nas.engine.classify import is_classification, train_classifier

    checked = resume_config(cfg, TrainConfig)[0] if cfg.get("resume") else cfg
    check_data_parallel(checked, is_classification(checked), "retraining")  # before anything is written
    if is_classification(checked) and checked.nan_policy == "reload_best":
        raise ConfigError("nan_policy=reload_best is the language-model retraining policy (DARTS rnn/train.py); "
                          "sentence classification takes nan_policy=stop or rollback")
    cfg, run_dir, resuming = open_run(cfg, run_dir, TrainConfig, "train.py")
    _check(cfg)
    # a resumed run retrains the genotype it saved (the arch path may be gone or relative to another dir)
    arch = run_dir if cfg.get("resume") else cfg.arch
    genotype, arch_desc = resolve_arch(arch, base_dir=absolute_path("."))
    space = build_space(cfg.space)
    try:
        space.check_genotype(genotype)
    except GenotypeError as err:
        raise GenotypeError(f"arch={cfg.arch} ({arch_desc}): {err}") from None
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if distributed.is_writer():
        genotype.save(os.path.join(run_dir, "genotype.json"))
    if is_classification(cfg):
        return train_classifier(cfg, genotype, arch_desc, run_dir, score_test, resuming)
    device = configure_runtime(cfg)
    np_rng = seed_everything(cfg.seed)
    data = prepare_lm_data(cfg, device, alpha_split=None, test_batch_size=cfg.test_batch_size)
    try:
        model = space.freeze(genotype, data.ntoken).to(device)
    except GenotypeError as err:
        raise GenotypeError(f"arch={cfg.arch} ({arch_desc}): {err}") from None
    compile_model(model, cfg.compile)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train: arch %s\n  genotype %s\n  %d parameters, %s, device %s, run dir %s",
             arch_desc, genotype, n_params, cfg.dataset.name, device, run_dir)
    opt = {"optimizer": make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)}
    eval_bptt = cfg.eval_bptt or cfg.bptt
    state = {"step": 0, "tokens": 0, "train_seconds": 0.0, "history": [], "val_losses": [],
             "best": {"loss": math.inf, "epoch": None, "ppl": math.inf},
             "asgd_epoch": 0 if cfg.optimizer == "asgd" else None, "reloads_since_best": 0}
    best_path = os.path.join(run_dir, BEST_CHECKPOINT)
    loop = LMLoop()

    keeper = retrain_keeper(cfg, run_dir, "train_lm", state, model, opt, _Position(loop, np_rng), device)
    keeper.reload_best = lambda err: _reload_best(cfg, best_path, model, opt, loop, state, device, err)
    writer = start_run(keeper, resuming, cfg_yaml, genotype)
    if distributed.is_writer():
        log_genotype_figure(writer, genotype, 0, os.path.join(run_dir, "genotype.png"))
    bar = token_progress_bar(cfg, data.train, "train")
    bar.update(state["tokens"])
    valid = None
    try:
        with stop_signals():
            while loop.epoch <= cfg.epochs:
                epoch, t0 = loop.epoch, time.time()
                try:
                    train_ppl = _train_epoch(cfg, model, opt["optimizer"], data.train, np_rng, writer, bar, state,
                                             loop, keeper)
                except NonFiniteLossError as err:
                    state["train_seconds"] += time.time() - t0
                    keeper.on_non_finite(err, writer, bar)
                    continue
                state["train_seconds"] += time.time() - t0
                optimizer = opt["optimizer"]
                averaged = is_averaging(optimizer)
                valid = evaluate_lm(model, data.valid, eval_bptt, optimizer, cfg.limit_eval_batches,
                                    over_ranks=data.over_ranks("valid"))
                loss = valid.loss if math.isfinite(valid.loss) else math.inf
                best = state["best"]
                if loss < best["loss"] or best["epoch"] is None:
                    state["best"] = best = {"loss": loss, "epoch": epoch, "ppl": valid.ppl}
                    state["reloads_since_best"] = 0
                    if distributed.is_writer():
                        with averaged_weights(model, optimizer):
                            _save_best(best_path, model, optimizer, genotype, cfg, data.ntoken, n_params, epoch,
                                       valid, averaged)
                switched = False
                if cfg.optimizer == "ntasgd" and not averaged and nonmono_trigger(state["val_losses"], loss,
                                                                                  cfg.nonmono):
                    opt["optimizer"] = make_asgd(model.parameters(), cfg.lr, cfg.weight_decay)
                    state["asgd_epoch"], switched = epoch, True
                if not averaged:
                    state["val_losses"].append(loss)  # the trigger compares SGD-phase losses, as AWD-LSTM / DARTS
                state["history"].append({"epoch": epoch, "train_ppl": train_ppl, "valid_ppl": valid.ppl,
                                         "valid_loss": valid.loss, "averaged": averaged,
                                         "seconds": time.time() - t0})
                # on the step axis, as every training tag (reload_best runs an epoch number again; the step goes on)
                writer.add_scalar("valid/ppl", valid.ppl, state["step"])
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar("train/epoch_ppl", train_ppl, state["step"])
                writer.add_scalar("optim/averaged", float(averaged), state["step"])
                writer.flush()
                loop.next_epoch()
                keeper.save()
                log.info("epoch %d: train ppl %.2f, valid ppl %.2f%s (best %.2f at epoch %d)%s", epoch, train_ppl,
                         valid.ppl, " [averaged weights]" if averaged else "", best["ppl"], best["epoch"],
                         "; switching to averaged SGD (non-monotone trigger)" if switched else "")
                bar.set_postfix(valid_ppl=f"{valid.ppl:.1f}")
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        bar.close()
        t0, test = time.time(), None
        if score_test:
            distributed.barrier()  # torchrun: best.pt is rank 0's file
            test = _test_best(cfg, model, best_path, data.test, eval_bptt, device, data.over_ranks("test"))
            writer.add_scalar("test/ppl", test.ppl, state["step"])
            writer.add_scalar("test/loss", test.loss, state["step"])
        writer.commit()  # the test figures (no checkpoint after them)
        test_seconds = time.time() - t0
    finally:
        bar.close()
        writer.close()
    wall, best = keeper.clock.now(), state["best"]
    if valid is None:  # resumed after the last epoch had finished: the best checkpoint holds its figures
        distributed.barrier()
        best_ckpt = load_checkpoint(best_path)
        valid = EvalResult(best_ckpt["valid_nll"], best_ckpt["valid_tokens"])
    metrics = {
        "arch": cfg.arch, "best_valid_ppl": best["ppl"], "best_epoch": best["epoch"], "test_ppl": test and test.ppl,
        "test_loss": test and test.loss, "test_tokens": test and test.tokens, "valid_tokens": valid.tokens,
        "exact_eval": (_whole(valid, data.valid, data.over_ranks("valid"))
                       and (test is None or _whole(test, data.test, data.over_ranks("test")))), "params": n_params,
        "epochs": cfg.epochs, "steps": state["step"], "train_tokens": state["tokens"],
        "asgd_epoch": state["asgd_epoch"], "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"], "test_seconds": test_seconds, "wall_seconds": wall,
        "test_batch_size": cfg.test_batch_size, "eval_batch_size": cfg.eval_batch_size, "device": str(device),
        "rollbacks": state["rollbacks"], "processes": distributed.size(), "genotype": genotype.to_dict(),
        "history": state["history"],
    }
    if not distributed.is_writer():
        return metrics
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    tested = (f"test ppl {test.ppl:.2f} ({test.tokens} tokens, batch {cfg.test_batch_size}, {test_seconds:.1f} s)"
              if test is not None else "test split not scored")
    log.info("done in %.1f s: best valid ppl %.2f (epoch %d), %s; %d params; %s", wall, best["ppl"], best["epoch"],
             tested, n_params, os.path.join(run_dir, "metrics.json"))
    return metrics


class _Position(NamedTuple):
    """The LM loop's position for :func:`nas.engine.resume.retrain_keeper`."""

    loop: LMLoop
    np_rng: object

    def snapshot(self) -> dict:
        return self.loop.snapshot(self.np_rng)

    def restore(self, ckpt: dict) -> None:
        self.loop.restore(ckpt, self.np_rng)


def _train_epoch(cfg, model, optimizer, source, np_rng, writer, bar, state, loop: LMLoop, keeper) -> float:
    """The rest of the current epoch over the training split [T, B] from ``loop``'s position; returns the
    epoch's perplexity (raw NLL, without AR/TAR).  Checkpoints and stop requests go through ``keeper``."""
    model.train()
    hidden = loop.hidden if loop.hidden is not None else model.init_hidden(source.size(1))
    meter = EpochMeter(state, writer, bar, cfg.log_every, loop.partial)
    segments = bptt_segments(source, cfg.bptt, variable=True, rng=np_rng, max_len=cfg.bptt + cfg.max_seq_len_delta,
                             start=loop.row, sampler=cfg.seq_len_sampler)
    for n, (i, seq_len) in enumerate(segments, loop.batch):
        if cfg.limit_train_batches and n >= cfg.limit_train_batches:
            break
        data, targets = get_batch(source, i, seq_len)
        lr = cfg.lr * state["lr_scale"] * data.size(0) / cfg.bptt  # AWD-LSTM: longer segments, larger steps
        set_lr(optimizer, lr)
        try:
            raw_value, hidden = weight_step(model, optimizer, data, targets, hidden, cfg.clip, cfg.ar_alpha,
                                            cfg.tar_beta)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"step {state['step'] + 1}: {err}") from None
        meter.record(raw_value, targets.numel() * distributed.size(), {"lr": lr})
        loop.advance(seq_len, hidden, None, meter.partial)
        keeper.step_done(f"at step {state['step']} (epoch {loop.epoch})")
    set_lr(optimizer, cfg.lr)
    return meter.ppl


def _test_best(cfg, model, best_path: str, source: torch.Tensor, bptt: int, device,
               over_ranks: bool = False) -> EvalResult:
    """Test perplexity of the best-valid checkpoint, reloaded from disk (so the file is what is reported)."""
    model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    segments = len(range(0, source.size(0) - 1, bptt))
    total = min(segments, cfg.limit_eval_batches or segments)
    with tqdm(total=total, desc="test", unit="seg", disable=not cfg.progress or not distributed.is_writer(),
              dynamic_ncols=True) as bar:
        return evaluate_lm(model, source, bptt, None, cfg.limit_eval_batches, lambda n: bar.update(1), over_ranks)


def _whole(result: EvalResult, source: torch.Tensor, over_ranks: bool = False) -> bool:
    """True when ``result`` scored every target of ``source`` [T, B] (no ``limit_eval_batches`` cut); with
    ``over_ranks``, ``source`` is one of the torchrun ranks' equal shards."""
    return result.tokens == (source.size(0) - 1) * source.size(1) * (distributed.size() if over_ranks else 1)


def _save_best(path, model, optimizer, genotype: Genotype, cfg, ntoken: int, n_params: int, epoch: int,
               valid: EvalResult, averaged: bool) -> None:
    # the optimizer state beside the weights, as DARTS rnn/train.py saves optimizer.pt with model.pt:
    # nan_policy=reload_best goes back to both
    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "genotype": genotype.to_dict(),
                       "config": OmegaConf.to_container(cfg, resolve=True), "ntoken": ntoken, "params": n_params,
                       "epoch": epoch, "valid_nll": valid.nll, "valid_tokens": valid.tokens, "valid_ppl": valid.ppl,
                       "averaged": averaged}, path)


def _reload_best(cfg, best_path: str, model, opt: dict, loop: LMLoop, state: dict, device, err: Exception) -> int:
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
    loop.epoch = ckpt["epoch"]
    loop.next_epoch()
    return loop.epoch


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
        extra = {"num_classes": ckpt["num_classes"]} if "num_classes" in ckpt else {}  # a classifier
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
