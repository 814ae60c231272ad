"""Whole-sequence candidate operations of the hybrid space, by name: recurrent layers, self-attention, convolutions.

Every op maps a sequence ``x`` [T, B, d] to [T, B, d] (time-major, as the rest of the project) and is built by
``SEQUENCE_OPS.get(name)(d, causal=..., heads=..., dropout=...)``; ``zero`` (no edge) has no module and is
handled by name.  ``causal=True`` (language modeling): the output at time t depends on inputs 0..t only
(unidirectional recurrences, masked attention, left-padded convolutions).  ``causal=False`` (classification):
ops look both ways (bidirectional recurrences of d/2 units per direction, unmasked attention, centred
convolutions).  The forward takes the sentence ``lengths`` [B] (classification batches, right-padded) or None;
padded positions are then ignored: attention masks them as keys, bidirectional recurrences run packed, and the
caller keeps padded positions of the inputs at zero, so a convolution sees them as its zero padding.

Sources: recurrent layers (LSTM, Hochreiter & Schmidhuber 1997; GRU, Cho et al. 2014), scaled dot-product
multi-head attention with sinusoidal positions (Vaswani et al. 2017, sec. 3.2 and 3.5), 1-D convolutions; the
search over such a mixed space follows DARTS (Liu et al. 2019) with the op list of a hybrid RNN/attention/conv
space as in Wang et al. 2020 (TextNAS) and So et al. 2019 (Evolved Transformer) -- here searched by gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nas.errors import ConfigError
from nas.genotype import ZERO_OPS
from nas.registry import Registry

SEQUENCE_OPS = Registry("sequence op")

#: the hybrid space's default op list (``zero`` lets α switch an edge off)
HYBRID_OPS = ("lstm", "gru", "rnn_tanh", "self_attention", "conv3", "conv5", "identity", "zero")


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """[T, B] bool, True at the valid positions ``t < lengths[b]`` of a right-padded batch."""
    return torch.arange(T, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


class Recurrent(nn.Module):
    """A whole-sequence recurrent layer (``lstm``, ``gru``, ``rnn_tanh``) from a zero initial state.

    causal: one direction of d units; otherwise bidirectional with d/2 units per direction (outputs
    concatenated to d), run packed by ``lengths`` so the backward direction starts at each sentence's end.
    Raises:
        ConfigError: if a bidirectional layer gets an odd d.
    """

    def __init__(self, kind: str, d: int, causal: bool):
        super().__init__()
        if not causal and d % 2:
            raise ConfigError(f"a bidirectional {kind} needs an even width (d/2 per direction), got d={d}")
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}[kind]
        hidden = d if causal else d // 2
        self.causal = causal
        self.rnn = cls(d, hidden, bidirectional=not causal)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None or self.causal:
            # a causal layer's outputs at valid positions do not depend on the padding after them
            return self.rnn(x)[0]
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        return pad_packed_sequence(self.rnn(packed)[0], total_length=x.size(0))[0]


def sinusoidal_positions(T: int, d: int, device=None, dtype=None) -> torch.Tensor:
    """[T, 1, d] sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5); an odd d drops the last cosine."""
    pos = torch.arange(T, device=device, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float64) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe.to(dtype or torch.get_default_dtype()).unsqueeze(1)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with sinusoidal positions added to its input.

    causal: position t attends to 0..t only.  ``lengths``: padded keys are masked.
    Raises:
        ConfigError: if d is not divisible by ``heads``.
    """

    def __init__(self, d: int, causal: bool, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if heads < 1 or d % heads:
            raise ConfigError(f"self_attention: width d={d} is not divisible by heads={heads}")
        self.causal = causal
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = x.size(0)
        q = x + sinusoidal_positions(T, x.size(-1), x.device, x.dtype)
        attn_mask = None
        if self.causal:
            attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # True: not allowed
        key_padding_mask = None if lengths is None else ~padding_mask(lengths, T).t()  # [B, T], True: pad
        return self.attn(q, q, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False)[0]


class Conv(nn.Module):
    """1-D convolution of width ``k`` over time, d -> d channels, then ReLU.

    causal: left padding k-1 (output t sees t-k+1..t); otherwise (k-1)/2 on each side (k odd).
    """

    def __init__(self, d: int, k: int, causal: bool):
        super().__init__()
        self.k, self.causal = k, causal
        self.conv = nn.Conv1d(d, d, k)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = x.permute(1, 2, 0)  # [B, d, T]
        pad = (self.k - 1, 0) if self.causal else ((self.k - 1) // 2, self.k // 2)
        return torch.relu(self.conv(F.pad(y, pad))).permute(2, 0, 1)


class Identity(nn.Module):
    """The skip connection: ``x`` unchanged."""

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x


for _kind in ("lstm", "gru", "rnn_tanh"):
    SEQUENCE_OPS.register(_kind)(lambda d, causal, heads=4, dropout=0.0, _kind=_kind: Recurrent(_kind, d, causal))
SEQUENCE_OPS.register("self_attention")(
    lambda d, causal, heads=4, dropout=0.0: SelfAttention(d, causal, heads, dropout))
SEQUENCE_OPS.register("conv3")(lambda d, causal, heads=4, dropout=0.0: Conv(d, 3, causal))
SEQUENCE_OPS.register("conv5")(lambda d, causal, heads=4, dropout=0.0: Conv(d, 5, causal))
SEQUENCE_OPS.register("identity")(lambda d, causal, heads=4, dropout=0.0: Identity())


def build_sequence_op(name: str, d: int, causal: bool, heads: int = 4, dropout: float = 0.0) -> Optional[nn.Module]:
    """The module of op ``name`` over width d; None for a zero op.

    Raises:
        ConfigError: unknown name (listing the valid ones), or a width the op cannot take.
    """
    if name in ZERO_OPS:
        return None
    if name not in SEQUENCE_OPS:
        raise ConfigError(f"unknown hybrid op {name!r}; valid ops: "
                          f"{', '.join(SEQUENCE_OPS.names() + sorted(ZERO_OPS))}")
    return SEQUENCE_OPS.get(name)(d, causal, heads=heads, dropout=dropout)


def check_sequence_ops(ops) -> None:
    """Validate a hybrid op list: known names, no duplicates, at least one non-zero op.

    Raises:
        ConfigError: describing the problem.
    """
    ops = list(ops)
    if len(set(ops)) != len(ops):
        raise ConfigError(f"duplicate op names in {ops}")
    unknown = [o for o in ops if o not in SEQUENCE_OPS and o not in ZERO_OPS]
    if unknown:
        raise ConfigError(f"unknown hybrid op(s) {unknown}; valid ops: "
                          f"{', '.join(SEQUENCE_OPS.names() + sorted(ZERO_OPS))}")
    if all(o in ZERO_OPS for o in ops):
        raise ConfigError(f"op list {ops} has no non-zero op")
