"""Sentence classification (SST-2): one-shot search and retraining, the classification twins of
:mod:`nas.engine.search` and :mod:`nas.engine.train`.

Splits (:func:`nas.data.sentences.load_sst2`): the weights train on GLUE train minus a held-out part; α (search)
and model selection (retraining) use that held-out part; the reported test figure is the GLUE *dev* accuracy,
because the GLUE test split has no labels.  Metric: accuracy, with the mean cross-entropy (nats) beside it.
The search is DARTS's bilevel loop (Liu et al. 2019, Algorithm 1) on sentence batches: per step an α update on
a held-out batch (``strategy.step``), then an SGD step of the weights with gradient clipping.  Retraining: SGD
or NT-ASGD (the non-monotone trigger on the held-out loss, as for language models), the best held-out accuracy
checkpointed, then reloaded and scored on the test split.
"""
from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from nas.atomic import atomic_write_text
from nas.data.sentences import Sentences, check_batchable, load_sst2, sentence_batches
from nas.engine.asgd import averaged_weights, is_averaging, make_asgd, make_optimizer, nonmono_trigger, set_lr
from nas.engine.common import absolute_path, atomic_torch_save, configure_runtime, load_checkpoint, seed_everything
from nas.engine.resume import Keeper, load_into, open_run, retrain_keeper, start_run, stop_signals
from nas.engine.rundir import scoped
from nas.engine.lm import NonFiniteLossError
from nas.engine.search import OneShotOutputs, _alpha_shape, _lrs, make_search_optimizer, select_path, strategy_summary
from nas.engine.tb import log_genotype_figure
from nas.errors import ConfigError
from nas.genotype import GenotypeError
from nas.spaces import build_space
from nas.strategies import STRATEGIES
from nas.strategies.darts import SentenceInputs

log = logging.getLogger(__name__)

#: training batches are drawn from pools of this many batches sorted by length (nas.data.sentences): SST-2's
#: mean padded length drops from about 35 to 10 words, and the step time with it
BUCKET = 50


@dataclass
class SentenceData:
    """A run's splits: ``train`` (weights), ``search`` (α; None when retraining), ``valid`` (held-out part of
    GLUE train), ``test`` (GLUE dev); ``ntoken`` vocabulary size (index 0 = padding), ``num_classes``."""

    ntoken: int
    num_classes: int
    train: Sentences
    search: Optional[Sentences]
    valid: Sentences
    test: Sentences


def prepare_sentence_data(cfg, alpha_split: Optional[str] = None) -> SentenceData:
    """Load the sentence dataset of ``cfg.dataset`` and pick the α split.

    alpha_split: ``valid`` (the held-out part of train), ``train_half`` (weights on the first half of the
    remaining train sentences, α on the second), or None (retraining).
    Raises:
        nas.data.DataError: missing / malformed data, or a split with fewer sentences than one batch.
    """
    d = cfg.dataset
    data = load_sst2(absolute_path(d.root), holdout=d.holdout, seed=d.split_seed, min_freq=d.min_freq)
    train, search = data.train, None
    if alpha_split == "valid":
        search = data.valid
    elif alpha_split == "train_half":
        half = len(train) // 2
        search = Sentences(train.tokens[half:], train.labels[half:])
        train = Sentences(train.tokens[:half], train.labels[:half])
    check_batchable(train, cfg.batch_size, f"{d.name} train")
    if search is not None:
        check_batchable(search, cfg.batch_size, f"{d.name} {alpha_split} (alpha split)")
    check_batchable(data.valid, 1, f"{d.name} valid (held out of train)")
    check_batchable(data.test, 1, f"{d.name} test (GLUE dev)")
    return SentenceData(data.ntoken, data.num_classes, train, search, data.valid, data.test)


@dataclass(frozen=True)
class ClassificationResult:
    """Summed cross-entropy (nats) and correct predictions over ``count`` sentences."""

    nll: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        return self.nll / self.count

    @property
    def accuracy(self) -> float:
        return self.correct / self.count


@torch.no_grad()
def evaluate_sentences(model, split: Sentences, batch_size: int, device, weights=None,
                       max_batches: Optional[int] = None) -> ClassificationResult:
    """Accuracy and cross-entropy of ``model`` on a split, every sentence once (in file order).

    Runs in eval mode and restores the ``training`` flag; the NLL is summed in float64.
    """
    was_training = model.training
    model.eval()
    try:
        nll, correct, count = 0.0, 0, 0
        for n, b in enumerate(sentence_batches(split, batch_size, shuffle=False, device=device)):
            if max_batches is not None and n >= max_batches:
                break
            logits = model(b.tokens, b.lengths, weights).logits
            nll += torch.nn.functional.cross_entropy(logits.double(), b.labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == b.labels).sum())
            count += b.labels.numel()
        return ClassificationResult(nll, correct, count)
    finally:
        model.train(was_training)


def classifier_objective(out, targets) -> torch.Tensor:
    """The classifier's training loss: the mean cross-entropy of its output (no activation regularization)."""
    return out.loss


def classifier_step(model, optimizer, batch: SentenceInputs, clip: float, weights=None):
    """One weight update on a sentence batch: cross-entropy, backward, clip the gradient norm, SGD step.

    Returns ``(mean cross-entropy in nats, correct predictions)``.
    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN/inf; nothing has been updated then.
    """
    optimizer.zero_grad(set_to_none=True)
    out = model(*batch.inputs(), weights, batch.targets)
    value = out.loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"training loss became {value} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                                 "lower lr or clip")
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not math.isfinite(norm.item()):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the weights' gradient norm became {norm.item()} (loss {value:.4g}); lower lr "
                                 "or clip")
    optimizer.step()
    return value, int((out.logits.detach().argmax(-1) == batch.targets).sum())


def _inputs(b) -> SentenceInputs:
    return SentenceInputs(b.tokens, b.labels, b.lengths)


def _data_rng(seed: int, stream: int, k: int) -> np.random.Generator:
    """The shuffling generator of training epoch ``k`` (``stream`` 0) or α pass ``k`` (``stream`` 1): each pass
    has its own, so a resumed run rebuilds any pass's order from its number alone."""
    return np.random.default_rng([seed, stream, k])


def _epoch_batches(split: Sentences, cfg, stream: int, k: int, skip: int, device) -> Iterator[SentenceInputs]:
    """The shuffled, length-bucketed batches of pass ``k`` of ``split``, from batch number ``skip`` on."""
    batches = sentence_batches(split, cfg.batch_size, shuffle=True, rng=_data_rng(cfg.seed, stream, k),
                               device=device, drop_last=True, bucket=BUCKET)
    return itertools.islice(batches, skip, None)


class _AlphaStream:
    """The α batches of a search: endless passes over the α split, each shuffled anew; its position (pass, batch)
    goes into the resume checkpoint."""

    def __init__(self, split: Sentences, cfg, device):
        self.split, self.cfg, self.device = split, cfg, device
        self.k, self.n, self._it = 0, 0, None

    def __next__(self) -> SentenceInputs:
        while True:
            if self._it is None:
                self._it = _epoch_batches(self.split, self.cfg, 1, self.k, self.n, self.device)
            b = next(self._it, None)
            if b is not None:
                self.n += 1
                return _inputs(b)
            self.k, self.n, self._it = self.k + 1, 0, None

    def state(self) -> tuple:
        return (self.k, self.n)

    def load(self, state) -> None:
        self.k, self.n = state
        self._it = None


def _steps_per_epoch(cfg, split: Sentences) -> int:
    n = len(split) // cfg.batch_size
    return min(n, cfg.limit_train_batches) if cfg.limit_train_batches else n


class _Meter:
    """Training-epoch bookkeeping: mean loss and accuracy, step counters, TensorBoard, progress bar."""

    def __init__(self, state, writer, bar, log_every, partial=(0.0, 0, 0)):
        self.state, self.writer, self.bar, self.log_every = state, writer, bar, log_every
        self.nll, self.correct, self.count = partial

    @property
    def partial(self) -> tuple:
        """``(summed NLL, correct, sentences)`` of the epoch so far (for a resume checkpoint)."""
        return (self.nll, self.correct, self.count)

    def record(self, loss: float, correct: int, n: int, tokens: int, scalars: dict) -> None:
        self.nll += loss * n
        self.correct += correct
        self.count += n
        self.state["step"] += 1
        self.state["sentences"] += n
        self.state["tokens"] += tokens
        step = self.state["step"]
        if step % self.log_every == 0 or step == 1:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/accuracy", correct / n, step)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    @property
    def loss(self) -> float:
        return self.nll / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def _check_task(cfg) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")


@scoped  # the run dir this call takes is given back when it returns
def search_classifier(cfg, run_dir: Optional[str] = None) -> dict:
    """One-shot architecture search for sentence classification; returns the metrics of ``metrics.json``.

    Outputs in ``run_dir`` as :func:`nas.engine.search.search`: ``genotype.json``, ``genotype.png``,
    ``genotypes/epoch_NNN.json``, ``metrics.json`` (held-out accuracy and loss per epoch), ``checkpoint.pt``,
    ``tb/``, ``config.yaml``.
    Raises:
        nas.data.DataError: data missing, malformed or too small.  ConfigError: a space without a classifier.
        NonFiniteLossError: the loss became NaN/inf (the last checkpoint is kept).
    """
    from nas.config import SearchConfig

    _check_task(cfg)
    cfg, run_dir, resuming = open_run(cfg, run_dir, SearchConfig, "search.py")
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    space = build_space(cfg.space)
    _check_classifier(space.build_supernet, cfg)
    device = configure_runtime(cfg)
    seed_everything(cfg.seed)
    alpha_split = cfg.strategy.get("alpha_split", "valid")
    data = prepare_sentence_data(cfg, alpha_split)
    model = space.build_supernet(data.ntoken, num_classes=data.num_classes).to(device)
    strategy = STRATEGIES.get(cfg.strategy.name)(cfg.strategy, space, model, classifier_objective,
                                                 weight_decay=cfg.weight_decay, clip=cfg.clip, seed=cfg.seed)
    w_optimizer = make_search_optimizer(cfg, model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("search: space=%s strategy=%s on %s (%d train / %d alpha sentences), device %s, "
             "%d weights, alphas %s, run dir %s", cfg.space.name, strategy_summary(cfg.strategy),
             cfg.dataset.name, len(data.train), len(data.search), device, n_params, _alpha_shape(strategy), run_dir)
    per_epoch = _steps_per_epoch(cfg, data.train)
    alpha_batches = _AlphaStream(data.search, cfg, device)
    state = {"step": 0, "sentences": 0, "tokens": 0, "history": [], "best_acc": -1.0, "epoch_start": 0.0,
             "epoch_tokens": 0}
    pos = {"epoch": 1, "batch": 0, "partial": (0.0, 0, 0)}

    def restore(ck):
        load_into("weights", run_dir, model, ck["model"])
        load_into("architecture state (α)", run_dir, strategy, ck["strategy"])
        load_into("weight optimizer state", run_dir, w_optimizer, ck["w_optimizer"])
        pos.update(ck["position"])
        alpha_batches.load(ck["alpha_stream"])

    keeper = Keeper(cfg, run_dir, "search_classifier", "search.py", state,
                    lambda: {"model": model.state_dict(), "strategy": strategy.state_dict(),
                             "w_optimizer": w_optimizer.state_dict(), "position": dict(pos),
                             "alpha_stream": alpha_batches.state()},
                    restore, device, modules=(model, getattr(strategy, "alphas", None)))
    writer = start_run(keeper, resuming, cfg_yaml)
    bar = tqdm(total=per_epoch * cfg.epochs, initial=state["step"], desc="search", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    outputs = OneShotOutputs(run_dir, cfg, writer, space, strategy, "valid_accuracy", "maximize")
    outputs.trials.resume(keep=lambda r: r["epoch"] < pos["epoch"])
    try:
        with stop_signals():
            while pos["epoch"] <= cfg.epochs:
                epoch = pos["epoch"]
                if pos["batch"] == 0:
                    state["epoch_start"], state["epoch_tokens"] = keeper.clock.now(), state["tokens"]
                model.train()
                meter = _Meter(state, writer, bar, cfg.log_every, tuple(pos["partial"]))
                try:
                    for b in _epoch_batches(data.train, cfg, 0, epoch, pos["batch"], device):
                        if pos["batch"] >= per_epoch:
                            break
                        train_b = _inputs(b)
                        lr = cfg.lr * state["lr_scale"]
                        set_lr(w_optimizer, lr)
                        strategy.step(train_b, next(alpha_batches), lr)
                        loss, correct = classifier_step(model, w_optimizer, train_b, cfg.clip,
                                                        strategy.edge_weights())
                        meter.record(loss, correct, b.labels.numel(), int(b.lengths.sum()),
                                     _lrs(w_optimizer, strategy))
                        pos["batch"], pos["partial"] = pos["batch"] + 1, meter.partial
                        keeper.step_done(f"at step {state['step']} (epoch {epoch})")
                except NonFiniteLossError as err:
                    keeper.on_non_finite(NonFiniteLossError(f"step {state['step'] + 1}: {err}"), writer, bar, "step")
                    continue
                select_path(strategy, lambda w, n: evaluate_sentences(
                    model, data.valid, cfg.strategy.get("score_batch_size") or cfg.eval_batch_size, device, w,
                    n if n is not None else cfg.limit_eval_batches).accuracy, "maximize", final=epoch == cfg.epochs)
                valid = evaluate_sentences(model, data.valid, cfg.eval_batch_size, device, strategy.eval_weights(),
                                           cfg.limit_eval_batches)
                genotype = strategy.export()
                state["best_acc"] = max(state["best_acc"], valid.accuracy)
                state["history"].append({"epoch": epoch, "train_loss": meter.loss, "train_accuracy": meter.accuracy,
                                         "valid_loss": valid.loss, "valid_accuracy": valid.accuracy,
                                         "genotype": genotype.to_dict()})
                writer.add_scalar("valid/accuracy", valid.accuracy, state["step"])  # the step axis, as every tag
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar("train/epoch_accuracy", meter.accuracy, state["step"])
                outputs.epoch(epoch, genotype, valid.accuracy, keeper.clock.now() - state["epoch_start"],
                              state["tokens"] - state["epoch_tokens"])
                pos.update({"epoch": epoch + 1, "batch": 0, "partial": (0.0, 0, 0)})
                keeper.save()
                log.info("epoch %d: train accuracy %.4f, valid accuracy %.4f (loss %.4f), genotype %s", epoch,
                         meter.accuracy, valid.accuracy, valid.loss, genotype)
                bar.set_postfix(valid_acc=f"{valid.accuracy:.4f}")
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        genotype = outputs.final()
        writer.commit()  # the final genotype's picture (no checkpoint after it)
    finally:
        bar.close()
        writer.close()
    wall, history = keeper.clock.now(), state["history"]
    metrics = {"task": "classification", "final_valid_accuracy": history[-1]["valid_accuracy"],
               "final_valid_loss": history[-1]["valid_loss"], "best_valid_accuracy": state["best_acc"],
               "epochs": cfg.epochs, "steps": state["step"], "train_sentences": state["sentences"],
               "train_tokens": state["tokens"], "wall_seconds": wall, "params": n_params,
               "rollbacks": state["rollbacks"], "genotype": genotype.to_dict(), "history": history}
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    log.info("done in %.1f s: genotype %s written to %s", wall, genotype, os.path.join(run_dir, "genotype.json"))
    return metrics


def _check_classifier(factory, cfg) -> None:
    """ConfigError unless the space's ``factory`` builds classifiers and ``compile`` is off."""
    if "num_classes" not in inspect.signature(factory).parameters:
        raise ConfigError(f"space={cfg.space.name} builds language models only; dataset={cfg.dataset.name} "
                          "needs a space with a classifier, e.g. space=hybrid")
    if cfg.compile:
        raise ConfigError("compile=true: the classifiers have no compiled path; set compile=false")


def train_classifier(cfg, genotype, arch_desc: str, run_dir: str, score_test: bool = True,
                     resuming: bool = False) -> dict:
    """Retrain ``genotype`` as a sentence classifier; returns the metrics of ``metrics.json``.

    Called by :func:`nas.engine.train.train` (which resolved and checked the genotype, and says whether the run
    dir holds a checkpoint to resume: ``resuming``).  Selects the epoch with
    the best held-out accuracy (``best.pt``, averaged weights under ASGD), reloads it and reports the test
    (GLUE dev) accuracy and loss.
    Raises:
        nas.data.DataError: data missing, malformed or too small.  NonFiniteLossError: NaN/inf loss.
    """
    from nas.engine.train import BEST_CHECKPOINT

    _check_task(cfg)
    space = build_space(cfg.space)
    _check_classifier(space.freeze, cfg)
    device = configure_runtime(cfg)
    seed_everything(cfg.seed)
    data = prepare_sentence_data(cfg, None)
    try:
        model = space.freeze(genotype, data.ntoken, num_classes=data.num_classes).to(device)
    except GenotypeError as err:
        raise GenotypeError(f"arch={cfg.arch} ({arch_desc}): {err}") from None
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train: arch %s\n  genotype %s\n  %d parameters, %s (%d train / %d valid / %d test sentences), "
             "device %s, run dir %s", arch_desc, genotype, n_params, cfg.dataset.name, len(data.train),
             len(data.valid), len(data.test), device, run_dir)
    opt = {"optimizer": make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)}
    state = {"step": 0, "sentences": 0, "tokens": 0, "train_seconds": 0.0, "history": [], "val_losses": [],
             "best": {"accuracy": -1.0, "epoch": None, "loss": math.inf},
             "asgd_epoch": 0 if cfg.optimizer == "asgd" else None}
    pos = {"epoch": 1, "batch": 0, "partial": (0.0, 0, 0)}
    best_path = os.path.join(run_dir, BEST_CHECKPOINT)
    per_epoch = _steps_per_epoch(cfg, data.train)

    keeper = retrain_keeper(cfg, run_dir, "train_classifier", state, model, opt, _Position(pos), device)
    writer = start_run(keeper, resuming, OmegaConf.to_yaml(cfg, resolve=True), genotype)
    log_genotype_figure(writer, genotype, 0, os.path.join(run_dir, "genotype.png"))
    bar = tqdm(total=per_epoch * cfg.epochs, initial=state["step"], desc="train", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        with stop_signals():
            while pos["epoch"] <= cfg.epochs:
                epoch, t0 = pos["epoch"], time.time()
                model.train()
                meter = _Meter(state, writer, bar, cfg.log_every, tuple(pos["partial"]))
                lr = cfg.lr * state["lr_scale"]
                set_lr(opt["optimizer"], lr)
                try:
                    for b in _epoch_batches(data.train, cfg, 0, epoch, pos["batch"], device):
                        if pos["batch"] >= per_epoch:
                            break
                        loss, correct = classifier_step(model, opt["optimizer"], _inputs(b), cfg.clip)
                        meter.record(loss, correct, b.labels.numel(), int(b.lengths.sum()), {"lr": lr})
                        pos["batch"], pos["partial"] = pos["batch"] + 1, meter.partial
                        keeper.step_done(f"at step {state['step']} (epoch {epoch})")
                except NonFiniteLossError as err:
                    state["train_seconds"] += time.time() - t0
                    keeper.on_non_finite(NonFiniteLossError(f"step {state['step'] + 1}: {err}"), writer, bar, "step")
                    continue
                state["train_seconds"] += time.time() - t0
                optimizer = opt["optimizer"]
                averaged = is_averaging(optimizer)
                with averaged_weights(model, optimizer):
                    valid = evaluate_sentences(model, data.valid, cfg.eval_batch_size, device,
                                               max_batches=cfg.limit_eval_batches)
                best = state["best"]
                if (valid.accuracy, -valid.loss) > (best["accuracy"], -best["loss"]) or best["epoch"] is None:
                    state["best"] = best = {"accuracy": valid.accuracy, "epoch": epoch, "loss": valid.loss}
                    with averaged_weights(model, optimizer):
                        atomic_torch_save({"model": model.state_dict(), "genotype": genotype.to_dict(),
                                           "config": OmegaConf.to_container(cfg, resolve=True),
                                           "ntoken": data.ntoken, "num_classes": data.num_classes,
                                           "params": n_params, "epoch": epoch, "valid_accuracy": valid.accuracy,
                                           "valid_loss": valid.loss, "averaged": averaged}, best_path)
                switched = False
                loss_for_trigger = valid.loss if math.isfinite(valid.loss) else math.inf
                if cfg.optimizer == "ntasgd" and not averaged and nonmono_trigger(state["val_losses"],
                                                                                  loss_for_trigger, cfg.nonmono):
                    opt["optimizer"] = make_asgd(model.parameters(), cfg.lr, cfg.weight_decay)
                    state["asgd_epoch"], switched = epoch, True
                if not averaged:
                    state["val_losses"].append(loss_for_trigger)
                state["history"].append({"epoch": epoch, "train_loss": meter.loss,
                                         "train_accuracy": meter.accuracy, "valid_loss": valid.loss,
                                         "valid_accuracy": valid.accuracy, "averaged": averaged,
                                         "seconds": time.time() - t0})
                writer.add_scalar("valid/accuracy", valid.accuracy, state["step"])  # the step axis, as every tag
                writer.add_scalar("valid/loss", valid.loss, state["step"])
                writer.add_scalar("train/epoch_accuracy", meter.accuracy, state["step"])
                writer.add_scalar("optim/averaged", float(averaged), state["step"])
                writer.flush()
                pos.update({"epoch": epoch + 1, "batch": 0, "partial": (0.0, 0, 0)})
                keeper.save()
                log.info("epoch %d: train accuracy %.4f, valid accuracy %.4f (loss %.4f)%s (best %.4f at epoch "
                         "%d)%s", epoch, meter.accuracy, valid.accuracy, valid.loss,
                         " [averaged weights]" if averaged else "", best["accuracy"], best["epoch"],
                         "; switching to averaged SGD (non-monotone trigger)" if switched else "")
                bar.set_postfix(valid_acc=f"{valid.accuracy:.4f}")
                if epoch < cfg.epochs:
                    keeper.check_stop(f"after epoch {epoch}")
        bar.close()
        test = None
        if score_test:
            model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
            test = evaluate_sentences(model, data.test, cfg.eval_batch_size, device)
            writer.add_scalar("test/accuracy", test.accuracy, state["step"])
            writer.add_scalar("test/loss", test.loss, state["step"])
        writer.commit()  # the test figures (no checkpoint after them)
    finally:
        bar.close()
        writer.close()
    wall, best = keeper.clock.now(), state["best"]
    metrics = {"task": "classification", "arch": cfg.arch, "best_valid_accuracy": best["accuracy"],
               "best_epoch": best["epoch"], "test_accuracy": test and test.accuracy,
               "test_loss": test and test.loss, "test_sentences": test and test.count,
               "test_split": "GLUE dev (the GLUE test split has no labels)",
               "params": n_params, "epochs": cfg.epochs, "steps": state["step"],
               "train_sentences": state["sentences"], "train_tokens": state["tokens"],
               "asgd_epoch": state["asgd_epoch"], "train_seconds": state["train_seconds"], "wall_seconds": wall,
               "device": str(device), "rollbacks": state["rollbacks"], "genotype": genotype.to_dict(),
               "history": state["history"]}
    atomic_write_text(os.path.join(run_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    tested = (f"test (GLUE dev) accuracy {test.accuracy:.4f} ({test.count} sentences)" if test is not None
              else "test split not scored")
    log.info("done in %.1f s: best valid accuracy %.4f (epoch %d), %s; %d params; %s", wall, best["accuracy"],
             best["epoch"], tested, n_params, os.path.join(run_dir, "metrics.json"))
    return metrics


class _Position(NamedTuple):
    """A classification loop's position (epoch, batch, partial figures) for the resume checkpoint."""

    pos: dict

    def snapshot(self) -> dict:
        return {"position": dict(self.pos)}

    def restore(self, ckpt: dict) -> None:
        self.pos.update(ckpt["position"])


def is_classification(cfg: DictConfig) -> bool:
    """True when ``cfg.dataset`` names a sentence-classification dataset."""
    from nas.data.sentences import CLASSIFICATION_DATASETS

    return cfg.dataset.name in CLASSIFICATION_DATASETS
