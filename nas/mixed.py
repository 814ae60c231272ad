"""Edge weights of mixed operations: architecture logits α -> per-edge op weights.

DARTS (Liu et al. 2019, eq. 1) relaxes the choice on each edge to ``ō(x) = Σ_o softmax(α)_o · o(x)``.
The weighting is kept apart from the ops so that a strategy can swap it (e.g. a sampled single path for
random search with weight sharing) without touching a space; the spaces apply the weights.
"""
from __future__ import annotations

import torch

WEIGHTINGS = ("softmax",)


def edge_weights(alphas: torch.Tensor, mode: str = "softmax") -> torch.Tensor:
    """Turn α [E, K] into edge weights [E, K].

    Args:
        alphas: [E, K] logits, one row per edge.
        mode: ``softmax`` (rows sum to 1, differentiable in α; DARTS eq. 1).
    Raises:
        ValueError: for an unknown mode.
    """
    if mode == "softmax":
        return torch.softmax(alphas, dim=-1)
    raise ValueError(f"unknown edge weighting {mode!r}; valid: {', '.join(WEIGHTINGS)}")
