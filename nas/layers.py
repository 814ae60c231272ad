"""Regularizing layers of AWD-LSTM (Merity et al. 2018, sec. 4) used by the DARTS language models."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nas.distributed import shard_mask, world


def dropout_mask(like: torch.Tensor, shape, p: float, batch_dim: Optional[int] = None) -> torch.Tensor:
    """A Bernoulli(1-p) mask scaled by 1/(1-p) (inverted dropout), with ``like``'s dtype and device.

    ``batch_dim``: the dimension of ``shape`` that indexes batch rows.  Under torchrun the mask is drawn for the
    global batch and this rank keeps its rows (:func:`nas.distributed.shard_mask`), as one process would draw it.
    """
    if batch_dim is None:
        return _bernoulli(like, shape, p)
    return shard_mask(like, shape, batch_dim, lambda t, full: _bernoulli(t, full, p))


def _bernoulli(like: torch.Tensor, shape, p: float) -> torch.Tensor:
    return like.new_empty(shape).bernoulli_(1.0 - p).div_(1.0 - p)


def dropout(x: torch.Tensor, p: float, batch_dim: int) -> torch.Tensor:
    """``F.dropout(x, p)`` in training; under torchrun with the global batch's mask (see :func:`dropout_mask`)."""
    if world() is None:
        return F.dropout(x, p)
    return x * dropout_mask(x, x.shape, p, batch_dim)


class LockedDropout(nn.Module):
    """Variational ("locked") dropout: one mask per sequence, shared across time steps.

    Gal & Ghahramani 2016; AWD-LSTM sec. 4.2.  Input and output: [T, B, D]; the mask is [1, B, D], so it
    is constant along time and differs across batch rows.  Identity in eval mode or when ``p == 0``.
    """

    def forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        if not self.training or p <= 0:
            return x
        return x * dropout_mask(x, (1, x.size(1), x.size(2)), p, batch_dim=1)


def padded_embedding(ntoken: int, emsize: int) -> nn.Embedding:
    """A sentence classifier's word embedding [ntoken, emsize] whose index 0 is padding: weights ~ U(-0.1, 0.1),
    row 0 zero (``padding_idx``: it gets no gradient)."""
    embed = nn.Embedding(ntoken, emsize, padding_idx=0)
    nn.init.uniform_(embed.weight, -0.1, 0.1)
    with torch.no_grad():
        embed.weight[0].zero_()
    return embed


def mean_over_lengths(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """h [T, B, D], zero at padded positions, and lengths [B] (>= 1) -> [B, D]: the mean over each sentence's valid
    positions."""
    return h.sum(0) / lengths.to(h.device, h.dtype).unsqueeze(1)


def embedded_dropout(embed: nn.Embedding, words: torch.Tensor, p: float) -> torch.Tensor:
    """Embedding lookup with word-level dropout: whole rows of the embedding matrix are dropped.

    AWD-LSTM sec. 4.3 (Gal & Ghahramani 2016): every occurrence of a dropped word type in the batch is
    zeroed, the kept rows scaled by 1/(1-p).  ``words``: [T, B] LongTensor -> [T, B, D].
    Call with ``p = 0`` in eval mode (the caller decides; this function has no mode).
    """
    weight = embed.weight
    if p > 0:
        weight = weight * dropout_mask(weight, (weight.size(0), 1), p)
    return F.embedding(words, weight, embed.padding_idx)
