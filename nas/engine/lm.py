"""Language-model objective, exact perplexity, and data preparation shared by search and retraining."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from nas import distributed
from nas.data import batchify, bptt_segments, check_min_size, get_batch, load_corpus
from nas.engine.common import absolute_path
from nas.losses import lm_nll


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf."""


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


def token_progress_bar(cfg, source: torch.Tensor, desc: str):
    """A tqdm bar over the training target tokens of the whole run: ``source`` [T, B] is the training split.

    It counts tokens, not steps: an epoch scores every training row once, whatever the sampled lengths.
    """
    columns = source.size(1) * distributed.size()  # under torchrun: the global batch's
    per_epoch = (source.size(0) - 1) * columns
    if cfg.limit_train_batches:
        per_epoch = min(per_epoch, cfg.limit_train_batches * cfg.bptt * columns)
    return tqdm(total=per_epoch * cfg.epochs, desc=desc, unit="tok", unit_scale=True,
                disable=not cfg.progress or not distributed.is_writer(), dynamic_ncols=True)


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
        self.bar.update(tokens)
        self.bar.set_postfix(loss=f"{raw:.3f}", refresh=False)

    @property
    def ppl(self) -> float:
        """Perplexity of the epoch so far (raw NLL, without AR/TAR)."""
        return perplexity(self.nll, max(self.tokens, 1))


class LMLoop:
    """Where a language-model training loop is (shared by search and retraining): the epoch, the segment
    number in it and the next BPTT row, the hidden states carried across segments, and the epoch's partial
    NLL -- what a resume checkpoint needs besides weights and optimizers."""

    def __init__(self):
        self.epoch, self.batch, self.row = 1, 0, 0
        self.hidden = self.hidden_valid = None
        self.partial = (0.0, 0)

    def advance(self, seq_len: int, hidden, hidden_valid, partial: tuple) -> None:
        """A segment of ``seq_len`` rows is done: the hidden states [B, H] after it, the epoch's (NLL, tokens)."""
        self.batch += 1
        self.row += seq_len
        self.hidden, self.hidden_valid, self.partial = hidden, hidden_valid, partial

    def next_epoch(self) -> None:
        """The epoch is done: the next one starts at row 0 with fresh hidden states."""
        self.epoch, self.batch, self.row = self.epoch + 1, 0, 0
        self.hidden = self.hidden_valid = None
        self.partial = (0.0, 0)

    def snapshot(self, np_rng) -> dict:
        """The checkpoint part: position, hidden states, partial NLL, and the data sampler ``np_rng``'s state."""
        # under torchrun the hidden states of the global batch (a collective), so any world size can resume
        return {"position": {"epoch": self.epoch, "batch": self.batch, "row": self.row},
                "hidden": distributed.gather_columns(self.hidden),
                "hidden_valid": distributed.gather_columns(self.hidden_valid), "partial": self.partial,
                "np_rng": np_rng.bit_generator.state}

    def restore(self, ckpt: dict, np_rng) -> None:
        """Back to what :meth:`snapshot` saved (``np_rng`` is set to the saved state in place)."""
        pos = ckpt["position"]
        self.epoch, self.batch, self.row = pos["epoch"], pos["batch"], pos["row"]
        self.hidden, self.hidden_valid = distributed.shard_rows(ckpt["hidden"]), distributed.shard_rows(ckpt["hidden_valid"])
        self.partial = tuple(ckpt["partial"])
        np_rng.bit_generator.state = ckpt["np_rng"]


@dataclass(frozen=True)
class EvalResult:
    """Summed NLL (nats) over ``tokens`` predicted tokens, and the resulting perplexity."""

    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.nll, self.tokens)


@torch.no_grad()
def evaluate(model: nn.Module, source: torch.Tensor, bptt: int, weights: Optional[torch.Tensor] = None,
             max_batches: Optional[int] = None,
             progress: Optional[Callable[[int], None]] = None, over_ranks: bool = False) -> EvalResult:
    """Exact perplexity of ``model`` on a batchified split.

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
        total, count = 0.0, 0
        for n, (i, seq_len) in enumerate(bptt_segments(source, bptt)):
            if max_batches is not None and n >= max_batches:
                break
            data, targets = get_batch(source, i, seq_len)
            out = model(data, hidden, weights)
            total += nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).double(),
                                                 targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
            hidden = out.hidden
            if progress is not None:
                progress(targets.numel())
        if over_ranks:
            total, count = distributed.sum_values([total, count])
            count = int(count)
        return EvalResult(total, count)
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
