"""DARTS: bilevel gradient-based search of α (Liu et al. 2019, sec. 2.3, eq. 3-8).

The strategy owns the architecture parameters α [E, K] and their Adam optimizer; the weights w belong
to the engine's optimizer.  ``step`` makes one α update on a held-out batch:

* first order (``unrolled=false``): ∇α L_val(w, α)                                     (eq. 6 with ξ=0)
* second order (``unrolled=true``): ∇α L_val(w', α) - ξ ∇²_{α,w} L_train(w, α) v, v = ∇_{w'} L_val(w', α),
  w' = w - ξ ∇w L_train(w, α) (eq. 6), the Hessian-vector product by central finite differences
  (eq. 7-8) around the *original* w with ε = r / ‖v‖, r = ``fd_epsilon``; ξ is the current weight learning rate.

Two second-order modes (``hypergradient``), differing only where the DARTS reference code (quark0/darts,
rnn/architect.py) departs from eq. 7:

* ``reference`` (default; what produced DARTS's published numbers): the virtual step and the ±ε passes use the
  plain NLL (no AR/TAR); the training gradient of the virtual step is clipped to ``clip`` and the implicit term is
  scaled by ξ·c with c = clip / (‖∇w L_train‖ + 1e-6) *not* capped at 1 (the reference's ``_clip`` returns the raw
  coefficient); v is clipped to norm ``clip`` before the finite difference; and the virtual model keeps the tied
  embedding/decoder matrix at w instead of w' (the reference builds it with ``load_state_dict`` from a state dict
  whose ``decoder.weight`` entry, loaded last, still holds w).
* ``eq7``: eq. 6-8 as written: the training objective (with AR/TAR) in the virtual step and the ±ε passes, v not
  clipped, the virtual step's clip coefficient capped at 1 and the implicit term scaled by the same capped
  coefficient, every weight (the tied matrix too) at w'.

In both modes:
* w is never modified in place (the virtual step and the ±ε points are evaluated functionally with
  ``torch.func.functional_call``), so w is bit-exactly unchanged after a step; the virtual model's pass uses copies
  of the BatchNorm running statistics (the reference's virtual model is a copy), the other passes update them as
  the reference's passes on its model do;
* ``fd_masks=replay`` (default): the two finite-difference passes replay the random state of the training pass, so
  dropout masks are the same in L_train(w), L_train(w+) and L_train(w-); afterwards the generator is put back where
  the virtual model's pass left it, so the weight step draws fresh masks.  The reference code draws new masks in
  the ±ε passes (``fd_masks=fresh``): their difference, divided by 2ε, then swamps the implicit term (measured at
  300 units: 5-17 times its norm; README "Reproducing the papers").

Under torchrun (:mod:`nas.distributed`) every gradient here is averaged over the ranks' shards where one process
would take it on the global batch: ∇α L_val (first order); ∇w L_train before the virtual step, ∇α L_val(w') and
∇w' L_val(w') (so ε and w± are global), and the finite-difference term (second order).  The hypergradient is
then the global batch's, identical on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from nas import distributed
from nas.genotype import Genotype
from nas.losses import lm_nll
from nas.mixed import ParamPenalty, edge_weights
from nas.precision import full_precision
from nas.strategies.base import STRATEGIES
from nas.tasks.base import Batch, SentenceInputs  # noqa: F401  (the batch types step() takes)
from nas.errors import ConfigError

ALPHA_SPLITS = ("valid", "train_half")
HYPERGRADIENTS = ("reference", "eq7")
FD_MASKS = ("replay", "fresh")


@dataclass
class DartsConfig:
    """``strategy=darts``. Defaults: the DARTS recurrent search (Liu et al. 2019, sec. 3.2 and A.1.2)."""

    name: str = "darts"
    unrolled: bool = False
    arch_lr: float = 3e-3
    arch_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    arch_weight_decay: float = 1e-3
    #: r in ε = r / ‖∇w' L_val(w', α)‖ (paper eq. 8 uses 0.01)
    fd_epsilon: float = 0.01
    #: second order: ``reference`` (the DARTS code's hypergradient, rnn/architect.py) or ``eq7`` (the paper's
    #: equations as written); see the module docstring
    hypergradient: str = "reference"
    #: second order: the dropout masks of the two finite-difference passes: ``replay`` the training pass's (the
    #: difference quotient then measures the change of w alone) or ``fresh`` (new draws, as the reference code does)
    fd_masks: str = "replay"
    #: where α's batches come from: ``valid`` (DARTS RNN: PTB's validation split) or ``train_half``
    #: (the training split's second half; w then trains on the first half only)
    alpha_split: str = "valid"
    alpha_init_std: float = 1e-3
    #: λ of the differentiable parameter-count penalty: α's loss gains λ x the derived model's expected parameters in
    #: millions under softmax(α) (:class:`nas.mixed.ParamPenalty`; nats per million parameters); 0: none
    param_penalty: float = 0.0


def _detached(hidden):
    return None if hidden is None else hidden.detach()


def _rng_state(device: torch.device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@STRATEGIES.register("darts", config=DartsConfig)
class DartsStrategy:
    """One-shot DARTS strategy over a supernet.

    Args:
        cfg: :class:`DartsConfig`.
        space: the search space (gives α's shape, op names and ``derive``).
        model: the supernet; ``model(*batch.inputs(), weights=..., targets=...)`` returns an output with the
            mean ``loss`` (an ``LMOutput``, or a ``ClassifierOutput`` of the hybrid space).
        train_objective: ``f(output, targets) -> scalar`` the weights are trained with (the virtual
            step of the second-order update uses the same objective as the real weight step).
        weight_decay: the weight optimizer's L2 coefficient (enters w' = w - ξ(∇L + λw)).
        clip: the weight optimizer's gradient-norm clip (0 or None: no clipping).
        seed: unused (α is initialized from torch's generator, which the engine seeds); the strategies' interface.
    Raises:
        ConfigError: for an unknown ``alpha_split``, ``hypergradient`` or ``fd_masks``, or a non-positive
            ``fd_epsilon``.
    """

    kind = "one_shot"
    #: it has architecture parameters α (``alphas`` [E, K]): the collapse diagnostics watch them
    has_alphas = True

    def __init__(self, cfg: DartsConfig, space, model: nn.Module,
                 train_objective: Callable, weight_decay: float = 0.0, clip: Optional[float] = None, seed: int = 0):
        if cfg.alpha_split not in ALPHA_SPLITS:
            raise ConfigError(f"strategy.alpha_split={cfg.alpha_split!r}; valid: {', '.join(ALPHA_SPLITS)}")
        if cfg.hypergradient not in HYPERGRADIENTS:
            raise ConfigError(f"strategy.hypergradient={cfg.hypergradient!r}; valid: {', '.join(HYPERGRADIENTS)}")
        if cfg.fd_masks not in FD_MASKS:
            raise ConfigError(f"strategy.fd_masks={cfg.fd_masks!r}; valid: {', '.join(FD_MASKS)}")
        if cfg.fd_epsilon <= 0:
            raise ConfigError(f"strategy.fd_epsilon must be > 0, got {cfg.fd_epsilon}")
        self.cfg, self.space, self.model = cfg, space, model
        self.train_objective = train_objective
        self.weight_decay, self.clip = weight_decay, clip
        # parameters registered under several names (the tied embedding/decoder matrix)
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self._tied = {n for n, p in model.named_parameters() if uses[id(p)] > 1}
        init_alphas(self, cfg, space, model)

    # -- what the engine uses ------------------------------------------------------------------
    def edge_weights(self) -> torch.Tensor:
        """softmax(α) [E, K], detached: the weight step must not touch α."""
        return edge_weights(self.alphas.detach())

    def eval_weights(self) -> torch.Tensor:
        """The weights the supernet is validated with: softmax(α), as in training."""
        return self.edge_weights()

    def step(self, train: Batch, valid: Batch, eta: float) -> torch.Tensor:
        """One α update (Adam) from a training and a held-out segment; ``eta`` = ξ, the weight lr.

        ``train`` / ``valid``: :class:`Batch` (language models) or :class:`SentenceInputs` (classifiers).
        Returns the held-out hidden state after ``valid`` [B, H], detached, to carry to the next segment
        (None for a classifier).
        Raises:
            nas.errors.NonFiniteLossError: the hypergradient is NaN/inf (α is left unchanged).
        """
        self.optimizer.zero_grad(set_to_none=True)
        grad, hidden = self.arch_gradient(train, valid, eta)
        alpha_update(self, grad)
        return hidden

    def export(self) -> Genotype:
        """The genotype derived from the current α (DARTS discretization)."""
        return self.space.derive(self.alphas.detach())

    def state_dict(self) -> dict:
        return {"alphas": self.alphas.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore α and Adam's state. Raises ValueError if α's shape does not match the space."""
        load_alpha_state(self, state)

    # -- the hypergradient ---------------------------------------------------------------------
    def arch_gradient(self, train: Batch, valid: Batch, eta: float):
        """∇α of the validation loss, first or second order (see module docstring).

        Returns ``(grad [E, K], hidden_valid [B, H] detached)``; changes neither w nor α.
        """
        if not self.cfg.unrolled:
            # detached weights: the pass builds no weight gradients it would throw away (compiled cell,
            # fused decoder)
            params = {n: p.detach() for n, p in self._params().items()}
            out = self._forward(params, self.alphas, valid)
            (grad,) = torch.autograd.grad(lm_nll(out, valid.targets), [self.alphas])
            distributed.average_([grad])
            return grad, _detached(out.hidden)
        return self._unrolled_gradient(train, valid, eta)

    def _params(self) -> Dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())

    def _forward(self, params, alphas, batch: Batch):
        return functional_call(self.model, params, batch.inputs(),
                               {"weights": edge_weights(alphas), "targets": batch.targets})

    def _unrolled_gradient(self, train: Batch, valid: Batch, eta: float):
        reference = self.cfg.hypergradient == "reference"
        objective = lm_nll if reference else self.train_objective  # reference: model._loss, the plain NLL
        params = self._params()
        names, w = list(params), list(params.values())
        device = w[0].device
        # replayed below so the ±ε passes see the training pass's dropout masks (fd_masks=replay)
        rng = _rng_state(device) if self.cfg.fd_masks == "replay" else None
        alphas = self.alphas.detach()
        loss = objective(self._forward(params, alphas, train), train.targets)
        g = torch.autograd.grad(loss, w)
        distributed.average_(g)
        coef = implicit = 1.0  # the virtual step's clip coefficient; the implicit term's scale beside ξ
        if self.clip:
            raw = self.clip / (_norm(g) + 1e-6)
            coef = min(1.0, raw)
            implicit = raw if reference else coef
        # virtual step w' = w - ξ (c ∇w L_train + λ w); fresh leaves, w itself untouched
        w_prime = [(p - eta * (coef * gi + self.weight_decay * p)).detach().requires_grad_(True)
                   for p, gi in zip(w, g)]
        if reference:  # the reference's virtual model holds the tied matrix at w (see the module docstring)
            w_prime = [p.detach().requires_grad_(True) if n in self._tied else q
                       for n, p, q in zip(names, w, w_prime)]
        alphas_v = self.alphas.detach().requires_grad_(True)
        # the virtual model normalizes with copies of the running statistics: its pass must not update them
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        out = self._forward({**dict(zip(names, w_prime)), **buffers}, alphas_v, valid)
        grads = torch.autograd.grad(lm_nll(out, valid.targets), [alphas_v] + w_prime)
        after_valid = _rng_state(device)
        distributed.average_(grads)
        d_alpha, v = grads[0], list(grads[1:])
        vnorm = _norm(v)
        if reference and self.clip and self.clip / (vnorm + 1e-6) < 1:  # the reference clips v like a gradient
            v = [x * (self.clip / (vnorm + 1e-6)) for x in v]
            vnorm = _norm(v)
        if vnorm == 0.0:  # no dependence of L_val on w: the implicit term vanishes
            return d_alpha, _detached(out.hidden)
        eps = self.cfg.fd_epsilon / vnorm
        with full_precision(self.model):  # w ± εv differ by less than a bf16 unit (config matmul_dtype)
            hvp = self._alpha_grad_at([p + eps * vi for p, vi in zip(w, v)], names, train, rng, objective)
            hvp = hvp - self._alpha_grad_at([p - eps * vi for p, vi in zip(w, v)], names, train, rng, objective)
        if rng is not None:
            _set_rng_state(after_valid, device)  # the weight step draws new masks, not the replayed ones
        distributed.average_([hvp])
        return d_alpha - (eta * implicit) * hvp / (2 * eps), _detached(out.hidden)

    def _alpha_grad_at(self, w_point, names, train: Batch, rng, objective) -> torch.Tensor:
        """∇α objective(w_point, α) on the training batch, with the training pass's random state ``rng`` replayed
        (None: the masks are drawn anew)."""
        if rng is not None:
            _set_rng_state(rng, w_point[0].device)
        alphas = self.alphas.detach().requires_grad_(True)
        params = {n: p.detach() for n, p in zip(names, w_point)}
        loss = objective(self._forward(params, alphas, train), train.targets)
        (grad,) = torch.autograd.grad(loss, [alphas])
        return grad



def init_alphas(strategy, cfg, space, model: nn.Module) -> None:
    """Give a one-shot strategy (darts, gdas) its α [E, K] ~ N(0, ``alpha_init_std``²) from torch's generator, in the
    model's dtype and device, α's Adam (``arch_lr``, ``arch_betas``, ``arch_weight_decay``) and its parameter
    penalty (:func:`param_penalty`; None when ``param_penalty`` is 0).  Raises ConfigError for a bad penalty."""
    p = next(model.parameters())
    strategy.alphas = nn.Parameter(
        torch.randn(*space.alpha_shape, dtype=p.dtype).mul_(cfg.alpha_init_std).to(p.device))
    strategy.optimizer = torch.optim.Adam([strategy.alphas], lr=cfg.arch_lr, betas=tuple(cfg.arch_betas),
                                          weight_decay=cfg.arch_weight_decay)
    strategy.penalty = param_penalty(cfg, space, model)


def alpha_update(strategy, grad: torch.Tensor) -> None:
    """One Adam step of ``strategy.alphas`` with ``grad`` [E, K] plus the parameter penalty's gradient
    (``strategy.penalty``; darts, gdas).  Raises NonFiniteLossError (α unchanged) when the sum is not finite."""
    if strategy.penalty is not None:  # + ∇α of the expected parameter count (strategy.param_penalty)
        grad = grad + strategy.penalty.gradient(strategy.alphas)
    if not bool(torch.isfinite(grad).all()):
        from nas.errors import NonFiniteLossError

        raise NonFiniteLossError("the α gradient became non-finite (α was not updated); lower lr or arch_lr")
    strategy.alphas.grad = grad
    strategy.optimizer.step()


def load_alpha_state(strategy, state: dict) -> None:
    """Restore ``strategy.alphas`` and its Adam state from ``state`` (``alphas``, ``optimizer``).  Raises ValueError
    if α's shape does not match the space."""
    alphas = state["alphas"]
    if tuple(alphas.shape) != tuple(strategy.alphas.shape):
        raise ValueError(f"checkpoint α has shape {tuple(alphas.shape)}, this space needs {tuple(strategy.alphas.shape)}")
    with torch.no_grad():
        strategy.alphas.copy_(alphas)
    strategy.optimizer.load_state_dict(state["optimizer"])


def param_penalty(cfg, space, model) -> Optional[ParamPenalty]:
    """The :class:`nas.mixed.ParamPenalty` of ``cfg.param_penalty`` over ``space.op_params(model)``; None when it is 0.
    Raises ConfigError for a negative weight or a space without ``op_params``."""
    weight = getattr(cfg, "param_penalty", 0.0) or 0.0
    if not weight >= 0 or math.isinf(weight):
        raise ConfigError(f"strategy.param_penalty must be finite and >= 0, got {weight}")
    if weight == 0:
        return None
    if not hasattr(space, "op_params"):
        raise ConfigError(f"strategy.param_penalty: space {type(space).__name__} does not count its ops' parameters")
    return ParamPenalty(weight, space.op_params(model).to(next(model.parameters()).device))


def _norm(tensors) -> float:
    """The 2-norm of a list of tensors taken as one vector (a Python float; ``torch.nn.utils.get_total_norm``)."""
    return torch.nn.utils.get_total_norm(list(tensors)).item()
