"""Mixed operations: architecture logits α -> edge weights -> weighted sum of candidate ops.

DARTS (Liu et al. 2019, eq. 1) relaxes the choice on each edge to ``ō(x) = Σ_o softmax(α)_o · o(x)``.
The weighting is separated from the ops so that strategies can swap it: ``softmax`` (DARTS),
``uniform_path`` (one op per edge sampled uniformly, random search with weight sharing, Li & Talwalkar
2019, sec. 3).  Ops with weight exactly 0 are not evaluated.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from nas.genotype import ZERO_OPS

WEIGHTINGS = ("softmax", "uniform_path")


def edge_weights(alphas: torch.Tensor, mode: str = "softmax", ops: Optional[Sequence[str]] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Turn α [E, K] into edge weights [E, K].

    Args:
        alphas: [E, K] logits, one row per edge.
        mode: ``softmax`` (rows sum to 1, differentiable in α) or ``uniform_path`` (one-hot rows, one
            non-zero op per edge drawn uniformly; needs ``ops``; not differentiable).
        ops: op names of the K columns (``uniform_path`` never samples a zero op).
        generator: torch RNG for ``uniform_path`` (on CPU).

    Raises:
        ValueError: unknown mode, or ``uniform_path`` without ``ops``.
    """
    if mode == "softmax":
        return torch.softmax(alphas, dim=-1)
    if mode == "uniform_path":
        if ops is None:
            raise ValueError("uniform_path weighting needs the op names")
        keep = torch.tensor([j for j, o in enumerate(ops) if o not in ZERO_OPS])
        pick = keep[torch.randint(len(keep), (alphas.size(0),), generator=generator)]
        return nn.functional.one_hot(pick, alphas.size(1)).to(alphas.device, alphas.dtype)
    raise ValueError(f"unknown edge weighting {mode!r}; valid: {', '.join(WEIGHTINGS)}")


class MixedOp(nn.Module):
    """A mixed edge over named candidate ops: ``forward(x, w) = Σ_k w_k · op_k(x)``.

    Args:
        ops: ``{name: module}``; zero ops (``none``/``zero``) may be present and contribute nothing.
    Forward:
        x: any shape the ops accept (e.g. [T, B, D]); w: [K] weights in the order of ``ops``.
        Ops whose weight is exactly 0 are skipped (a sampled path costs one op).
    """

    def __init__(self, ops: "dict[str, nn.Module]"):
        super().__init__()
        self.names = tuple(ops)
        self.ops = nn.ModuleDict({k: v for k, v in ops.items() if k not in ZERO_OPS})

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = None
        for k, name in enumerate(self.names):
            if name in ZERO_OPS:
                continue
            if not w.requires_grad and float(w[k]) == 0.0:
                continue
            y = w[k] * self.ops[name](x)
            out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x)
