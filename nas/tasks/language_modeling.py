"""The language-modelling task (PTB, WikiText-2): batchified corpora, variable-length BPTT segments with carried
hidden states, the AWD-LSTM objective (cross-entropy + AR + TAR), exact perplexity.

Splits: the weights train on ``train`` (or its first half, ``strategy.alpha_split=train_half``); α trains on
``valid`` (DARTS RNN, Liu et al. 2019 sec. 3.2) or on the second half of train; model selection uses ``valid`` and
the reported figure is the ``test`` perplexity (test batch size 1 in the paper protocol).  Cost unit: training
target tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import functools
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from nas import distributed
from nas.data import batchify, bptt_segments, check_min_size, get_batch, load_corpus
from nas.engine.common import absolute_path
from nas.engine.progress import run_progress
from nas.errors import NonFiniteLossError
from nas.losses import lm_nll
from nas.tasks.base import TASKS, Batch, Step, StepResult, Task


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(total NLL / number of target tokens); an overflow gives ``inf`` (never an exception).

    Args:
        total_nll: summed negative log-likelihood in nats; tokens: count of predicted tokens (> 0).
    Raises:
        ValueError: if ``tokens`` is not positive.
    """
    if tokens <= 0:
        raise ValueError("perplexity of zero tokens is undefined")
    try:
        return math.exp(total_nll / tokens)
    except OverflowError:
        return math.inf


def lm_objective(out, targets: torch.Tensor, ar_alpha: float = 0.0, tar_beta: float = 0.0) -> torch.Tensor:
    """Training loss: mean cross-entropy + AR + TAR (Merity et al. 2018, AWD-LSTM sec. 4.6).

    ``out`` is an LMOutput (fused ``loss``, or logits [T, B, V]; raw_output and output [T, B, H]);
    targets [T, B].  AR = ar_alpha · mean(output²) on the dropped output, TAR = tar_beta · mean((raw_t -
    raw_{t-1})²).
    """
    return lm_nll(out, targets) + activation_regularization(out, ar_alpha, tar_beta)


def activation_regularization(out, ar_alpha: float = 0.0, tar_beta: float = 0.0):
    """The AR + TAR terms of :func:`lm_objective` alone (a 0-dim tensor, or ``0.0`` when both are off).

    For loops that need the raw cross-entropy too: ``raw = CE; loss = raw + activation_regularization(...)``.
    """
    reg = 0.0
    if ar_alpha:
        reg = reg + ar_alpha * out.output.pow(2).mean()
    if tar_beta and out.raw_output.size(0) > 1:
        reg = reg + tar_beta * (out.raw_output[1:] - out.raw_output[:-1]).pow(2).mean()
    return reg


def weight_step(model: nn.Module, optimizer: torch.optim.Optimizer, data: torch.Tensor, targets: torch.Tensor,
                hidden: torch.Tensor, clip: float, ar_alpha: float = 0.0, tar_beta: float = 0.0,
                weights: Optional[torch.Tensor] = None):
    """One weight update on a training segment: CE + AR + TAR, backward, clip the gradient norm, step.

    Args:
        data, targets: [T, B] token ids; hidden: [B, H] incoming state (detached);
        clip: max gradient 2-norm (AWD-LSTM / DARTS 0.25); weights: supernet edge weights [E, K] (detached).
    Returns:
        ``(raw NLL in nats/token without AR/TAR, outgoing hidden [B, H] detached)``.
    Under torchrun the gradient and the returned NLL are the means over the ranks' shards (:mod:`nas.distributed`).
    Raises:
        NonFiniteLossError: if the loss or the gradient norm is NaN/inf; nothing has been updated then.
    """
    optimizer.zero_grad(set_to_none=True)
    out = model(data, hidden, weights, targets)
    raw = out.loss
    loss = raw + activation_regularization(out, ar_alpha, tar_beta)
    # under torchrun: the global batch's mean (equal shards), so every rank logs and decides alike
    raw_value, loss_value = distributed.mean_values([raw.item(), loss.item()])
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"training loss became {loss_value} (lr {optimizer.param_groups[0]['lr']:.3g}); "
                                 f"lower lr or clip")
    loss.backward()
    distributed.average_([p.grad for p in model.parameters()])  # torchrun: the global batch's gradient
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if not math.isfinite(norm.item()):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"the weights' gradient norm became {norm.item()} (loss {loss_value:.4g}, "
                                 f"lr {optimizer.param_groups[0]['lr']:.3g}); lower lr or clip")
    optimizer.step()
    return raw_value, out.hidden.detach()


def token_progress_bar(cfg, source: torch.Tensor, desc: str, initial: int = 0):
    """A tqdm bar (``progress=false``: log lines, :mod:`nas.engine.progress`) over the training target tokens of the
    whole run: ``source`` [T, B] is the training split; ``initial``: the tokens already trained on (a resume).

    It counts tokens, not steps: an epoch scores every training row once, whatever the sampled lengths.
    """
    columns = source.size(1) * distributed.size()  # under torchrun: the global batch's
    per_epoch = (source.size(0) - 1) * columns
    if cfg.limit_train_batches:
        per_epoch = min(per_epoch, cfg.limit_train_batches * cfg.bptt * columns)
    return run_progress(cfg, per_epoch * cfg.epochs, desc, "tok", initial=initial, unit_scale=True)


class EpochMeter:
    """Training-epoch bookkeeping shared by search and retraining: token-weighted NLL, run counters,
    TensorBoard scalars every ``log_every`` steps, and the token progress bar.

    ``state`` is the run's dict with ``step`` and ``tokens`` counters (updated in place).
    """

    def __init__(self, state: dict, writer, bar, log_every: int, partial: tuple = (0.0, 0)):
        """``partial``: ``(nll, tokens)`` of the epoch so far (a resumed epoch; see :meth:`partial`)."""
        self.state, self.writer, self.bar, self.log_every = state, writer, bar, log_every
        self.nll, self.tokens = partial
        self.first = self.tokens == 0

    @property
    def partial(self) -> tuple:
        """``(summed NLL, tokens)`` so far, to resume the epoch's figure from a checkpoint."""
        return (self.nll, self.tokens)

    def record(self, raw: float, tokens: int, scalars: dict) -> None:
        """One step: raw NLL (nats/token) over ``tokens`` targets; ``scalars`` {tag: value} to log."""
        self.nll += raw * tokens
        self.tokens += tokens
        self.state["step"] += 1
        self.state["tokens"] += tokens
        step = self.state["step"]
        if step % self.log_every == 0 or self.first:
            self.writer.add_scalar("train/loss", raw, step)
            self.writer.add_scalar("train/ppl", perplexity(raw, 1), step)
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        self.first = False
        self.bar.set_postfix(step=step, loss=f"{raw:.3f}", refresh=False)  # before update: its line shows them
        self.bar.update(tokens)

    @property
    def ppl(self) -> float:
        """Perplexity of the epoch so far (raw NLL, without AR/TAR)."""
        return perplexity(self.nll, max(self.tokens, 1))

    value = ppl

    def record_step(self, result: StepResult, scalars: dict) -> None:
        """:meth:`record` for the engine's :class:`~nas.tasks.base.StepResult`."""
        self.record(result.loss, result.tokens, scalars)

    def figures(self) -> dict:
        """The epoch's training figures for its history record."""
        return {"train_ppl": self.ppl}


class LMLoop:
    """Where a language-model training loop is (search and retraining): the epoch, the segment number in it and
    the next BPTT row, the hidden states carried across segments, the epoch's partial NLL, and the data sampler
    ``np_rng`` (variable BPTT lengths) -- what a resume checkpoint needs besides weights and optimizers."""

    def __init__(self, np_rng=None):
        self.np_rng = np_rng
        self.epoch, self.batch, self.row = 1, 0, 0
        self.hidden = self.hidden_valid = None
        self.partial = (0.0, 0)

    def advance(self, step: Step, result: StepResult, alpha_carry, partial: tuple) -> None:
        """A segment of ``step.size`` rows is done: the hidden states [B, H] after it (``result.carry``; the α
        batch's ``alpha_carry``, None when retraining), the epoch's (NLL, tokens)."""
        self.batch += 1
        self.row += step.size
        self.hidden, self.hidden_valid, self.partial = result.carry, alpha_carry, partial

    def next_epoch(self) -> None:
        """The epoch is done: the next one starts at row 0 with fresh hidden states."""
        self.epoch, self.batch, self.row = self.epoch + 1, 0, 0
        self.hidden = self.hidden_valid = None
        self.partial = (0.0, 0)

    def snapshot(self) -> dict:
        """The checkpoint part: position, hidden states, partial NLL, and the data sampler's state."""
        # under torchrun the hidden states of the global batch (a collective), so any world size can resume
        return {"position": {"epoch": self.epoch, "batch": self.batch, "row": self.row},
                "hidden": distributed.gather_columns(self.hidden),
                "hidden_valid": distributed.gather_columns(self.hidden_valid), "partial": self.partial,
                "np_rng": self.np_rng.bit_generator.state}

    def restore(self, ckpt: dict) -> None:
        """Back to what :meth:`snapshot` saved (the sampler is set to the saved state in place)."""
        pos = ckpt["position"]
        self.epoch, self.batch, self.row = pos["epoch"], pos["batch"], pos["row"]
        self.hidden, self.hidden_valid = distributed.shard_rows(ckpt["hidden"]), distributed.shard_rows(ckpt["hidden_valid"])
        self.partial = tuple(ckpt["partial"])
        self.np_rng.bit_generator.state = ckpt["np_rng"]


@dataclass(frozen=True)
class EvalResult:
    """Summed NLL (nats) over ``tokens`` predicted tokens, and the resulting perplexity; ``correct``: the tokens whose
    most likely prediction was the target (None: not counted, e.g. a ``best.pt`` written before it was)."""

    nll: float
    tokens: int
    correct: Optional[int] = None

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.nll, self.tokens)

    @property
    def accuracy(self) -> Optional[float]:
        """Next-token accuracy: the fraction of target tokens predicted top-1 (ties: the lowest token id)."""
        return None if self.correct is None else self.correct / self.tokens


@torch.no_grad()
def evaluate(model: nn.Module, source: torch.Tensor, bptt: int, weights: Optional[torch.Tensor] = None,
             max_batches: Optional[int] = None,
             progress: Optional[Callable[[int], None]] = None, over_ranks: bool = False) -> EvalResult:
    """Exact perplexity (and next-token accuracy) of ``model`` on a batchified split.

    Every target position of ``source`` [T, B] is scored once, in fixed segments of ``bptt`` (the last
    may be shorter, down to length 1), carrying the hidden state; the NLL is summed in float64 and divided
    by the number of target tokens, so the result does not depend on batch size or bptt (up to the
    columns' hidden-state resets).  Runs in eval mode and restores the model's ``training`` flag;
    touches no parameter and no optimizer.

    Args:
        model: a language model ``model(data, hidden, weights) -> LMOutput``.
        source: [T, B] token ids; weights: supernet edge weights [E, K] or None.
        max_batches: score only the first segments (a partial, still exact, figure).
        progress: called after each segment with its number of target tokens (e.g. ``tqdm.update``).
        over_ranks: ``source`` is this rank's shard of the split (torchrun): the NLL and token counts are summed
            over the ranks, giving the whole split's figure (a collective; see :attr:`LMData.sharded`).
    """
    was_training = model.training
    model.eval()
    try:
        hidden = model.init_hidden(source.size(1))
        total, count, correct = 0.0, 0, 0
        for n, (i, seq_len) in enumerate(bptt_segments(source, bptt)):
            if max_batches is not None and n >= max_batches:
                break
            data, targets = get_batch(source, i, seq_len)
            out = model(data, hidden, weights)
            logits = out.logits.reshape(-1, out.logits.size(-1))
            total += nn.functional.cross_entropy(logits.double(), targets.reshape(-1), reduction="sum").item()
            correct += int((logits.argmax(-1) == targets.reshape(-1)).sum())
            count += targets.numel()
            hidden = out.hidden
            if progress is not None:
                progress(targets.numel())
        if over_ranks:
            total, count, correct = distributed.sum_values([total, count, correct])
            count, correct = int(count), int(correct)
        return EvalResult(total, count, correct)
    finally:
        model.train(was_training)


@dataclass
class LMData:
    """Batchified splits for one run: ``train`` [T, B] (weights), ``search`` [T, B] (α; None when
    retraining), ``valid`` / ``test`` [T, B_eval]; ``ntoken`` the vocabulary size; ``score`` [T', B_score]: the
    validation split at random_ws's ``strategy.score_batch_size`` (None when not asked for).

    Under torchrun each split holds this rank's shard of the batch columns [T, B/N]; ``sharded`` names the
    evaluation splits that are sharded (an evaluation batch size not divisible by N is scored whole on every
    rank instead): pass ``over_ranks=data.sharded[name]`` to :func:`evaluate`."""

    ntoken: int
    train: torch.Tensor
    search: Optional[torch.Tensor]
    valid: torch.Tensor
    test: torch.Tensor
    sharded: Optional[dict] = None
    score: Optional[torch.Tensor] = None

    def over_ranks(self, split: str) -> bool:
        """Whether ``split`` (valid / test) is sharded over torchrun ranks (its figure needs their sum)."""
        return bool(self.sharded and self.sharded.get(split))


def prepare_lm_data(cfg, device: torch.device, alpha_split: Optional[str] = None,
                    test_batch_size: Optional[int] = None, score_batch_size: Optional[int] = None) -> LMData:
    """Load the corpus named in ``cfg.dataset`` and batchify it for a run.

    alpha_split: ``valid`` (α on the validation split, DARTS RNN), ``train_half`` (weights on the first
    half of train, α on the second), or None (retraining: no α data).
    score_batch_size: also batchify the validation split with this many columns (``LMData.score``).
    Raises:
        nas.data.DataError: missing data, or a split smaller than one batch x bptt.
    """
    d = cfg.dataset
    corpus = load_corpus(d.name, absolute_path(d.root), d.download, absolute_path(d.cache_dir))
    train_tokens, search_tokens = corpus.train, None
    if alpha_split == "train_half":
        half = corpus.train.size(0) // 2
        train_tokens, search_tokens = corpus.train[:half], corpus.train[half:]
    elif alpha_split == "valid":
        search_tokens = corpus.valid
    # every size checked before anything is batchified, the training split first
    test_key = "test_batch_size" if test_batch_size else "eval_batch_size"
    checks = [(train_tokens, cfg.batch_size, f"{d.name} train", True, "batch_size")]
    if search_tokens is not None:
        checks.append((search_tokens, cfg.batch_size, f"{d.name} {alpha_split} (alpha split)", True, "batch_size"))
    checks += [(corpus.valid, cfg.eval_batch_size, f"{d.name} valid", False, "eval_batch_size"),
               (corpus.test, test_batch_size or cfg.eval_batch_size, f"{d.name} test", False, test_key)]
    if score_batch_size is not None:
        checks.append((corpus.valid, score_batch_size, f"{d.name} valid", False, "strategy.score_batch_size"))
    for tokens, batch_size, what, full, key in checks:
        check_min_size(tokens.numel(), batch_size, cfg.bptt, what, full, key)
    search = None if search_tokens is None else batchify(search_tokens, cfg.batch_size, device)
    train = batchify(train_tokens, cfg.batch_size, device)
    valid = batchify(corpus.valid, cfg.eval_batch_size, device)
    test = batchify(corpus.test, test_batch_size or cfg.eval_batch_size, device)
    score = None if score_batch_size is None else batchify(corpus.valid, score_batch_size, device)
    if distributed.world() is None:
        return LMData(len(corpus.vocab), train, search, valid, test, score=score)
    # torchrun: each rank keeps its shard of the columns of the single-process layout
    distributed.check_divisible(cfg.batch_size, "batch_size")
    train, search = distributed.shard_columns(train), search if search is None else distributed.shard_columns(search)
    splits = (("valid", valid), ("test", test)) + ((("score", score),) if score is not None else ())
    sharded = {name: split.size(1) % distributed.size() == 0 for name, split in splits}
    valid, test = (distributed.shard_columns(valid) if sharded["valid"] else valid,
                   distributed.shard_columns(test) if sharded["test"] else test)
    if score is not None and sharded["score"]:
        score = distributed.shard_columns(score)
    return LMData(len(corpus.vocab), train, search, valid, test, sharded, score)


@TASKS.register("language_modeling")
class LanguageModelingTask(Task):
    """Word-level language modelling (PTB, WikiText-2): metric perplexity (minimize), cost unit target tokens.

    Training segments: variable-length BPTT (AWD-LSTM sec. 4.1; the step's learning rate scaled by ``seq_len /
    bptt``), hidden states carried across segments and detached; the α segment of a search is read at the same row
    of the α split with the nominal bptt (DARTS reference ``train_search.py``).  Objective: cross-entropy + AR + TAR
    (:func:`lm_objective`).  Evaluation: exact perplexity (:func:`evaluate`) with ``eval_bptt`` (default ``bptt``);
    test at ``test_batch_size``.
    """

    name, kind, metric, direction = "language_modeling", "lm", "ppl", "minimize"
    title = "language modelling"
    bar_counter, data_parallel, reload_best, compiles = "tokens", True, True, True

    def prepare(self, cfg, device, alpha_split=None, retrain=False) -> LMData:
        strategy = cfg.get("strategy")
        return prepare_lm_data(cfg, device, alpha_split=alpha_split,
                               test_batch_size=cfg.test_batch_size if retrain else None,
                               score_batch_size=strategy.get("score_batch_size") if strategy is not None else None)

    def model_args(self, data) -> dict:
        return {}

    def objective(self, cfg):
        return functools.partial(lm_objective, ar_alpha=cfg.ar_alpha, tar_beta=cfg.tar_beta)

    def position(self, cfg, data, np_rng, search: bool) -> LMLoop:
        return LMLoop(np_rng)

    def batches(self, cfg, data, model, position: LMLoop, np_rng, search: bool):
        source = data.train
        segments = bptt_segments(source, cfg.bptt, variable=True, rng=np_rng,
                                 max_len=cfg.bptt + cfg.max_seq_len_delta, start=position.row,
                                 sampler=cfg.seq_len_sampler)
        for n, (i, seq_len) in enumerate(segments, position.batch):
            if cfg.limit_train_batches and n >= cfg.limit_train_batches:
                break
            data_t, targets_t = get_batch(source, i, seq_len)
            hidden = position.hidden if position.hidden is not None else model.init_hidden(source.size(1))
            alpha = None
            if search:
                # DARTS reads the held-out segment at the same row (wrapped), with the nominal bptt
                data_v, targets_v = get_batch(data.search, i % (data.search.size(0) - 1), cfg.bptt)
                hidden_v = (position.hidden_valid if position.hidden_valid is not None
                            else model.init_hidden(source.size(1)))
                alpha = Batch(data_v, targets_v, hidden_v)
            yield Step(Batch(data_t, targets_t, hidden), alpha, data_t.size(0) / cfg.bptt, seq_len)

    def alpha_batches(self, cfg, data, model, n: int) -> list:
        """The α split's first ``n`` segments of ``bptt`` rows, each from a zero hidden state."""
        rows = data.search.size(0) - 1
        return [Batch(*get_batch(data.search, i, cfg.bptt), model.init_hidden(data.search.size(1)))
                for i in range(0, min(n * cfg.bptt, rows), cfg.bptt)]

    def weight_step(self, model, optimizer, batch: Batch, cfg, weights=None) -> StepResult:
        raw, hidden = weight_step(model, optimizer, batch.data, batch.targets, batch.hidden, cfg.clip,
                                  cfg.ar_alpha, cfg.tar_beta, weights)
        return StepResult(raw, hidden, tokens=batch.targets.numel() * distributed.size())

    def meter(self, state, writer, bar, log_every, partial) -> EpochMeter:
        return EpochMeter(state, writer, bar, log_every, partial)

    def progress_bar(self, cfg, data, desc, state):
        return token_progress_bar(cfg, data.train, desc, initial=state["tokens"])

    def evaluate(self, model, data: LMData, split, cfg, weights=None, max_batches=None) -> EvalResult:
        if split == "score" and data.score is not None:
            source, over = data.score, "score"
        else:
            source, over = data.valid, "valid"
        return evaluate(model, source, cfg.get("eval_bptt") or cfg.bptt, weights, max_batches,
                        over_ranks=data.over_ranks(over))

    def test(self, model, data: LMData, cfg) -> EvalResult:
        source, bptt = data.test, cfg.get("eval_bptt") or cfg.bptt
        segments = len(range(0, source.size(0) - 1, bptt))
        total = min(segments, cfg.limit_eval_batches or segments)
        with tqdm(total=total, desc="test", unit="seg", disable=not cfg.progress or not distributed.is_writer(),
                  dynamic_ncols=True) as bar:
            return evaluate(model, source, bptt, None, cfg.limit_eval_batches, lambda n: bar.update(1),
                            data.over_ranks("test"))

    def best_state(self, result: EvalResult) -> dict:
        return {"loss": result.loss if math.isfinite(result.loss) else math.inf, "ppl": result.ppl,
                "accuracy": result.accuracy}

    def selection_key(self, figures: dict) -> tuple:
        return (-figures["loss"],)

    def best_figures(self, result: EvalResult) -> dict:
        return {"valid_nll": result.nll, "valid_tokens": result.tokens, "valid_ppl": result.ppl,
                "valid_correct": result.correct}

    def test_metrics(self, cfg, data: LMData, valid, test, best_checkpoint: str) -> dict:
        if valid is None:  # resumed after the last epoch had finished: the best checkpoint holds its figures
            from nas.engine.common import load_checkpoint

            distributed.barrier()
            best = load_checkpoint(best_checkpoint)
            valid = EvalResult(best["valid_nll"], best["valid_tokens"], best.get("valid_correct"))
        exact = _whole(valid, data.valid, data.over_ranks("valid")) and (
            test is None or _whole(test, data.test, data.over_ranks("test")))
        return {"test_tokens": test and test.tokens, "valid_tokens": valid.tokens, "exact_eval": exact,
                "test_batch_size": cfg.test_batch_size, "eval_batch_size": cfg.eval_batch_size}

    def fmt(self, value: float) -> str:
        return f"{value:.2f}"

    def example(self, folder: str) -> list:
        """A 40-word synthetic corpus (``train.txt``, ``valid.txt``, ``test.txt``; 300 / 60 / 60 lines) read as ptb."""
        import os
        import random

        rng = random.Random(0)
        for split, lines in (("train", 300), ("valid", 60), ("test", 60)):
            with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
                for _ in range(lines):
                    f.write(" " + " ".join(f"w{rng.randrange(40)}" for _ in range(rng.randint(3, 11))) + " \n")
        return ["dataset=ptb", f"dataset.root={folder}", "space=darts_rnn"]


def _whole(result: EvalResult, source: torch.Tensor, over_ranks: bool = False) -> bool:
    """True when ``result`` scored every target of ``source`` [T, B] (no ``limit_eval_batches`` cut); with
    ``over_ranks``, ``source`` is one of the torchrun ranks' equal shards."""
    return result.tokens == (source.size(0) - 1) * source.size(1) * (distributed.size() if over_ranks else 1)
