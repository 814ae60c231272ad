"""A toy task written from scratch against the Task interface (:mod:`nas.tasks.base`), outside ``nas/``.

It exists to show that adding a task is one module: nothing in the engine, the configs or the other tasks knows it,
yet ``search``, ``train`` and the black-box loop run it, and the registry-parametrized tests
(``tests/test_tasks.py``) pick it up because ``tests/conftest.py`` imports this module.

The problem (``toy_majority``): sequences of bits of odd length 3..9, tokens ``1`` = bit 0 and ``2`` = bit 1
(``0`` is padding), label = the majority bit (1 when more than half of the bits are 1).  Majority is what a
mean-pooled classifier can learn in a few steps (parity is not).  Metric: the **error rate** (fraction of wrong
predictions, minimize) -- deliberately neither the language model's ``ppl`` nor the classifier's ``accuracy``, so a
name or direction hard-coded in the engine shows.  Cost unit: bits of the training sequences.

Data on disk (``example(folder)`` writes it; ``dataset.root`` names the folder): ``train.txt``, ``valid.txt``,
``test.txt``, one sequence a line: ``<bits> <label>``, e.g. ``10110 1``.  α (search) is trained on ``valid``
(``strategy.alpha_split=valid``) or the second half of ``train`` (``train_half``); retraining selects on ``valid``.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Any, Iterator, List, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from nas.data import DataError
from nas.errors import ConfigError, NonFiniteLossError
from nas.tasks import TASKS, Step, StepResult, Task

NAME = "toy_majority"
#: token ids: 0 padding, 1 bit 0, 2 bit 1
PAD, NTOKEN = 0, 3
SPLITS = ("train", "valid", "test")
#: sequences per split that example() writes
EXAMPLE_SIZES = {"train": 256, "valid": 64, "test": 64}


def majority(bits: List[int]) -> int:
    """1 when more than half of ``bits`` (0/1 values, odd length) are 1, else 0."""
    return int(2 * sum(bits) > len(bits))


# -- data ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitSequences:
    """One split: ``bits`` (lists of 0/1), ``labels`` (0/1), index-aligned."""

    bits: List[List[int]]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.labels)


def read_split(path: str) -> BitSequences:
    """Read ``<bits> <label>`` lines.  Raises DataError for a missing file or a malformed line."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: the {NAME} task reads train.txt, valid.txt and test.txt from "
                        "dataset.root (tests/toy_task.py example() writes them)")
    bits, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 2 or not fields[0] or set(fields[0]) - {"0", "1"} or fields[1] not in ("0", "1"):
                raise DataError(f"{path}:{n}: expected '<bits> <label>' with bits and label in 0/1, got {line!r}")
            bits.append([int(c) for c in fields[0]])
            labels.append(int(fields[1]))
    return BitSequences(bits, labels)


@dataclass
class ToyData:
    """A run's splits: ``train`` (weights), ``search`` (α; None when retraining), ``valid``, ``test``."""

    train: BitSequences
    search: Optional[BitSequences]
    valid: BitSequences
    test: BitSequences
    device: Any = None
    ntoken: int = NTOKEN
    num_classes: int = 2


class BitBatch(NamedTuple):
    """Tokens [T, B] long (right-padded with 0), labels ``targets`` [B] long, ``lengths`` [B] long."""

    tokens: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def inputs(self) -> tuple:
        """The classifier's positional inputs: ``model(tokens, lengths, weights, targets)``."""
        return (self.tokens, self.lengths)


def make_batch(split: BitSequences, idx, device) -> BitBatch:
    """The sequences ``idx`` of ``split`` as one padded batch (bit b -> token b + 1)."""
    seqs = [split.bits[i] for i in idx]
    T = max(len(s) for s in seqs)
    tokens = torch.full((T, len(seqs)), PAD, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[: len(s), b] = torch.tensor(s, dtype=torch.long) + 1
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    targets = torch.tensor([split.labels[i] for i in idx], dtype=torch.long)
    return BitBatch(tokens.to(device), targets.to(device), lengths.to(device))


def shuffled_batches(split: BitSequences, batch_size: int, seed: int, stream: int, k: int, skip: int,
                     device) -> Iterator[BitBatch]:
    """Pass ``k`` of ``split`` in full batches, shuffled by its own generator ``(seed, stream, k)`` (so any pass is
    rebuilt from its number alone), from batch number ``skip`` on."""
    order = np.random.default_rng([seed, stream, k]).permutation(len(split))
    for n in range(skip, len(split) // batch_size):
        yield make_batch(split, order[n * batch_size:(n + 1) * batch_size].tolist(), device)


class AlphaBatches:
    """The endless α batches of a search: shuffled passes over the α split; its position is (pass, batch)."""

    def __init__(self, split: BitSequences, cfg, device):
        self.split, self.cfg, self.device = split, cfg, device
        self.k, self.n, self._it = 0, 0, None

    def __next__(self) -> BitBatch:
        while True:
            if self._it is None:
                self._it = shuffled_batches(self.split, self.cfg.batch_size, self.cfg.seed, 1, self.k, self.n,
                                            self.device)
            b = next(self._it, None)
            if b is not None:
                self.n += 1
                return b
            self.k, self.n, self._it = self.k + 1, 0, None


# -- loop bookkeeping ------------------------------------------------------------------------------------------
class ToyPosition:
    """Epoch, batch number in it, the epoch's partial figures ``(summed NLL, wrong, sequences)`` and, in a search,
    the α batches' (pass, batch)."""

    def __init__(self, alpha: Optional[AlphaBatches]):
        self.epoch, self.batch, self.partial = 1, 0, (0.0, 0, 0)
        self.alpha = alpha

    def advance(self, step: Step, result: StepResult, alpha_carry, partial: tuple) -> None:
        self.batch, self.partial = self.batch + 1, partial

    def next_epoch(self) -> None:
        self.epoch, self.batch, self.partial = self.epoch + 1, 0, (0.0, 0, 0)

    def snapshot(self) -> dict:
        out = {"toy_position": [self.epoch, self.batch, list(self.partial)]}
        if self.alpha is not None:
            out["toy_alpha"] = [self.alpha.k, self.alpha.n]
        return out

    def restore(self, ckpt: dict) -> None:
        self.epoch, self.batch, partial = ckpt["toy_position"]
        self.partial = tuple(partial)
        if self.alpha is not None:
            self.alpha.k, self.alpha.n = ckpt["toy_alpha"]
            self.alpha._it = None


class ToyMeter:
    """A training epoch's figures (mean loss, error rate), the run's counters, TensorBoard and the bar."""

    def __init__(self, state: dict, writer, bar, log_every: int, partial=(0.0, 0, 0)):
        self.state, self.writer, self.bar, self.log_every = state, writer, bar, log_every
        self.nll, self.wrong, self.count = partial

    @property
    def partial(self) -> tuple:
        return (self.nll, self.wrong, self.count)

    def record_step(self, result: StepResult, scalars: dict) -> None:
        wrong = result.count - result.correct
        self.nll += result.loss * result.count
        self.wrong += wrong
        self.count += result.count
        self.state["step"] += 1
        self.state["tokens"] += result.tokens
        self.state["sequences"] += result.count
        step = self.state["step"]
        if step % self.log_every == 0 or step == 1:
            self.writer.add_scalar("train/loss", result.loss, step)
            self.writer.add_scalar("train/error", wrong / result.count, step)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        self.bar.update(1)

    @property
    def value(self) -> float:
        return self.wrong / max(self.count, 1)

    def figures(self) -> dict:
        return {"train_loss": self.nll / max(self.count, 1), "train_error": self.value}


@dataclass(frozen=True)
class ToyResult:
    """Summed cross-entropy (nats, float64) and wrong predictions over ``count`` sequences."""

    nll: float
    wrong: int
    count: int

    @property
    def loss(self) -> float:
        return self.nll / self.count

    @property
    def error(self) -> float:
        return self.wrong / self.count

    @property
    def accuracy(self) -> float:
        return 1 - self.error


@torch.no_grad()
def score(model, split: BitSequences, batch_size: int, device, weights=None,
          max_batches: Optional[int] = None) -> ToyResult:
    """Error rate and cross-entropy of ``model`` on ``split``, in file order (the last batch may be short), in eval
    mode (the ``training`` flag is restored)."""
    was_training = model.training
    model.eval()
    try:
        nll, wrong, count = 0.0, 0, 0
        for n, start in enumerate(range(0, len(split), batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            b = make_batch(split, range(start, min(start + batch_size, len(split))), device)
            logits = model(*b.inputs(), weights).logits
            nll += torch.nn.functional.cross_entropy(logits.double(), b.targets, reduction="sum").item()
            wrong += int((logits.argmax(-1) != b.targets).sum())
            count += b.targets.numel()
        return ToyResult(nll, wrong, count)
    finally:
        model.train(was_training)


# -- the task --------------------------------------------------------------------------------------------------
class ToyMajorityTask(Task):
    """Majority of a bit sequence (see the module docstring): metric ``error`` (minimize)."""

    name, kind, metric, direction = NAME, "toy", "error", "minimize"
    model_kwargs, counters = ("num_classes",), ("sequences",)
    scalar_tags = ("train/error", "train/epoch_error", "valid/error", "test/error")

    def check(self, cfg, space, job: str) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
        super().check(cfg, space, job)

    def prepare(self, cfg, device, alpha_split=None, retrain=False) -> ToyData:
        root = cfg.dataset.root
        if root is None:
            raise DataError(f"dataset.root is required for the {NAME} task")
        train, valid, test = (read_split(os.path.join(root, f"{s}.txt")) for s in SPLITS)
        search = None
        if alpha_split == "valid":
            search = valid
        elif alpha_split == "train_half":
            half = len(train) // 2
            search = BitSequences(train.bits[half:], train.labels[half:])
            train = BitSequences(train.bits[:half], train.labels[:half])
        elif alpha_split is not None:
            raise ConfigError(f"strategy.alpha_split={alpha_split!r}; the {NAME} task takes valid or train_half")
        for what, split in (("train", train), ("alpha", search)):
            if split is not None and len(split) < cfg.batch_size:
                raise DataError(f"{NAME} {what} split: {len(split)} sequences, fewer than batch_size="
                                f"{cfg.batch_size}")
        for what, split in (("valid", valid), ("test", test)):
            if len(split) == 0:
                raise DataError(f"{NAME} {what} split is empty")
        return ToyData(train, search, valid, test, device)

    def model_args(self, data: ToyData) -> dict:
        return {"num_classes": data.num_classes}

    def describe(self, data: ToyData) -> str:
        return f" ({len(data.train)} train / {len(data.valid)} valid / {len(data.test)} test bit sequences)"

    def objective(self, cfg):
        return lambda out, targets: out.loss

    def position(self, cfg, data: ToyData, np_rng, search: bool) -> ToyPosition:
        return ToyPosition(AlphaBatches(data.search, cfg, data.device) if search else None)

    def _per_epoch(self, cfg, data: ToyData) -> int:
        n = len(data.train) // cfg.batch_size
        return min(n, cfg.limit_train_batches) if cfg.limit_train_batches else n

    def batches(self, cfg, data: ToyData, model, position: ToyPosition, np_rng, search: bool):
        per_epoch = self._per_epoch(cfg, data)
        for b in shuffled_batches(data.train, cfg.batch_size, cfg.seed, 0, position.epoch, position.batch,
                                  data.device):
            if position.batch >= per_epoch:
                break
            yield Step(b, next(position.alpha) if search else None)

    def weight_step(self, model, optimizer, batch: BitBatch, cfg, weights=None) -> StepResult:
        optimizer.zero_grad(set_to_none=True)
        out = model(*batch.inputs(), weights, batch.targets)
        loss = out.loss.item()
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss}")
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        if not math.isfinite(norm.item()):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the weights' gradient norm became {norm.item()}")
        optimizer.step()
        correct = int((out.logits.detach().argmax(-1) == batch.targets).sum())
        return StepResult(loss, None, tokens=int(batch.lengths.sum()), correct=correct,
                          count=batch.targets.numel())

    def meter(self, state, writer, bar, log_every, partial) -> ToyMeter:
        return ToyMeter(state, writer, bar, log_every, tuple(partial))

    def progress_bar(self, cfg, data: ToyData, desc, state):
        return tqdm(total=self._per_epoch(cfg, data) * cfg.epochs, initial=state["step"], desc=desc, unit="step",
                    disable=not cfg.progress)

    def evaluate(self, model, data: ToyData, split, cfg, weights=None, max_batches=None) -> ToyResult:
        return score(model, data.valid, cfg.eval_batch_size, data.device, weights, max_batches)

    def test(self, model, data: ToyData, cfg) -> ToyResult:
        return score(model, data.test, cfg.eval_batch_size, data.device)

    def test_metrics(self, cfg, data, valid, test, best_checkpoint: str) -> dict:
        return {"test_sequences": None if test is None else test.count}

    def example(self, folder: str) -> list:
        """Write ``train.txt`` / ``valid.txt`` / ``test.txt`` (:data:`EXAMPLE_SIZES` sequences of random bits, odd
        lengths 3..9, seed 0) into ``folder``; the overrides name this task, that folder and the hybrid space, and
        pin the optimizer (the tuning file Hydra picks is keyed by the dataset *group*, still ``ptb`` here)."""
        rng = random.Random(0)
        for split in SPLITS:
            with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
                for _ in range(EXAMPLE_SIZES[split]):
                    bits = [rng.randint(0, 1) for _ in range(rng.choice((3, 5, 7, 9)))]
                    f.write(f"{''.join(map(str, bits))} {majority(bits)}\n")
        return [f"dataset.name={NAME}", f"dataset.task={NAME}", f"dataset.root={folder}", "space=hybrid",
                "optimizer=adam", "lr=0.01", "clip=5.0", "weight_decay=0.0"]


if NAME not in TASKS:  # (imported once by conftest; a second import under another module name must not re-register)
    TASKS.register(NAME)(ToyMajorityTask)
