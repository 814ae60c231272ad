"""Collapse diagnostics of a one-shot search (DARTS, GDAS): what α is doing, and early stopping (DARTS-ES).

DARTS's best-known failure is collapse: run on, α drifts towards parameter-free ops (``identity``) and the derived
cell gets worse while the supernet's validation loss still falls.  Zela et al. (ICLR 2020, "Understanding and
Robustifying Differentiable Architecture Search", sec. 4) tie it to the dominant eigenvalue of the Hessian of the
validation loss with respect to α, ∇²_α L_val, and stop the search early when it grows (DARTS-ES, sec. 4.3).

Per epoch (every ``diagnostics.every`` epochs for the eigenvalue), :class:`CollapseMonitor` records, in
TensorBoard (``diagnostics/*``) and in ``metrics.json``'s history:

* the derived genotype's op histogram, and each op's share of softmax(α) summed over the α rows (edges);
* each edge's softmax entropy (nats; mean and min over edges; ln K is undecided, 0 is one-hot);
* the largest eigenvalue of ∇²_α L_val (:func:`hessian_eigenvalue`: Lanczos with exact Hessian-vector products by
  double backward) on the first ``diagnostics.hessian_batches`` batches of the α split, the supernet in eval mode;
* the parameter-free share of the genotype's ops and of the softmax mass, with a warning past
  ``diagnostics.parameter_free_share``.

At the end of the search, :func:`decidedness` reports per edge the top softmax weight and its lead over the second,
per node (or layer) the lead of the derived choice over its best alternative, and warns when the genotype is not
decided (the rule: every choice leads by at least ``diagnostics.decided_margin``).

None of it changes the search: the passes run on detached weights in eval mode (no dropout, BatchNorm on its
running statistics) inside ``torch.random.fork_rng``, so a search gives the same α and weights with the
diagnostics on or off, and a resumed search stays bit-exact.
"""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nas import distributed
from nas.genotype import PARAMETER_FREE_OPS, ZERO_OPS
from nas.losses import lm_nll
from nas.mixed import edge_weights

log = logging.getLogger(__name__)


@dataclass
class EarlyStopConfig:
    """``diagnostics.early_stop``: DARTS-ES (Zela et al. 2020, sec. 4.3), with the defaults of its reference code
    (automl/RobustDARTS, src/utils.py ``EVLocalAvg.early_stop`` and src/search/args.py).

    The eigenvalues, computed every ``diagnostics.every`` epochs, are smoothed by a centred mean over ``window`` of
    them (truncated at the start).  After each eigenvalue (not the last epoch's), with c the newest centred mean and
    p the one ``delta`` eigenvalues before it: the search stops when c / p > ``factor`` and p's epoch is at least
    ``start_epoch``, and returns the genotype derived at p's epoch.  The reference's ``es_start_epoch=10`` counts
    epochs from 0; here epochs count from 1, so the same rule is ``start_epoch=11``.  The paper states the
    threshold as λ(i-k) / λ(i) < 0.75; its code compares the inverse ratio with 1.3 (1 / 0.75 = 1.33).
    """

    enabled: bool = False
    window: int = 5
    delta: int = 4
    factor: float = 1.3
    start_epoch: int = 11


@dataclass
class DiagnosticsConfig:
    """``diagnostics``: collapse diagnostics of a one-shot search (module docstring; issue 20)."""

    #: per-epoch op histogram and shares, edge entropies, parameter-free share, decidedness at the end
    enabled: bool = True
    #: compute the Hessian's largest eigenvalue at epochs 1, 1 + every, 1 + 2·every, ... and at the last epoch
    #: (the reference code's ``report_freq_hessian``, which counts from epoch 0)
    every: int = 1
    #: compute it at all (false: no eigenvalue, and no early stopping)
    hessian: bool = True
    #: α-split batches the Hessian is taken on: the split's first ones, the same every epoch
    hessian_batches: int = 1
    #: Lanczos stops when the top Ritz value's residual bound is below this share of the value
    hessian_tol: float = 1e-3
    #: and after at most this many Hessian-vector products (each about one training step's cost)
    hessian_max_matvecs: int = 20
    #: the genotype is decided when each of its choices leads its best alternative by this much softmax weight
    decided_margin: float = 0.05
    #: warn when parameter-free ops hold more than this share of the genotype's ops or of the softmax mass
    parameter_free_share: float = 0.5
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


# -- what α says -----------------------------------------------------------------------------------------------
def op_histogram(genotype, ops: Sequence[str]) -> dict:
    """The number of kept edges per op of ``ops`` in ``genotype`` (0 for an op it does not use)."""
    counts = {op: 0 for op in ops}
    for node in genotype.nodes:
        for edge in node:
            counts[edge.op] = counts.get(edge.op, 0) + 1
    return counts


def op_shares(alphas: torch.Tensor, ops: Sequence[str]) -> dict:
    """Each op's share of softmax(α) summed over the α rows, divided by the number of rows: ``{op: share}``, the
    shares sum to 1.  ``alphas`` [E, K] logits."""
    probs = torch.softmax(alphas.detach().double().cpu(), dim=-1)
    return {op: float(v) for op, v in zip(ops, probs.mean(dim=0))}


def edge_entropy(alphas: torch.Tensor) -> torch.Tensor:
    """Each α row's softmax entropy in nats, [E] float64: ln K for a uniform row, 0 for a one-hot one."""
    logp = torch.log_softmax(alphas.detach().double().cpu(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def parameter_free_shares(counts: dict, shares: dict) -> tuple:
    """``(share of the genotype's ops, share of the softmax mass)`` held by :data:`nas.genotype.PARAMETER_FREE_OPS`,
    from :func:`op_histogram`'s counts and :func:`op_shares`'s shares (the mass of every α row over every op; zero
    ops count in the denominator, as the mass is theirs too)."""
    share_genotype = sum(n for op, n in counts.items() if op in PARAMETER_FREE_OPS) / max(1, sum(counts.values()))
    return share_genotype, sum(v for op, v in shares.items() if op in PARAMETER_FREE_OPS)


def decidedness(alphas: torch.Tensor, ops: Sequence[str], space, margin: float) -> dict:
    """How decided α is (issue 20; u01 item 10).

    Per α row (edge): its top op, the top softmax weight and its lead over the row's second.  Per decision of the
    genotype (``space.decision_margins``: a DAG node's kept edges and ops, a stack's layer): the lead of the derived
    choice over its best alternative.  The rule: the genotype is *decided* when every decision leads by at least
    ``margin`` softmax weight -- below that, the noise of one more epoch (or of a rerun: float rounding differs
    with threads and compilation) can flip a choice.

    Returns ``{"decided": bool, "margin": margin, "min_lead": float, "decisions": [{"name", "lead"}],
    "edges": [{"row", "op", "top", "lead"}]}``.
    """
    probs = torch.softmax(alphas.detach().double().cpu(), dim=-1)
    top2 = probs.topk(min(2, probs.size(1)), dim=1)
    edges = []
    for r in range(probs.size(0)):
        second = top2.values[r, 1].item() if top2.values.size(1) > 1 else 0.0
        edges.append({"row": r, "op": ops[top2.indices[r, 0].item()], "top": top2.values[r, 0].item(),
                      "lead": top2.values[r, 0].item() - second})
    decisions = [{"name": name, "lead": lead} for name, lead in space.decision_margins(alphas)]
    min_lead = min(d["lead"] for d in decisions) if decisions else 0.0
    return {"decided": min_lead >= margin, "margin": margin, "min_lead": min_lead, "decisions": decisions,
            "edges": edges}


# -- the Hessian's largest eigenvalue ----------------------------------------------------------------------------
def lanczos_top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], dim: int, tol: float = 1e-3,
                           max_matvecs: int = 20, dtype=torch.float64, device=None) -> dict:
    """The largest (algebraic) eigenvalue of a symmetric operator by Lanczos with full reorthogonalization.

    Lanczos rather than power iteration: power iteration finds the eigenvalue of largest *magnitude* (a Hessian
    can have a larger negative one) and converges with the ratio of the top two; Lanczos's top Ritz value converges
    to the largest eigenvalue in far fewer products (Golub & Van Loan, Matrix Computations, sec. 10.1).  SciPy's
    ``eigsh`` (ARPACK) was not used because it cannot cap the number of products, which is the cost.

    Args:
        matvec: v [dim] -> A v [dim] (float64 tensors).
        dim: the operator's size.
        tol: stop when the top Ritz pair's residual ‖A y - θ y‖ = β_m |s_m| is at most ``tol`` · |θ|.
        max_matvecs: and after this many products at most.
    Returns:
        ``{"value": θ, "matvecs": m, "residual": β_m |s_m| (absolute), "converged": whether the residual reached
        tol · |θ| (or the Krylov space was exhausted) within the products}``; the start vector is a fixed draw (seed
        0 of a private generator), so the result is deterministic and the global random state untouched.
    Raises:
        ValueError: ``dim`` < 1 or ``max_matvecs`` < 1.
    """
    if dim < 1 or max_matvecs < 1:
        raise ValueError(f"lanczos: dim={dim} and max_matvecs={max_matvecs} must be >= 1")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(dim, generator=g, dtype=dtype).to(device)
    q = q / q.norm()
    basis, diag, off = [q], [], []
    value, residual = math.nan, math.inf
    for m in range(1, min(max_matvecs, dim) + 1):
        w = matvec(basis[-1])
        a = torch.dot(basis[-1], w)
        diag.append(a.item())
        Q = torch.stack(basis, dim=1)  # [dim, m]
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough": Parlett)
            w = w - Q @ (Q.t() @ w)
        beta = w.norm().item()
        T = torch.diag(torch.tensor(diag, dtype=torch.float64))
        if off:
            T += torch.diag(torch.tensor(off, dtype=torch.float64), 1) + torch.diag(torch.tensor(off,
                                                                                              dtype=torch.float64), -1)
        theta, S = torch.linalg.eigh(T)
        value, residual = theta[-1].item(), beta * abs(S[-1, -1].item())
        if residual <= tol * max(abs(value), 1e-30) or beta <= 1e-12 * max(abs(value), 1e-30):
            return {"value": value, "matvecs": m, "residual": residual, "converged": True}
        off.append(beta)
        basis.append(w / beta)
    return {"value": value, "matvecs": len(diag), "residual": residual, "converged": False}


@contextmanager
def analysis_mode(model: torch.nn.Module):
    """Eval mode (no dropout, BatchNorm on its running statistics), the eager time step (a compiled one has no
    double backward), no cuDNN RNN and attention by PyTorch's math kernel (the fused kernels' backward cannot be
    differentiated), the global random state kept."""
    was_training = model.training
    cells = [m for m in model.modules() if getattr(m, "_compiled_step", None) is not None]
    saved = [m._compiled_step for m in cells]
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        model.eval()
        for m in cells:
            m._compiled_step = None
        try:
            yield
        finally:
            for m, s in zip(cells, saved):
                m._compiled_step = s
            model.train(was_training)


def alpha_loss(model: torch.nn.Module, batches: Sequence) -> Callable[[torch.Tensor], torch.Tensor]:
    """``L_val(α)``: the mean over ``batches`` of the supernet's cross-entropy (nats) with edge weights softmax(α),
    the weights detached; a function twice differentiable in α (the logits path, not the fused decoder loss).
    ``batches``: :class:`nas.tasks.base.Batch` or ``SentenceInputs`` (anything with ``inputs()`` and ``targets``)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(alphas: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for b in batches:
            out = functional_call(model, {**params, **buffers}, b.inputs(), {"weights": edge_weights(alphas)})
            total = total + lm_nll(out, b.targets)  # no targets passed: the logits path
        return total / len(batches)

    return loss


def hessian_eigenvalue(model: torch.nn.Module, alphas: torch.Tensor, batches: Sequence, tol: float = 1e-3,
                       max_matvecs: int = 20) -> dict:
    """The largest eigenvalue of ∇²_α L_val (Zela et al. 2020, sec. 4.1: its dominant eigenvalue), L_val the mean
    cross-entropy of :func:`alpha_loss` on ``batches``, at the current weights, in eval mode.

    Hessian-vector products are exact (double backward through the first-order gradient's graph, which is built once
    and reused; under torchrun averaged over the ranks' shards, so every rank gets the global batch's eigenvalue and
    DARTS-ES decides alike on all of them); the eigenvalue comes from :func:`lanczos_top_eigenvalue`.  The reference code takes the full
    Hessian on one random α batch with the model in training mode; the fixed batches and eval mode here make the
    figure deterministic (the same at a resume, and comparable from epoch to epoch).

    Args: ``alphas`` [E, K] logits (not modified).  Returns: :func:`lanczos_top_eigenvalue`'s dict.
    """
    with analysis_mode(model):
        a = alphas.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(alpha_loss(model, batches)(a), a, create_graph=True)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            (hv,) = torch.autograd.grad(grad, a, v.to(a.dtype).view_as(a), retain_graph=True)
            distributed.average_([hv])  # under torchrun: the global batch's product, the same on every rank
            return hv.detach().reshape(-1).double()

        return lanczos_top_eigenvalue(matvec, a.numel(), tol, max_matvecs, device=a.device)


# -- early stopping ------------------------------------------------------------------------------------------------
def early_stop_decision(eigenvalues: Sequence[tuple], cfg: EarlyStopConfig) -> Optional[dict]:
    """DARTS-ES's rule (:class:`EarlyStopConfig`) after the newest eigenvalue.

    Args:
        eigenvalues: ``[(epoch, value)]`` in epoch order, one per epoch the eigenvalue was computed at.
    Returns:
        None (go on), or ``{"genotype_epoch": p's epoch, "ratio": c / p, "current": c, "previous": p}``.
    """
    half = cfg.window // 2
    values = [v for _, v in eigenvalues]

    def local_average(i):
        return sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])

    c = len(values) - 1 - half
    p = c - cfg.delta
    if p < 0 or eigenvalues[p][0] < cfg.start_epoch:
        return None
    current, previous = local_average(c), local_average(p)
    if previous <= 0:  # a ratio of a non-positive curvature says nothing about growth
        return None
    ratio = current / previous
    if ratio > cfg.factor:
        return {"genotype_epoch": eigenvalues[p][0], "ratio": ratio, "current": current, "previous": previous}
    return None


def hessian_epochs(every: int, epochs: int) -> List[int]:
    """The epochs (1-based) the eigenvalue is computed at: 1, 1 + every, ... and the last."""
    return sorted(set(range(1, epochs + 1, every)) | {epochs})


def earliest_stop_epoch(every: int, epochs: int, cfg: EarlyStopConfig) -> Optional[int]:
    """The first epoch after which DARTS-ES's rule can stop a search of ``epochs`` epochs (None: it never can):
    the eigenvalue ``delta + window // 2`` places after the first one computed at or after ``start_epoch``, if that
    is before the last epoch."""
    checked = hessian_epochs(every, epochs)[:-1]  # never after the last epoch
    first = next((n for n, e in enumerate(checked) if e >= cfg.start_epoch), None)
    if first is None or first + cfg.delta + cfg.window // 2 >= len(checked):
        return None
    return checked[first + cfg.delta + cfg.window // 2]


def check_diagnostics(cfg) -> None:
    """Refuse, before a search writes anything, diagnostics settings that cannot work together.

    Raises:
        ConfigError: ``diagnostics.early_stop.enabled`` without the eigenvalue it stops on (``diagnostics.enabled``
        and ``diagnostics.hessian``), or with a strategy that has no α (black-box strategies, random_ws).
    """
    from nas.errors import ConfigError
    from nas.strategies import STRATEGIES

    d = cfg.diagnostics
    if not d.early_stop.enabled:
        return
    if not (d.enabled and d.hessian):
        raise ConfigError("diagnostics.early_stop.enabled=true needs diagnostics.enabled=true and "
                          "diagnostics.hessian=true (it stops on the Hessian's eigenvalue)")
    if not getattr(STRATEGIES.get(cfg.strategy.name), "has_alphas", False):
        with_alphas = sorted(n for n in STRATEGIES.names() if getattr(STRATEGIES.get(n), "has_alphas", False))
        raise ConfigError(f"diagnostics.early_stop.enabled=true: strategy={cfg.strategy.name} has no α to watch "
                          f"(DARTS-ES stops one-shot searches of {', '.join(with_alphas)})")


# -- the engine's side -----------------------------------------------------------------------------------------------
class CollapseMonitor:
    """Per-epoch diagnostics and DARTS-ES for the one-shot search loop (:func:`nas.engine.search.search`).

    Args:
        cfg: the search config (``cfg.diagnostics``: :class:`DiagnosticsConfig`).
        space, model, strategy, task, data: the search's.  ``strategy.alphas`` [E, K] is read, never written.
        writer: the run's TensorBoard writer.
    """

    def __init__(self, cfg, space, model, strategy, task, data, writer):
        self.cfg, self.dcfg = cfg, cfg.diagnostics
        self.space, self.model, self.strategy, self.writer = space, model, strategy, writer
        self.ops = list(space.ops)
        self.active = bool(self.dcfg.enabled) and hasattr(strategy, "alphas")
        self._batches = None
        self._task, self._data = task, data
        es = self.dcfg.early_stop
        if self.active and es.enabled and earliest_stop_epoch(self.dcfg.every, cfg.epochs, es) is None:
            log.warning("diagnostics.early_stop can never stop this search: with epochs=%d, diagnostics.every=%d, "
                        "window=%d, delta=%d and start_epoch=%d its first check would come at or after the last "
                        "epoch (README: Collapse diagnostics)", cfg.epochs, self.dcfg.every, es.window, es.delta,
                        es.start_epoch)

    def _hessian_batches(self):
        if self._batches is None:
            self._batches = self._task.alpha_batches(self.cfg, self._data, self.model, self.dcfg.hessian_batches)
            if not self._batches:
                log.info("diagnostics: task %s gives no α batches; no Hessian eigenvalue", self._task.name)
        return self._batches

    def epoch(self, epoch: int, genotype, step: int, clock: Callable[[], float]) -> Optional[dict]:
        """The diagnostics after ``epoch`` (its derived ``genotype``), written to TensorBoard at ``step``;
        returns them for the epoch's history record (None when off).  ``clock`` times the eigenvalue (seconds)."""
        if not self.active:
            return None
        alphas = self.strategy.alphas.detach()
        hist, shares = op_histogram(genotype, self.ops), op_shares(alphas, self.ops)
        ent = edge_entropy(alphas)
        free_genotype, free_mass = parameter_free_shares(hist, shares)
        out = {"op_counts": hist, "op_shares": shares, "edge_entropy_mean": ent.mean().item(),
               "edge_entropy_min": ent.min().item(), "parameter_free_genotype": free_genotype,
               "parameter_free_mass": free_mass,
               # the weakest choice's lead (the decidedness rule, :func:`decidedness`), epoch by epoch
               "min_lead": min((lead for _, lead in self.space.decision_margins(alphas)), default=0.0)}
        if self.dcfg.hessian and epoch in hessian_epochs(self.dcfg.every, self.cfg.epochs):
            batches = self._hessian_batches()
            if batches:
                start = clock()
                eig = hessian_eigenvalue(self.model, alphas, batches, self.dcfg.hessian_tol,
                                         self.dcfg.hessian_max_matvecs)
                out.update({"hessian_eigenvalue": eig["value"], "hessian_matvecs": eig["matvecs"],
                            "hessian_residual": eig["residual"], "hessian_converged": eig["converged"],
                            "hessian_seconds": clock() - start})
                if not eig["converged"]:
                    log.warning("epoch %d: the Hessian's eigenvalue %.4g did not converge in %d products (residual "
                                "%.2g, %.2g of the value; diagnostics.hessian_tol=%g): raise "
                                "diagnostics.hessian_max_matvecs for a closer figure", epoch, eig["value"],
                                eig["matvecs"], eig["residual"], eig["residual"] / max(abs(eig["value"]), 1e-30),
                                self.dcfg.hessian_tol)
        w = self.writer
        for op in self.ops:
            w.add_scalar(f"diagnostics/op_share/{op}", shares[op], step)
            if op not in ZERO_OPS:
                w.add_scalar(f"diagnostics/op_count/{op}", hist[op], step)
        for key in ("edge_entropy_mean", "edge_entropy_min", "parameter_free_genotype", "parameter_free_mass",
                    "min_lead", "hessian_eigenvalue", "hessian_seconds"):
            if key in out:
                w.add_scalar(f"diagnostics/{key}", out[key], step)
        limit = self.dcfg.parameter_free_share
        if free_genotype > limit or free_mass > limit:
            log.warning("epoch %d: parameter-free ops (%s) hold %.0f%% of the genotype's ops and %.0f%% of the softmax "
                        "mass (diagnostics.parameter_free_share=%g): the search may be collapsing (Zela et al. 2020); "
                        "see experiment=darts_ptb_es and space.max_parameter_free", epoch,
                        "/".join(sorted(o for o in self.ops if o in PARAMETER_FREE_OPS)), 100 * free_genotype,
                        100 * free_mass, limit)
        return out

    def log_history(self, history: list, epoch: int) -> None:
        """The op shares over the epochs so far as a stacked-area image (``diagnostics/op_shares``, at ``epoch``)."""
        if not self.active:
            return
        from nas.engine.tb import op_share_figure

        self.writer.add_figure("diagnostics/op_shares", op_share_figure(history, self.ops), epoch)

    def early_stop(self, history: list, epoch: int) -> Optional[dict]:
        """DARTS-ES after ``epoch`` (never after the last): None, or the decision with ``stopped_after_epoch``."""
        es = self.dcfg.early_stop
        if not (self.active and es.enabled) or epoch >= self.cfg.epochs:
            return None
        evs = [(h["epoch"], h["diagnostics"]["hessian_eigenvalue"]) for h in history
               if h.get("diagnostics") and "hessian_eigenvalue" in h["diagnostics"]]
        if not evs or evs[-1][0] != epoch:
            return None
        decision = early_stop_decision(evs, es)
        if decision is not None:
            decision["stopped_after_epoch"] = epoch
        return decision

    def report(self, genotype) -> Optional[dict]:
        """The end-of-search decidedness report (logged; a warning when not decided); None when off."""
        if not self.active:
            return None
        d = decidedness(self.strategy.alphas.detach(), self.ops, self.space, self.dcfg.decided_margin)
        leads = ", ".join(f"{x['name']} {x['lead']:.3g}" for x in d["decisions"])
        tops = sorted(e["top"] for e in d["edges"])
        log.info("decidedness: leads of the genotype's choices over their best alternatives (softmax weight): %s; "
                 "top softmax weight of the %d α rows: min %.3g, median %.3g, max %.3g (each row in metrics.json's "
                 "decidedness.edges)", leads, len(tops), tops[0], tops[len(tops) // 2], tops[-1])
        if not d["decided"]:
            log.warning("the genotype is not decided: its weakest choice leads by %.3g softmax weight, under "
                        "diagnostics.decided_margin=%g; another seed or a few more steps may well derive another "
                        "genotype (search longer, or raise strategy.arch_lr)", d["min_lead"], d["margin"])
        return d
