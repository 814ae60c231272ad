"""Edge weights of mixed operations: architecture logits α -> per-edge op weights.

DARTS (Liu et al. 2019, eq. 1) relaxes the choice on each edge to ``ō(x) = Σ_o softmax(α)_o · o(x)``.
GDAS (Dong & Yang 2019, sec. 3.2, eq. 3-5) instead samples one op per edge with the Gumbel-max trick and
back-propagates through the Gumbel-softmax relaxation (:func:`gumbel_hard`).
The weighting is kept apart from the ops so that a strategy can swap it (e.g. a sampled single path for
random search with weight sharing) without touching a space; the spaces apply the weights.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

WEIGHTINGS = ("softmax",)

#: the attribute of a weights tensor that names the op sampled on each edge (see :func:`sampled_index`)
_INDEX = "sampled_index"


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


class GumbelSample(NamedTuple):
    """One draw of :func:`gumbel_hard`: ``hard`` [E, K] (exactly one-hot values; straight-through gradient to α),
    ``index`` [E] (the sampled op of each edge, int64), ``probs`` [E, K] (the relaxed Gumbel-softmax ~h)."""

    hard: torch.Tensor
    index: torch.Tensor
    probs: torch.Tensor


def gumbel_hard(alphas: torch.Tensor, tau: float) -> GumbelSample:
    """Sample one op per edge, GDAS style (Dong & Yang 2019, sec. 3.2, eq. 3-5).

    With g_k = -log(u_k), u_k ~ Exp(1) (the Gumbel(0, 1) draw of the reference code, ``-exponential_().log()``,
    from torch's generator), ``probs = softmax((log_softmax(α) + g) / τ)`` per row, ``index = argmax probs`` and the
    edge weights ``hard = one_hot(index) + (probs - probs.detach())``: exactly one-hot in the forward pass, the
    gradient of ``probs`` in the backward pass (straight-through Gumbel-softmax).  The reference code writes
    ``one_hot - probs.detach() + probs``: the same values ((1 - p) + p rounds to exactly 1 for p in [0, 1], checked on
    10^6 draws) and the same gradient.  As the reference (AutoDL-Projects ``search_model_gdas.py``, ``forward``), a
    draw with an infinite Gumbel value or a non-finite probability is redrawn.

    Args:
        alphas: [E, K] architecture logits (a leaf with ``requires_grad`` for the α step, or detached).
        tau: the temperature τ > 0.
    Returns:
        :class:`GumbelSample`; ``hard`` carries ``index`` as its ``sampled_index`` (:func:`sampled_index`), so a
        supernet can compute the sampled op of each edge alone.
    Raises:
        ValueError: for τ <= 0 or α that is not 2-D or not finite.
    """
    if not tau > 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {tau}")
    if alphas.dim() != 2:
        raise ValueError(f"alphas must be [E, K], got shape {tuple(alphas.shape)}")
    if not bool(torch.isfinite(alphas.detach()).all()):
        raise ValueError("alphas are not finite: cannot sample an architecture")
    while True:
        gumbels = -torch.empty_like(alphas).exponential_().log()
        probs = torch.softmax((torch.log_softmax(alphas, dim=-1) + gumbels) / tau, dim=-1)
        if bool(torch.isfinite(gumbels).all()) and bool(torch.isfinite(probs).all()):
            break
    index = probs.detach().argmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, index.unsqueeze(-1), 1.0)
    hard = one_hot + (probs - probs.detach())
    setattr(hard, _INDEX, index)
    return GumbelSample(hard, index, probs)


def with_index(weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mark ``weights`` [E, K] (one-hot at ``index`` [E]) as a sampled path: returns ``weights`` with
    ``sampled_index`` set (e.g. after ``detach()``, which drops it)."""
    setattr(weights, _INDEX, index)
    return weights


def sampled_index(weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The sampled op [E] of each edge when ``weights`` come from :func:`gumbel_hard` (or :func:`with_index`), else
    None.  A supernet that can compute one op per edge (``space=darts_rnn``) reads it to skip the others."""
    return getattr(weights, _INDEX, None)


class ParamPenalty:
    """The differentiable parameter-count penalty of a one-shot search (``strategy.param_penalty``): λ times the
    expected parameter count of the derived model, in millions, under the edge weights softmax(α),

        R(α) = λ / 1e6 · Σ_e Σ_k softmax(α_e)_k · P[e, k]

    with P[e, k] the parameters op k adds on edge e (``space.op_params(model)``), added to α's loss; its gradient
    ∂R/∂α_ek = λ / 1e6 · p_ek (P[e, k] - Σ_j p_ej P[e, j]) is added to the hypergradient.  A relaxation of the count
    as in the resource-constrained one-shot searches (e.g. FBNet, Wu et al. 2019, eq. 3; ProxylessNAS, Cai et al.
    2019, eq. 5: expected latency under the architecture distribution).  λ in nats per million expected parameters.

    Args:
        weight: λ (> 0).  counts: P [E, K].
    """

    def __init__(self, weight: float, counts: torch.Tensor):
        self.weight, self.counts = float(weight), counts

    def expected(self, alphas: torch.Tensor) -> torch.Tensor:
        """Σ softmax(α) · P: the expected parameter count (a scalar tensor, differentiable in α)."""
        return (torch.softmax(alphas, dim=-1) * self.counts.to(alphas)).sum()

    def gradient(self, alphas: torch.Tensor) -> torch.Tensor:
        """∂R/∂α [E, K] at ``alphas`` (autograd through :meth:`expected`)."""
        a = alphas.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.expected(a) * (self.weight / 1e6), [a])
        return grad
