"""The sentence-classification task (SST-2): labelled sentences in length-bucketed, shuffled batches; metric
accuracy (maximize), the mean cross-entropy (nats) beside it; cost unit: the words of the training sentences.

Splits (:func:`nas.data.sentences.load_sst2`): the weights train on GLUE train minus a held-out part; α (search)
and model selection (retraining) use that held-out part; the reported test figure is the GLUE *dev* accuracy,
because the GLUE test split has no labels.  Metric: accuracy, with the mean cross-entropy (nats) beside it.
In a search, every step takes an α batch from an endless stream of shuffled passes over the α split
(:class:`AlphaStream`, its position resumable); retraining keeps the epoch of the best held-out accuracy (then the
lower loss).  The loops are the engine's (:mod:`nas.engine.search`, :mod:`nas.engine.train`).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from nas.data.sentences import LEGACY_HOLDOUT_BY, Sentences, check_batchable, load_sst2, sentence_batches
from nas.engine.common import absolute_path
from nas.engine.progress import run_progress
from nas.errors import NonFiniteLossError
from nas.tasks.base import TASKS, SentenceInputs, Step, StepResult, Task

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
    device: Any = None


def prepare_sentence_data(cfg, alpha_split: Optional[str] = None, device=None) -> SentenceData:
    """Load the sentence dataset of ``cfg.dataset`` and pick the α split.

    alpha_split: ``valid`` (the held-out part of train), ``train_half`` (weights on the first half of the
    remaining train sentences, α on the second), or None (retraining).
    Raises:
        nas.data.DataError: missing / malformed data, or a split with fewer sentences than one batch.
    """
    d = cfg.dataset
    data = load_sst2(absolute_path(d.root), holdout=d.holdout, seed=d.split_seed, min_freq=d.min_freq,
                     holdout_by=LEGACY_HOLDOUT_BY if d.holdout_by is None else d.holdout_by)
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
    return SentenceData(data.ntoken, data.num_classes, train, search, data.valid, data.test, device)


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


class AlphaStream:
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


class SentenceMeter:
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
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)  # before update: its line shows it
        self.bar.update(1)

    @property
    def loss(self) -> float:
        return self.nll / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    value = accuracy

    def record_step(self, result: StepResult, scalars: dict) -> None:
        """:meth:`record` for the engine's :class:`~nas.tasks.base.StepResult`."""
        self.record(result.loss, result.correct, result.count, result.tokens, scalars)

    def figures(self) -> dict:
        """The epoch's training figures for its history record."""
        return {"train_loss": self.loss, "train_accuracy": self.accuracy}


class SentencePosition:
    """Where a classification loop is: the epoch, the batch number in it, the epoch's partial figures, and in a
    search the α stream's position -- what a resume checkpoint needs besides weights and optimizers."""

    def __init__(self, alpha: Optional[AlphaStream] = None):
        self.epoch, self.batch, self.partial = 1, 0, (0.0, 0, 0)
        self.alpha = alpha

    def advance(self, step: Step, result: StepResult, alpha_carry, partial: tuple) -> None:
        self.batch, self.partial = self.batch + 1, partial

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.partial = self.epoch + 1, 0, (0.0, 0, 0)

    def snapshot(self) -> dict:
        out = {"position": {"epoch": self.epoch, "batch": self.batch, "partial": self.partial}}
        if self.alpha is not None:
            out["alpha_stream"] = self.alpha.state()
        return out

    def restore(self, ckpt: dict) -> None:
        pos = ckpt["position"]
        self.epoch, self.batch, self.partial = pos["epoch"], pos["batch"], tuple(pos["partial"])
        if self.alpha is not None:
            self.alpha.load(ckpt["alpha_stream"])


#: what metrics.json says of the test split
TEST_SPLIT = "GLUE dev (the GLUE test split has no labels)"


@TASKS.register("classification")
class ClassificationTask(Task):
    """Sentence classification (SST-2): metric accuracy (maximize), cost unit the words of the training sentences.

    Splits (:func:`nas.data.sentences.load_sst2`): the weights train on GLUE train minus a held-out part; α (search)
    and model selection (retraining) use that held-out part; the test figure is the GLUE *dev* accuracy, because the
    GLUE test split has no labels.  Objective: the mean cross-entropy.  Not data parallel, no compiled path, and
    ``nan_policy=reload_best`` stays the language models' (DARTS ``rnn/train.py``).
    """

    name, kind, metric, direction = "classification", "classifier", "accuracy", "maximize"
    title = "sentence classification"
    model_kwargs, counters = ("num_classes",), ("sentences",)

    def unfit_space(self, cfg, missing: list) -> str:
        return (f"space={cfg.space.name} builds language models only; dataset={cfg.dataset.name} needs a space with "
                "a classifier, e.g. space=hybrid")

    def prepare(self, cfg, device, alpha_split=None, retrain=False) -> SentenceData:
        return prepare_sentence_data(cfg, alpha_split, device)

    def model_args(self, data: SentenceData) -> dict:
        return {"num_classes": data.num_classes}

    def describe(self, data: SentenceData) -> str:
        if data.search is not None:
            return f" ({len(data.train)} train / {len(data.search)} alpha sentences)"
        return f" ({len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test sentences)"

    def objective(self, cfg):
        return classifier_objective

    def position(self, cfg, data: SentenceData, np_rng, search: bool) -> SentencePosition:
        return SentencePosition(AlphaStream(data.search, cfg, data.device) if search else None)

    def batches(self, cfg, data: SentenceData, model, position: SentencePosition, np_rng, search: bool):
        per_epoch = _steps_per_epoch(cfg, data.train)
        for b in _epoch_batches(data.train, cfg, 0, position.epoch, position.batch, data.device):
            if position.batch >= per_epoch:
                break
            yield Step(_inputs(b), next(position.alpha) if search else None)

    def alpha_batches(self, cfg, data: SentenceData, model, n: int) -> list:
        """The α split's first ``n`` batches of ``batch_size`` sentences, in the split's order (no shuffle)."""
        batches = sentence_batches(data.search, cfg.batch_size, shuffle=False, device=data.device, drop_last=True)
        return [_inputs(b) for b in itertools.islice(batches, n)]

    def weight_step(self, model, optimizer, batch: SentenceInputs, cfg, weights=None) -> StepResult:
        loss, correct = classifier_step(model, optimizer, batch, cfg.clip, weights)
        return StepResult(loss, None, tokens=int(batch.lengths.sum()), correct=correct, count=batch.targets.numel())

    def meter(self, state, writer, bar, log_every, partial) -> SentenceMeter:
        return SentenceMeter(state, writer, bar, log_every, tuple(partial))

    def progress_bar(self, cfg, data: SentenceData, desc, state):
        return run_progress(cfg, _steps_per_epoch(cfg, data.train) * cfg.epochs, desc, "step", initial=state["step"])

    def evaluate(self, model, data: SentenceData, split, cfg, weights=None, max_batches=None):
        strategy = cfg.get("strategy")
        batch_size = cfg.eval_batch_size
        if split == "score" and strategy is not None:
            batch_size = strategy.get("score_batch_size") or batch_size
        return evaluate_sentences(model, data.valid, batch_size, data.device, weights, max_batches)

    def test(self, model, data: SentenceData, cfg) -> ClassificationResult:
        return evaluate_sentences(model, data.test, cfg.eval_batch_size, data.device)

    def test_metrics(self, cfg, data, valid, test, best_checkpoint: str) -> dict:
        return {"test_sentences": test and test.count, "test_split": TEST_SPLIT}

    def fmt(self, value: float) -> str:
        return f"{value:.4f}"

    def example(self, folder: str) -> list:
        """A synthetic SST-2 layout (``train.tsv``: 400 sentences of a 30-word vocabulary, ``dev.tsv``: 60), labels
        drawn at random, read as sst2."""
        import os
        import random

        rng = random.Random(0)
        for split, n in (("train", 400), ("dev", 60)):
            with open(os.path.join(folder, f"{split}.tsv"), "w", encoding="utf-8") as f:
                f.write("sentence\tlabel\n")
                for _ in range(n):
                    words = " ".join(f"w{rng.randrange(30)}" for _ in range(rng.randint(2, 9)))
                    f.write(f"{words}\t{rng.randint(0, 1)}\n")
        return ["dataset=sst2", f"dataset.root={folder}", "space=hybrid"]
