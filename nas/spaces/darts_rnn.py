"""The DARTS recurrent-cell search space (Liu et al. 2019, sec. 2.1, 3.2 and appendix A.1.2).

Per time step, ``x_t`` and ``h_{t-1}`` give the initial node through a highway-style gate::

    [c0; h0] = [x_t ; h_{t-1}] W0,   s0 = h_{t-1} + sigmoid(c0) * (tanh(h0) - h_{t-1})

Intermediate node i (1..N) receives an edge from every earlier node j; an edge with op ``f`` computes
``s_j + sigmoid(c_j) * (f(h_j) - s_j)`` with ``[c_j; h_j] = s_j W_i`` (W_i belongs to the *node*, as in
the reference code).  The supernet mixes the ops of every edge with the weights given by the strategy
(DARTS: softmax(α)); the frozen cell keeps one edge per node.  Weights that come with a sampled op per edge (GDAS,
:func:`nas.mixed.gumbel_hard`) run the sampled path: each edge computes its sampled op alone (see
:meth:`DartsCell._sampled_nodes`).  The cell output ``h_t`` is the mean of the
``concat`` nodes (search: nodes 1..N).  Both cells are the same :class:`DartsCell`; only ``genotype``
differs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from nas.distributed import global_batch_norm
from nas.genotype import (Genotype, GenotypeError, dag_decisions, dag_margins, derive, edge_count,
                          genotype_from_decisions)
from nas.layers import dropout_mask
from nas.mixed import sampled_index
from nas.precision import addmm, mm
from nas.ops import DARTS_RNN_OPS, cell_activation, check_cell_ops
from nas.spaces.base import SPACES, check_space_genotype
from nas.spaces.lm import RNNLanguageModel
from nas.errors import ConfigError

log = logging.getLogger(__name__)

#: how long a case takes to compile: measured on the default search (PTB, 64 units, batch 64) with an empty
#: Inductor cache on 2 shared cores (2026-12-01: case 1 288 s, its backward 47 s, cases 2 and 3 28 s and 16 s)
COMPILE_TIME_NOTE = ("the first case the longest (1-5 min on a 2-core CPU, with its backward pass), later ones "
                     "10-60 s; runs after the first take seconds, from Inductor's cache on disk")
COMPILE_TIME_NOTE_NO_GRAD = ("a forward only, about 10-60 s on a 2-core CPU; runs after the first take seconds, "
                             "from Inductor's cache on disk")


@dataclass
class DartsRNNConfig:
    """``space=darts_rnn``: the cell's op list and node count, and the language model around it.

    Dropouts as named in AWD-LSTM / DARTS: ``dropout`` (output), ``dropouth`` (hidden state, inside the
    cell), ``dropoutx`` (cell input), ``dropouti`` (embedding output), ``dropoute`` (word-level).
    Defaults are the DARTS search settings (Liu et al. 2019, sec. 3.2 and A.1.2; its reference code).
    """

    name: str = "darts_rnn"
    ops: List[str] = field(default_factory=lambda: list(DARTS_RNN_OPS))
    steps: int = 8
    emsize: int = 300
    nhid: int = 300
    dropout: float = 0.75
    dropouth: float = 0.25
    dropoutx: float = 0.75
    dropouti: float = 0.2
    dropoute: float = 0.0
    #: BatchNorm on every node of the *search* cell, as the DARTS search code's one shared
    #: ``nn.BatchNorm1d(nhid, affine=False)`` (rnn/model_search.py): batch statistics in training, each call updating
    #: the running statistics (momentum 0.1), which evaluation uses alone; it keeps the mixed states of differently
    #: scaled ops comparable.  Never in a frozen cell.
    batchnorm: bool = True
    #: weights of the cell and of the tied embedding/decoder ~ U(-r, r) (the reference code's INITRANGE)
    init_range: float = 0.04
    #: at most this many ``identity`` ops in a derived cell (null: no cap; issue 20): surplus ones, the weakest
    #: first, give way to their edge's best other op (:func:`nas.genotype.cap_parameter_free`, P-DARTS's rule)
    max_parameter_free: Optional[int] = None


class DartsCell(nn.Module):
    """The DARTS recurrent cell, as supernet (``genotype=None``) or frozen to a genotype.

    Args:
        ninp: input size E; nhid: hidden size H; ops: candidate op names (α columns);
        steps: intermediate nodes N (ignored when a genotype is given: it has its own);
        genotype: a darts_rnn genotype (one edge per node) to freeze to, or None for the supernet;
        dropouth / dropoutx: variational dropout on states / inputs (one mask per sequence);
        batchnorm: BatchNorm on s0 and each node (supernet only), one set of running statistics shared by all of
            them (buffers ``bn_running_mean`` / ``bn_running_var`` [H]), updated at every call in training (T x
            (N + 1) times per forward, in the order of the reference code), used alone in evaluation;
        init_range: weights ~ U(-r, r) as in the reference code.
    Forward:
        inputs [T, B, E], hidden [B, H], weights [E_edges, K] (supernet: required; frozen: ignored)
        -> (outputs [T, B, H], last hidden [B, H]).  Weights carrying a sampled op per edge
        (:func:`nas.mixed.sampled_index`: GDAS) compute only those ops (:meth:`_sampled_nodes`).
    Raises:
        GenotypeError: if the genotype is of another space or keeps more than one edge per node.
        ValueError: for an invalid op list, or a supernet forward without weights of shape [E, K].
    """

    def __init__(self, ninp: int, nhid: int, ops, steps: int = 8, genotype: Optional[Genotype] = None,
                 dropouth: float = 0.0, dropoutx: float = 0.0, batchnorm: bool = False,
                 init_range: float = 0.04):
        super().__init__()
        ops = tuple(ops)
        check_cell_ops(ops)
        if genotype is not None:
            if any(len(node) != 1 for node in genotype.nodes):
                raise GenotypeError("a darts_rnn genotype keeps exactly one edge per node")
            steps = genotype.steps
            batchnorm = False
        self.ninp, self.nhid, self.ops, self.steps, self.genotype = ninp, nhid, ops, steps, genotype
        self.dropouth, self.dropoutx = dropouth, dropoutx
        self.W0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-init_range, init_range))
        self.Ws = nn.ParameterList(
            [nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-init_range, init_range)) for _ in range(steps)])
        self.batchnorm = batchnorm
        if batchnorm:
            self.register_buffer("bn_running_mean", torch.zeros(nhid))
            self.register_buffer("bn_running_var", torch.ones(nhid))
        self._active_idx = [k for k, o in enumerate(ops) if cell_activation(o) is not None]
        self._active_fns = [cell_activation(ops[k]) for k in self._active_idx]
        self.concat = list(genotype.concat) if genotype is not None else list(range(1, steps + 1))
        self._compiled_step = None
        #: dtype of the products in training (None: the weights' own; config ``matmul_dtype``, nas.precision)
        self.matmul_dtype: Optional[torch.dtype] = None
        if genotype is not None:
            self._frozen = [(cell_activation(node[0].op), node[0].input) for node in genotype.nodes]

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor,
                weights: Optional[torch.Tensor] = None):
        T, B = inputs.shape[:2]
        node_weights = None
        if self.genotype is None:
            index = sampled_index(weights)
            node_weights = self._node_weights(weights) if index is None else self._sampled_weights(weights, index)
        x_mask = h_mask = None
        if self.training and self.dropoutx > 0:
            x_mask = dropout_mask(inputs, (B, self.ninp), self.dropoutx, batch_dim=0)
        if self.training and self.dropouth > 0:
            h_mask = dropout_mask(inputs, (B, self.nhid), self.dropouth, batch_dim=0)
        x = inputs if x_mask is None else inputs * x_mask
        wx, wh, ws = self.W0[: self.ninp], self.W0[self.ninp:], tuple(self.Ws)
        low = self.matmul_dtype if self.training else None
        if low is not None:  # the weights rounded once per forward; each product rounds its input (nas.precision)
            wx, wh, ws = wx.to(low), wh.to(low), tuple(w.to(low) for w in ws)
        # the input half of W0 for all time steps in one matrix product: [T*B, E] @ [E, 2H]
        xw = mm(x.reshape(T * B, self.ninp), wx).view(T, B, 2 * self.nhid)
        step = self._compiled_step or self._time_step
        if isinstance(node_weights, _SampledPath):  # a new path every step: compiling would recompile each time
            step = self._time_step
        bn = (self.bn_running_mean, self.bn_running_var) if self.batchnorm else None
        started = self._announce_compile(B, h_mask, wh, node_weights) if step is self._compiled_step else None
        outputs = []
        h = hidden
        for xw_t in xw.unbind(0):
            h = step(xw_t, h, h_mask, wh, ws, node_weights, bn)
            outputs.append(h)
        if started is not None:
            log.info("torch.compile: compiled case %d of the cell's time step and ran its first forward pass in "
                     "%.1f s%s", len(self._compile_cases), time.perf_counter() - started,
                     " (its backward compiles at the first backward pass)" if torch.is_grad_enabled() else "")
        return torch.stack(outputs), h

    def _announce_compile(self, batch: int, h_mask, wh, node_weights) -> Optional[float]:
        """Log the first forward of each case the compiled step meets (a new batch size, train / eval, which
        inputs need a gradient: roughly what makes torch.compile compile again); its start time, else None."""
        w = node_weights[0][0] if node_weights else None
        case = (batch, self.training, torch.is_grad_enabled(), h_mask is not None, wh.requires_grad,
                w is not None and w.requires_grad, wh.dtype, wh.device.type)
        if case in self._compile_cases:
            return None
        self._compile_cases.add(case)
        log.info("torch.compile: compiling the cell's time step for case %d (batch %d, %s, %s); each new case "
                 "compiles once, %s (compile=false runs eager)",
                 len(self._compile_cases), batch, "training" if self.training else "evaluation",
                 "with gradients" if torch.is_grad_enabled() else "no gradients",
                 COMPILE_TIME_NOTE if torch.is_grad_enabled() else COMPILE_TIME_NOTE_NO_GRAD)
        return time.perf_counter()

    def set_matmul_dtype(self, dtype: Optional[torch.dtype]) -> None:
        """Run the training passes' matrix products in ``dtype`` (None: the weights' own; config ``matmul_dtype``):
        W0 and the W_i rounded once per forward, each product's input once (:mod:`nas.precision`).  Evaluation
        (``eval()``) keeps the weights' dtype."""
        self.matmul_dtype = dtype

    def compile_step(self) -> None:
        """Run the time step (everything after the input projection) through ``torch.compile``.

        The compiled step computes the same function (tests pin it to the eager step); Inductor fuses its
        elementwise work and keeps for backward only what backward needs.  Each new input shape (batch,
        train/eval) compiles once; Inductor caches compiled code on disk across runs.  A search meets
        about eight variants (train / α / full passes, the first time step's detached state, eval), Dynamo's
        default recompile limit, past which it would silently run eager: the limit is raised to 64.
        """
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_step = torch.compile(self._time_step, dynamic=False)
        self._compile_cases = set()

    def _time_step(self, xw_t, h, h_mask, wh, ws, node_weights, bn):
        """One time step: x_t's projection xw_t [B, 2H] and h_{t-1} [B, H] -> h_t [B, H].

        ``bn``: the BatchNorm running statistics (mean [H], var [H]), updated in place in training; None: no
        BatchNorm.  (Passed in rather than read from ``self`` so that ``functional_call`` can substitute copies.)"""
        # chunk rather than slicing: its backward is one cat, where a slice backward zero-fills a
        # full-size gradient per use (a large share of the step time on CPU)
        c0, h0 = addmm(xw_t, h if h_mask is None else h * h_mask, wh).chunk(2, dim=-1)
        s0 = torch.lerp(h, torch.tanh(h0), torch.sigmoid(c0))  # h + sigmoid(c0) (tanh(h0) - h)
        if bn is not None:
            s0 = global_batch_norm(s0, *bn, training=self.training)
        if isinstance(node_weights, _SampledPath):
            return self._sampled_nodes(s0, h_mask, ws, node_weights, bn)
        if self.genotype is None:
            return self._supernet_nodes(s0, h_mask, ws, node_weights, bn)
        return self._frozen_nodes(s0, h_mask, ws)

    def _node_weights(self, weights):
        """Per node i: (w [i, K'] over the non-zero ops, P [i, 1, 1] = their sum), sliced once per forward."""
        n_edges = edge_count(self.steps)
        if weights is None or tuple(weights.shape) != (n_edges, len(self.ops)):
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"supernet cell needs edge weights of shape ({n_edges}, {len(self.ops)}), got {got}")
        w = weights[:, self._active_idx]  # [E, K']: zero ops contribute nothing
        p = w.sum(1)
        out, offset = [], 0
        for i in range(1, self.steps + 1):
            out.append((w[offset:offset + i], p[offset:offset + i].view(i, 1, 1)))
            offset += i
        return out

    def _sampled_weights(self, weights, index):
        """The sampled path: per node i, the edges (source j, activation, weight w[e, a_e] scalar) whose sampled op
        a_e is not a zero op, and the sum of the node's other weights (None when ``weights`` need no gradient)."""
        n_edges = edge_count(self.steps)
        if tuple(weights.shape) != (n_edges, len(self.ops)) or tuple(index.shape) != (n_edges,):
            raise ValueError(f"supernet cell needs edge weights of shape ({n_edges}, {len(self.ops)}) and a sampled op "
                             f"per edge, got {tuple(weights.shape)} and {tuple(index.shape)}")
        picks = index.tolist()
        rest = None
        if weights.requires_grad:  # Σ_{k != a_e} w[e, k] per node: value 0, gradient 1 to each unsampled weight
            unsampled = torch.ones_like(weights).scatter_(-1, index.unsqueeze(-1), 0.0)
            rest = (weights * unsampled).sum(1)
        nodes, offset = [], 0
        for i in range(1, self.steps + 1):
            edges = [(j, cell_activation(self.ops[picks[offset + j]]), weights[offset + j, picks[offset + j]])
                     for j in range(i)]
            nodes.append(([(j, f, w) for j, f, w in edges if f is not None],
                          None if rest is None else rest[offset:offset + i].sum()))
            offset += i
        return _SampledPath(nodes)

    def _sampled_nodes(self, s0, h_mask, ws, path, bn):
        """The nodes on a sampled path (GDAS, Dong & Yang 2019, sec. 3.2): edge j -> i with sampled op a computes
        ``h_a · (s_j + c_j (f_a(h_j) - s_j))`` alone, and each unsampled op k of the edge adds its weight h_k (a
        scalar of value 0): the reference code's estimator (AutoDL-Projects ``search_cells.py``, ``forward_gdas``:
        ``weights[k] * edge(x)`` for the sampled op, ``weights[k]`` for the others), so ∂L/∂h_k is Σ ∂L/∂s_i for an
        unsampled op, ⟨∂L/∂s_i, edge output⟩ for the sampled one.  A node whose every sampled op is a zero op is 0."""
        states = [s0]
        for i, (edges, rest) in enumerate(path.nodes):
            s = None
            for j, f, w in edges:
                sj = states[j]
                c, hh = mm(sj if h_mask is None else sj * h_mask, ws[i]).chunk(2, dim=-1)
                out = w * torch.lerp(sj, f(hh), torch.sigmoid(c))
                s = out if s is None else s + out
            if s is None:
                s = torch.zeros_like(s0)
            if rest is not None:
                s = s + rest
            if bn is not None:
                s = global_batch_norm(s, *bn, training=self.training)
            states.append(s)
        return torch.stack([states[c] for c in self.concat]).mean(0)

    def _supernet_nodes(self, s0, h_mask, ws, node_weights, bn):
        states = s0.unsqueeze(0)  # [n, B, H]: nodes 0..n-1
        nodes = [s0]
        for i, (w, p) in enumerate(node_weights):
            ch = mm(states if h_mask is None else states * h_mask, ws[i])  # [n, B, 2H]
            c, hh = ch.chunk(2, dim=-1)
            c = torch.sigmoid(c)
            # Σ_k w_k (s + c (f_k(h) - s)) = lerp(P s, F, c) with P = Σ_k w_k, F = Σ_k w_k f_k(h), k non-zero
            acts = torch.stack([f(hh) for f in self._active_fns])  # [K', n, B, H]
            mix = torch.einsum("nk,knbh->nbh", w, acts)
            s = torch.lerp(p * states, mix, c).sum(0)  # [B, H]
            if bn is not None:
                s = global_batch_norm(s, *bn, training=self.training)
            states = torch.cat([states, s.unsqueeze(0)], 0)
            nodes.append(s)
        return torch.stack([nodes[c] for c in self.concat]).mean(0)

    def _frozen_nodes(self, s0, h_mask, ws):
        states = [s0]
        for i, (f, j) in enumerate(self._frozen):
            sp = states[j]
            c, hh = mm(sp if h_mask is None else sp * h_mask, ws[i]).chunk(2, dim=-1)
            states.append(torch.lerp(sp, f(hh), torch.sigmoid(c)))
        return torch.stack([states[c] for c in self.concat]).mean(0)


class _SampledPath(NamedTuple):
    """Per node: ([(source j, activation, weight scalar)] of the edges whose sampled op is not a zero op, the sum of
    the node's unsampled weights or None)."""

    nodes: list


@SPACES.register("darts_rnn", config=DartsRNNConfig)
class DartsRNNSpace:
    """``space=darts_rnn``: builds the supernet LM, the frozen LM of a genotype, and derives genotypes.

    Raises:
        ValueError: for an invalid op list or non-positive steps (at construction).
    """

    name = "darts_rnn"

    def __init__(self, cfg: DartsRNNConfig):
        self.cfg = cfg
        self.ops = tuple(cfg.ops)
        check_cell_ops(self.ops)
        if cfg.steps < 1:
            raise ConfigError(f"space.steps must be >= 1, got {cfg.steps}")

    @property
    def alpha_shape(self):
        """(edges, ops) = (N(N+1)/2, K); DARTS: (36, 5)."""
        return (edge_count(self.cfg.steps), len(self.ops))

    def _lm(self, ntoken: int, cell: DartsCell) -> RNNLanguageModel:
        c = self.cfg
        return RNNLanguageModel(ntoken, cell, c.emsize, c.dropout, c.dropouti, c.dropoute, c.init_range)

    def build_supernet(self, ntoken: int) -> RNNLanguageModel:
        """The supernet LM over ``ntoken`` words; its forward takes edge weights [E, K]."""
        c = self.cfg
        cell = DartsCell(c.emsize, c.nhid, self.ops, c.steps, None, c.dropouth, c.dropoutx,
                         c.batchnorm, c.init_range)
        return self._lm(ntoken, cell)

    def freeze(self, genotype: Genotype, ntoken: int) -> RNNLanguageModel:
        """The discrete LM of ``genotype`` (same cell code, one op per node, no BatchNorm).

        Raises:
            GenotypeError: if the genotype belongs to another space or uses an op this space lacks.
        """
        self.check_genotype(genotype)
        c = self.cfg
        cell = DartsCell(c.emsize, c.nhid, genotype.ops, genotype.steps, genotype, c.dropouth,
                         c.dropoutx, False, c.init_range)
        return self._lm(ntoken, cell)

    def check_genotype(self, genotype: Genotype) -> None:
        """Raise GenotypeError unless ``genotype`` is a valid darts_rnn genotype."""
        check_space_genotype(genotype, self.name, check_cell_ops)

    def op_params(self, model: nn.Module) -> torch.Tensor:
        """The parameters each candidate op on each edge adds to a derived cell, [E, K] (float64; ``strategy.
        param_penalty``).  A derived node keeps one input edge and one op with its own matrix W_i [nhid, 2 nhid]
        whatever the op (``none`` is never derived: 0), so an edge into node i counts W_i's size / i (node i has i
        candidate inputs): the expected count of a node is W_i's size times the mean non-none weight of its edges.
        Every derived genotype of this space has the same count (steps x 2 nhid²): the penalty only pushes weight
        towards ``none``."""
        size = 2 * self.cfg.nhid * self.cfg.nhid
        out = torch.zeros(self.alpha_shape, dtype=torch.float64)
        offset = 0
        for i in range(1, self.cfg.steps + 1):
            for k, name in enumerate(self.ops):
                if name != "none":
                    out[offset:offset + i, k] = size / i
            offset += i
        return out

    def derive(self, alphas: torch.Tensor) -> Genotype:
        """DARTS discretization: per node, one edge (see :func:`nas.genotype.derive`), with at most
        ``space.max_parameter_free`` identity ops."""
        return derive(alphas, self.ops, self.name, k=1, max_parameter_free=self.cfg.max_parameter_free)

    def decision_margins(self, alphas: torch.Tensor) -> list:
        """Per node, the lead of its choice over the best alternative (:func:`nas.genotype.dag_margins`, k = 1, with
        the space's ``max_parameter_free``): ``[("node i", lead)]``."""
        return [(f"node {i}", lead) for i, lead in dag_margins(alphas, self.ops, 1, self.cfg.max_parameter_free)]

    def decisions(self) -> list:
        """The categorical decisions of one genotype: per node its input and op (:func:`nas.genotype.dag_decisions`,
        k = 1); the paper's space has 8! x 4^8 = 2.6e9 genotypes."""
        return dag_decisions(self.cfg.steps, self.ops, 1)

    def from_decisions(self, choice: dict) -> Genotype:
        """The genotype of one combination of :meth:`decisions`. Raises GenotypeError for a bad choice."""
        return genotype_from_decisions(choice, self.name, self.ops, self.cfg.steps, 1)
