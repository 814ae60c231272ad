"""Batching for truncated-BPTT language modelling (AWD-LSTM / DARTS layout).

A 1-D token stream is cut into ``B`` contiguous chunks laid side by side as columns of a
``[T, B]`` tensor (Zaremba et al. 2014; Merity et al. 2018, AWD-LSTM). Training walks down
the rows in segments of ``bptt`` steps, optionally with the variable-length BPTT of
Merity et al. 2018 (AWD-LSTM, sec. 4.1), which DARTS (Liu et al. 2019) also uses.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .corpus import DataError

MIN_SEQ_LEN = 5  # AWD-LSTM: max(5, ...) so a sampled segment is never degenerate
MAX_SEQ_LEN_DELTA = 20  # DARTS rnn/train*.py default --max_seq_len_delta
#: the segment-length samplers: ``awd_lstm`` (AWD-LSTM's, which DARTS's retraining uses) and ``darts_search``
#: (DARTS's search code, rnn/train_search.py, where the normal noise of the AWD-LSTM sampler is commented out)
SEQ_LEN_SAMPLERS = ("awd_lstm", "darts_search")


def batchify(data: torch.Tensor, batch_size: int, device=None) -> torch.Tensor:
    """Lay a token stream out as ``batch_size`` contiguous columns.

    Args:
        data: ``[N]`` long tensor of token ids.
        batch_size: number of columns ``B`` (>= 1).
        device: optional torch device to move the result to.

    Returns:
        ``[T, B]`` long tensor, ``T = N // B``; the trailing ``N % B`` tokens are dropped.
        Column ``b`` holds tokens ``data[b*T : (b+1)*T]`` (AWD-LSTM layout:
        ``data[:T*B].view(B, T).t().contiguous()``), so every column is a contiguous text
        chunk and the hidden state can be carried from one segment to the next.

    Raises:
        DataError: ``batch_size < 1``, ``data`` not 1-D, or ``N < batch_size``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if data.dim() != 1:
        raise DataError(f"batchify expects a 1-D token tensor, got shape {tuple(data.shape)}")
    n = data.size(0)
    if n < batch_size:
        raise DataError(
            f"corpus has {n} tokens, smaller than one batch of {batch_size}; use a smaller batch_size."
        )
    t = n // batch_size
    out = data[: t * batch_size].view(batch_size, t).t().contiguous()
    return out.to(device) if device is not None else out


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input/target pair for the BPTT segment starting at row ``i``.

    Args:
        source: ``[T, B]`` batchified ids (from :func:`batchify`).
        i: start row, ``0 <= i <= T - 2``.
        seq_len: requested segment length in time steps (>= 1).

    Returns:
        ``(data, target)``, both ``[L, B]`` with ``L = min(seq_len, T - 1 - i)``:
        ``data = source[i:i+L]``, ``target = source[i+1:i+1+L]`` (next-token targets; the
        last segment is clipped so the target never runs off the end). Unlike AWD-LSTM the
        target is not flattened; callers reshape it for the loss.

    Raises:
        ValueError: ``seq_len < 1`` or ``i`` outside ``[0, T-2]`` (a caller bug, not a data problem).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = len(source)
    if not 0 <= i <= n - 2:
        raise ValueError(f"start row i={i} outside [0, {n - 2}] for a source of {n} rows")
    length = min(seq_len, n - 1 - i)
    return source[i : i + length], source[i + 1 : i + 1 + length]


def sample_seq_len(bptt: int, rng: np.random.Generator, max_len: int | None = None,
                   sampler: str = "awd_lstm") -> int:
    """Sample a variable BPTT length (Merity et al. 2018, AWD-LSTM, sec. 4.1).

    Both samplers draw ``base = bptt`` with probability 0.95, else ``bptt / 2`` (one ``rng.random()``), then

    * ``awd_lstm`` (AWD-LSTM; DARTS rnn/train.py, the retraining): ``seq_len = max(5, int(rng.normal(base, 5)))``,
      capped at ``max_len``;
    * ``darts_search`` (DARTS rnn/train_search.py, the search): ``seq_len = int(base)``, i.e. ``bptt`` or
      ``int(bptt / 2)``, no noise and no cap (the reference search code comments the normal draw out).

    The cap defaults to ``bptt + 20``: the DARTS RNN code (``--max_seq_len_delta 20``) caps
    the length so that the rare long draw cannot blow up activation memory (AWD-LSTM itself
    leaves the cap commented out). Callers following AWD-LSTM rescale the learning rate by
    ``seq_len / bptt``.

    Args:
        bptt: nominal segment length in time steps (>= 1).
        rng: numpy Generator; the result is reproducible given its seed.
        max_len: ``awd_lstm``'s cap in time steps (>= 1), default ``bptt + 20``.
        sampler: one of :data:`SEQ_LEN_SAMPLERS`.

    Returns:
        int length: ``awd_lstm`` in ``[min(5, max_len), max_len]``; ``darts_search`` ``bptt`` or ``int(bptt / 2)``
        (at least 1).

    Raises:
        ValueError: ``bptt < 1``, ``max_len < 1`` or an unknown sampler.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    if sampler == "darts_search":
        return max(1, int(bptt if rng.random() < 0.95 else bptt / 2.0))
    if sampler != "awd_lstm":
        raise ValueError(f"unknown segment-length sampler {sampler!r}; valid: {', '.join(SEQ_LEN_SAMPLERS)}")
    cap = bptt + MAX_SEQ_LEN_DELTA if max_len is None else int(max_len)
    if cap < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    base = bptt if rng.random() < 0.95 else bptt / 2.0
    seq_len = max(MIN_SEQ_LEN, int(rng.normal(base, 5)))
    return min(seq_len, cap)


def bptt_segments(
    source: torch.Tensor,
    bptt: int,
    variable: bool = False,
    rng: np.random.Generator | None = None,
    max_len: int | None = None,
    start: int = 0,
    sampler: str = "awd_lstm",
) -> Iterator[tuple[int, int]]:
    """Iterate ``(i, seq_len)`` segment starts over the rows of ``source``, in order.

    Lengths come from :func:`sample_seq_len` when ``variable`` (AWD-LSTM sec. 4.1 training
    loop), else are fixed at ``bptt``. Starts cover rows ``0 .. T-2``; the last segment may
    extend past the end, and :func:`get_batch` clips it to ``T - 1 - i``. With
    ``variable=False`` every target row ``1 .. T-1`` is produced exactly once.

    Note: the AWD-LSTM training loop is ``while i < T - 1 - 1``, which skips a final
    one-step segment when a segment ends exactly at row ``T - 2``; we loop while
    ``i < T - 1`` so the last (input, target) pair is never dropped (as in its eval loop).

    Args:
        source: ``[T, B]`` (or ``[T]``) batchified ids.
        bptt: nominal segment length (>= 1).
        variable: sample lengths with :func:`sample_seq_len`.
        rng: numpy Generator, required when ``variable`` (reproducibility: no hidden global RNG).
        max_len: cap for variable ``awd_lstm`` lengths, default ``bptt + 20``.
        sampler: the variable-length sampler (:func:`sample_seq_len`).
        start: first row (a resumed epoch: the row after the last segment done, with ``rng`` in the state it
            had then, continues the same sequence of segments).

    Raises:
        ValueError: ``bptt < 1``, or ``variable`` without ``rng``.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    if variable and rng is None:
        raise ValueError("bptt_segments(variable=True) needs rng=np.random.default_rng(seed)")
    n = len(source)
    i = start
    while i < n - 1:
        seq_len = sample_seq_len(bptt, rng, max_len, sampler) if variable else bptt
        yield i, seq_len
        i += seq_len


def check_min_size(n_tokens: int, batch_size: int, bptt: int, what: str, full: bool = False,
                   key: str = "batch_size") -> None:
    """Fail early, with the sizes that matter, if a split cannot give what a run needs from it.

    Args:
        n_tokens: the split's token count (before batchifying drops the ``n_tokens % batch_size`` tail).
        batch_size: the columns it is laid out in (the value of config key ``key``).
        bptt: the configured BPTT length, reported in the message.
        what: the split's name for the message (e.g. ``'ptb valid'``).
        full: require one whole training segment, ``bptt + 1`` rows per column (a training split); otherwise one
            (input, target) pair, 2 rows (evaluation).
        key: the config key that sets ``batch_size`` for this split (``batch_size``, ``eval_batch_size`` ...).

    Raises:
        DataError: ``n_tokens // batch_size`` rows are fewer than needed.  The message names the split, its tokens,
            the batch size and bptt in force, and the largest batch size that fits (``n_tokens // rows needed``),
            or says that none does and what would (a smaller bptt, or a larger split).
    """
    need = bptt + 1 if full else 2
    rows = n_tokens // batch_size if batch_size >= 1 else 0
    if rows >= need:
        return
    what_for = f"one training segment of bptt + 1 = {need} rows" if full else "one (input, target) pair (2 rows)"
    largest = n_tokens // need
    if largest >= 1:
        fix = f"the largest {key} that fits is {largest}"
    elif full and n_tokens >= 2:
        fix = f"no {key} fits with bptt {bptt}: even {key}=1 gives {n_tokens} rows; use bptt <= {n_tokens - 1} or a larger split"
    else:
        fix = f"no {key} fits: a split needs at least {need} tokens; use a larger split"
    raise DataError(f"{what} split: {n_tokens} tokens in {key}={batch_size} columns (bptt {bptt}) give {rows} row(s) "
                    f"per column, fewer than {what_for}; {fix}")
