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


def check_min_size(source: torch.Tensor, bptt: int, what: str, full: bool = False) -> None:
    """Fail early if a batchified split cannot yield a single (input, target) pair.

    Args:
        source: ``[T, B]`` (or ``[T]``) batchified ids.
        bptt: configured BPTT length, reported in the message.
        what: split name for the message (e.g. ``'valid'``).
        full: require one whole segment, ``T >= bptt + 1`` rows (a training split smaller than one
            batch x bptt is a configuration mistake); otherwise ``T >= 2`` (evaluation).

    Raises:
        DataError: ``T < 2``; the message gives the split, its size in tokens, the batch
            size, bptt, and suggests a smaller batch_size.
    """
    rows = source.size(0) if source.dim() > 0 else 0
    cols = source.size(1) if source.dim() == 2 else 1
    if full and rows < bptt + 1:
        raise DataError(
            f"{what} split is smaller than one batch x bptt: {rows * cols} tokens in batches of "
            f"{cols} give {rows} rows, fewer than bptt + 1 = {bptt + 1}. Use a smaller batch_size "
            f"(at most {max(1, (rows * cols) // (bptt + 1))}) or bptt, or a larger corpus."
        )
    if rows < 2:
        raise DataError(
            f"{what} split is too small: {rows * cols} tokens batchified into {rows} row(s) x "
            f"batch_size {cols} (bptt {bptt}) gives no (input, target) pair; at least 2 rows, i.e. "
            f"{2 * cols} tokens, are needed. Use a smaller batch_size (at most "
            f"{max(1, (rows * cols) // 2)} for this split) or a larger split."
        )
