"""GDAS: Gradient-based search using a Differentiable Architecture Sampler (Dong & Yang, CVPR 2019, sec. 3).

Each forward pass of the supernet runs *one* op per edge, drawn from the categorical distribution softmax(α) with
the Gumbel-max trick; α gets the straight-through gradient of the Gumbel-softmax relaxation at temperature τ
(:func:`nas.mixed.gumbel_hard`; paper eq. 3-5).  What this implementation does, and where it comes from (the
reference code is D-X-Y/AutoDL-Projects: ``exps/algos/GDAS.py`` and ``lib/models/cell_searchs/search_model_gdas.py``,
``search_cells.py``; no GDAS recurrent-cell search code is public):

* **one step** = a weight update on the training batch with a fresh sample (``edge_weights``), then an α update on the
  held-out batch with another fresh sample (``step``): the reference's ``search_func`` updates w first, then α, and its
  model draws a new sample in every forward.  The engine runs the weight step first for this strategy
  (``weights_first``).  α is trained on the held-out split (``alpha_split``, as DARTS), first order (no unrolling:
  the reference's ``arch_loss.backward()`` at the current w).
* **estimator**: the reference's.  The sampled op a of an edge is computed, scaled by its straight-through weight h_a
  (value 1); each unsampled op k adds its weight h_k (value 0) to the edge output without being computed
  (``forward_gdas``).  So ∂L/∂h_a = ⟨∂L/∂y, o_a(x)⟩ and ∂L/∂h_k = Σ ∂L/∂y for k ≠ a, then through the relaxation
  ∂h_k/∂α_j = p_k (δ_kj - p_j) / τ with p the relaxed Gumbel-softmax.  The spaces implement it: ``darts_rnn``
  computes the sampled op of each edge alone (:meth:`nas.spaces.darts_rnn.DartsCell._sampled_nodes`), ``hybrid`` and
  ``stacked_rnn`` skip the ops whose weight is exactly 0 and add the unsampled weights.
* **τ schedule**: linear in the epoch, from ``tau_max`` = 10 at the first epoch to ``tau_min`` = 0.1 at the last (paper
  sec. 4.1; the reference sets τ = τ_max - (τ_max - τ_min) · e / (E - 1) at the start of epoch e = 0..E-1, once per
  epoch, not per step).  Epochs count from 1 here: τ(e) = τ_max - (τ_max - τ_min) · (e - 1) / (E - 1); a one-epoch
  search runs at τ_max.  The engine calls :meth:`start_epoch` before each epoch's steps (after a resume too).
* **α optimizer**: Adam.  The paper's α settings are those of its CNN search (the reference code: lr 3e-4,
  betas (0.5, 0.999), weight decay 1e-3); for the recurrent search it gives none we could verify, so the defaults are
  DARTS's recurrent-search values (lr 3e-3, betas (0.9, 0.999), weight decay 1e-3); ``arch_lr``, ``arch_betas``,
  ``arch_weight_decay`` set the reference's.
* **validation** (``eval_path``): ``sample`` (default) validates the supernet on a fresh sample at the current τ, as the
  reference's per-epoch figures are of sampled architectures (its "evaluate" line is the α step's loss and accuracy,
  every forward drawing a new sample); one sample serves the whole validation pass here.  ``argmax`` validates the
  path of argmax α (the derived ops).
* **derivation**: as DARTS (``space.derive(α)``; the reference's ``genotype()`` is argmax per edge of the same α).
* **resume**: the samples come from torch's generator, which the run's checkpoint holds; the strategy's state is α,
  Adam's state and the τ schedule position (epoch, τ).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from nas import distributed
from nas.errors import ConfigError
from nas.genotype import Genotype
from nas.losses import lm_nll
from nas.mixed import gumbel_hard, with_index
from nas.strategies.base import STRATEGIES
from nas.strategies.darts import ALPHA_SPLITS, alpha_update, init_alphas, load_alpha_state

log = logging.getLogger(__name__)

EVAL_PATHS = ("sample", "argmax")


@dataclass
class GdasConfig:
    """``strategy=gdas``: Gumbel-softmax sampling of one op per edge (Dong & Yang 2019); see the module docstring for
    the source of each default."""

    name: str = "gdas"
    #: τ at the first epoch (paper sec. 4.1: 10)
    tau_max: float = 10.0
    #: τ at the last epoch (paper sec. 4.1: 0.1); linear in between, per epoch
    tau_min: float = 0.1
    #: α's Adam: DARTS's recurrent-search values (the GDAS reference code's CNN search: 3e-4, [0.5, 0.999], 1e-3)
    arch_lr: float = 3e-3
    arch_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    arch_weight_decay: float = 1e-3
    #: what the supernet is validated with after each epoch: ``sample`` (a fresh Gumbel sample, as the reference's
    #: figures) or ``argmax`` (the path of argmax α)
    eval_path: str = "sample"
    #: where α's batches come from: ``valid`` (the held-out split, as DARTS RNN) or ``train_half``
    alpha_split: str = "valid"
    alpha_init_std: float = 1e-3
    #: λ of the differentiable parameter-count penalty: α's loss gains λ x the derived model's expected parameters in
    #: millions under softmax(α) (:class:`nas.mixed.ParamPenalty`; nats per million parameters); 0: none
    param_penalty: float = 0.0


def check_config(cfg: GdasConfig) -> None:
    """Raise ConfigError (one line) for a setting :class:`GdasStrategy` cannot run."""
    if not (0 < cfg.tau_min < math.inf and 0 < cfg.tau_max < math.inf):
        raise ConfigError(f"strategy.tau_max and strategy.tau_min must be finite and > 0, got {cfg.tau_max} and {cfg.tau_min}")
    if cfg.tau_min > cfg.tau_max:
        raise ConfigError(f"strategy.tau_min={cfg.tau_min} is above strategy.tau_max={cfg.tau_max}")
    if cfg.eval_path not in EVAL_PATHS:
        raise ConfigError(f"strategy.eval_path={cfg.eval_path!r}; valid: {', '.join(EVAL_PATHS)}")
    if cfg.alpha_split not in ALPHA_SPLITS:
        raise ConfigError(f"strategy.alpha_split={cfg.alpha_split!r}; valid: {', '.join(ALPHA_SPLITS)}")


def tau_at(epoch: int, epochs: int, tau_max: float, tau_min: float) -> float:
    """τ of ``epoch`` (1..``epochs``): τ_max - (τ_max - τ_min) · (epoch - 1) / (epochs - 1), τ_max for a one-epoch
    search (the GDAS reference's per-epoch linear schedule, ``exps/algos/GDAS.py``).
    Raises ValueError for an epoch outside 1..epochs."""
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch} is outside 1..{epochs}")
    if epochs == 1:
        return float(tau_max)
    return tau_max - (tau_max - tau_min) * (epoch - 1) / (epochs - 1)


@STRATEGIES.register("gdas", config=GdasConfig)
class GdasStrategy:
    """One-shot GDAS over a supernet (same interface as :class:`nas.strategies.darts.DartsStrategy`, plus
    :meth:`start_epoch` and ``weights_first``).

    Args:
        cfg: :class:`GdasConfig`; space: the search space (α's shape, ``derive``); model: the supernet,
        ``model(*batch.inputs(), weights=..., targets=...)`` -> output with ``loss``; train_objective, weight_decay,
        clip, seed: unused (the strategies' interface; the samples come from torch's generator, which the engine seeds).
    Raises:
        ConfigError: τ_max or τ_min <= 0, τ_min > τ_max, an unknown ``eval_path`` or ``alpha_split``.
    """

    kind = "one_shot"
    #: it has architecture parameters α (``alphas`` [E, K]): the collapse diagnostics watch them
    has_alphas = True
    #: the engine makes the weight step before the α step (the reference's order)
    weights_first = True

    def __init__(self, cfg: GdasConfig, space, model: nn.Module, train_objective: Optional[Callable] = None,
                 weight_decay: float = 0.0, clip: Optional[float] = None, seed: int = 0):
        check_config(cfg)
        self.cfg, self.space, self.model = cfg, space, model
        init_alphas(self, cfg, space, model)
        self.epoch = 1
        self.tau = float(cfg.tau_max)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Set τ for ``epoch`` of ``epochs`` (:func:`tau_at`); the engine calls it before the epoch's steps."""
        self.epoch, self.tau = epoch, tau_at(epoch, epochs, self.cfg.tau_max, self.cfg.tau_min)
        log.info("epoch %d: Gumbel-softmax temperature tau = %.4g", epoch, self.tau)

    # -- what the engine uses ------------------------------------------------------------------
    def sample(self) -> torch.Tensor:
        """A fresh hard sample [E, K] at the current τ (one-hot rows, detached, carrying the sampled ops)."""
        return gumbel_hard(self.alphas.detach(), self.tau).hard

    def edge_weights(self) -> torch.Tensor:
        """The weight step's path: a fresh sample (:meth:`sample`); the weight step does not touch α."""
        return self.sample()

    def argmax_path(self) -> torch.Tensor:
        """The one-hot path [E, K] of argmax α per edge (carrying its ops, as a sample does)."""
        index = self.alphas.detach().argmax(dim=-1)
        return with_index(torch.zeros_like(self.alphas.detach()).scatter_(-1, index.unsqueeze(-1), 1.0), index)

    def eval_weights(self) -> torch.Tensor:
        """The validation path: a fresh sample (``eval_path=sample``) or argmax α (``argmax``)."""
        return self.sample() if self.cfg.eval_path == "sample" else self.argmax_path()

    def arch_gradient(self, valid):
        """∇α of the held-out loss through a fresh straight-through sample (see the module docstring), at the current
        weights.  Returns ``(grad [E, K], the output's hidden state detached or None)``; changes neither w nor α."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        weights = gumbel_hard(self.alphas, self.tau).hard
        out = functional_call(self.model, params, valid.inputs(), {"weights": weights, "targets": valid.targets})
        (grad,) = torch.autograd.grad(lm_nll(out, valid.targets), [self.alphas])
        distributed.average_([grad])
        return grad, None if out.hidden is None else out.hidden.detach()

    def step(self, train, valid, eta: float):
        """One α update (Adam) on the held-out batch ``valid``; ``train`` and ``eta`` are unused (first order).
        Returns the held-out hidden state after ``valid`` [B, H], detached (None for a classifier).
        Raises:
            NonFiniteLossError: the α gradient is NaN/inf (α is left unchanged).
        """
        self.optimizer.zero_grad(set_to_none=True)
        grad, hidden = self.arch_gradient(valid)
        alpha_update(self, grad)
        return hidden

    def export(self) -> Genotype:
        """The genotype derived from the current α (as DARTS: ``space.derive``)."""
        return self.space.derive(self.alphas.detach())

    def state_dict(self) -> dict:
        return {"alphas": self.alphas.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Restore α, Adam's state and the τ schedule position. Raises ValueError if α's shape does not match."""
        load_alpha_state(self, state)
        self.epoch, self.tau = int(state["epoch"]), float(state["tau"])
