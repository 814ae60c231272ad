"""The hybrid search space: recurrent layers mixed with self-attention and convolutions over a DAG of sequence nodes.

Node 0 is the embedded input x [T, B, d].  Each later node i (1..N-1 for ``nodes = N``) receives a mixed edge from
every earlier node j; a mixed edge computes ``Σ_k w_k · op_k(s_j)`` over the candidate ops (DARTS relaxation,
Liu et al. 2019, eq. 1 -- here over whole-sequence ops of :mod:`nas.sequence_ops`), and the node's state is
``s_i = LayerNorm_i(Σ_j edge_ji(s_j))`` (Ba et al. 2016), followed by dropout.  The network output is the last
node (``output=last``) or the mean of nodes 1..N-1 (``output=mean``).  The frozen network keeps, per node, the
top-k incoming edges of the genotype (k configurable, default 2), each with one op.

Two tasks use it:
* language modeling (``dataset=ptb|wikitext2``): every op is causal, and the DAG replaces the recurrent cell of
  the AWD-LSTM-style model (:class:`nas.spaces.lm.RNNLanguageModel`: tied decoder, locked dropouts).  The DAG
  carries no state across BPTT segments (attention could not), so each segment's context is the segment itself;
  perplexity is exact for that model (every target scored once) and grows with ``bptt``.
* sentence classification (``dataset=sst2``): ops look both ways, padding is masked, and the last node's states
  are mean-pooled over each sentence's valid positions into a linear classifier (:class:`SentenceClassifier`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from nas.errors import ConfigError
from nas.genotype import (ZERO_OPS, Genotype, dag_decisions, dag_margins, derive, edge_count,
                          genotype_from_decisions)
from nas.layers import LockedDropout, dropout, embedded_dropout, mean_over_lengths, padded_embedding
from nas.mixed import sampled_index
from nas.sequence_ops import HYBRID_OPS, build_sequence_op, check_sequence_ops, padding_mask
from nas.spaces.base import SPACES, check_space_genotype
from nas.spaces.lm import RNNLanguageModel

OUTPUTS = ("last", "mean")


@dataclass
class HybridConfig:
    """``space=hybrid``: op list, node count, how genotypes are derived, and the model around the DAG.

    ``emsize`` is the word-embedding size and ``nhid`` the DAG's width d; the language model ties its decoder to
    the embedding, so there they must be equal (a classifier projects emsize -> nhid when they differ).
    Dropouts: ``dropout`` on the pooled / final output, ``dropouth`` on every node's state, ``dropouti`` on the
    embedding output, ``dropoute`` word-level (AWD-LSTM names), ``dropouta`` on attention weights.
    """

    name: str = "hybrid"
    ops: List[str] = field(default_factory=lambda: list(HYBRID_OPS))
    #: nodes of the DAG including node 0 (the embedded input): N-1 mixed nodes, N(N-1)/2 mixed edges
    nodes: int = 4
    #: edges kept per node when α is discretized (ranked by their best non-zero softmax weight)
    k: int = 2
    #: ``last``: the network output is the last node; ``mean``: the mean of nodes 1..N-1
    output: str = "last"
    emsize: int = 64
    nhid: int = 64
    heads: int = 4
    dropout: float = 0.1
    dropouth: float = 0.1
    dropouti: float = 0.1
    dropoute: float = 0.0
    dropouta: float = 0.0
    #: at most this many ``identity`` ops in a derived DAG (null: no cap; issue 20): surplus ones, the weakest first,
    #: give way to their edge's best other op (:func:`nas.genotype.cap_parameter_free`, P-DARTS's rule)
    max_parameter_free: Optional[int] = None


class HybridDAG(nn.Module):
    """The DAG of sequence nodes, as supernet (``genotype=None``) or frozen to a genotype.

    Args:
        d: width; ops: candidate op names (α columns); steps: mixed nodes (ignored with a genotype);
        causal: language modeling (True) or classification (False); concat: output nodes (supernet);
        genotype: a hybrid genotype to freeze to, or None; heads, dropouth, dropouta: see :class:`HybridConfig`.
    Forward (:meth:`run`): x [T, B, d], weights [E, K] (supernet: required; frozen: ignored), lengths [B] or None
        -> [T, B, d]; padded positions (``t >= lengths[b]``) of every node are zero.  An op whose weight is exactly 0
        is not computed (a sampled path).  On a GDAS path (weights from :func:`nas.mixed.gumbel_hard`, with α's
        gradient) each unsampled op k of an edge adds its weight h_k (value 0) to the node's sum, as the reference code
        does (AutoDL-Projects ``search_cells.py``, ``forward_gdas``): ∂L/∂h_k = Σ ∂L/∂(node sum), before the node's
        LayerNorm, which is shift-invariant, so that sum is ~0 here and α learns through the sampled op's weight.
    Raises:
        ConfigError: an invalid op list or a width an op cannot take.  ValueError: a supernet run without
        weights of shape [E, K].
    """

    def __init__(self, d: int, ops, steps: int, causal: bool, concat=None, genotype: Optional[Genotype] = None,
                 heads: int = 4, dropouth: float = 0.0, dropouta: float = 0.0):
        super().__init__()
        self.ops, self.causal, self.genotype, self.nhid = tuple(ops), causal, genotype, d
        check_sequence_ops(self.ops)
        if genotype is not None:
            steps = genotype.steps
            concat = genotype.concat
        self.steps = steps
        self.concat = tuple(concat) if concat is not None else (steps,)
        self.dropouth = dropouth

        def op(name):
            return build_sequence_op(name, d, causal, heads, dropouta)

        if genotype is None:
            # one module per (edge, non-zero op); zero ops have no module and contribute nothing
            self._active = [k for k, name in enumerate(self.ops) if name not in ZERO_OPS]
            self.edges = nn.ModuleList(
                nn.ModuleList(op(self.ops[k]) for k in self._active) for _ in range(edge_count(steps)))
        else:
            self.edges = nn.ModuleList(nn.ModuleList(op(e.op) for e in node) for node in genotype.nodes)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(steps))

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """The recurrent-cell interface of the language model: (inputs [T,B,d], hidden, weights) ->
        (outputs [T,B,d], hidden unchanged): the DAG keeps no state across segments."""
        return self.run(inputs, weights), hidden

    def run(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None,
            lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None if lengths is None else padding_mask(lengths, x.size(0)).unsqueeze(-1).to(x.dtype)
        if mask is not None:
            x = x * mask
        states = [x]
        w = self._edge_weights(weights) if self.genotype is None else None
        rest = self._unsampled(weights) if self.genotype is None else None
        offset = 0
        for i in range(1, self.steps + 1):
            if self.genotype is None:
                total = 0
                for j in range(i):
                    row = w[offset + j]
                    for module, wk, wv in zip(self.edges[offset + j], row[0], row[1]):
                        if wv == 0.0:  # a weight of exactly 0 (a sampled path): no work
                            continue
                        total = total + wk * module(states[j], lengths)
                offset += i
                if isinstance(total, int):  # every weight into this node is exactly 0
                    total = torch.zeros_like(x)
                if rest is not None:  # GDAS: the unsampled ops' weights, value 0 (see the class docstring)
                    total = total + rest[i - 1]
            else:
                total = sum(module(states[e.input], lengths)
                            for module, e in zip(self.edges[i - 1], self.genotype.nodes[i - 1]))
            s = self.norms[i - 1](total)
            if self.training and self.dropouth > 0:
                s = dropout(s, self.dropouth, batch_dim=1)  # s [T, B, d]
            if mask is not None:
                s = s * mask
            states.append(s)
        if len(self.concat) == 1:
            return states[self.concat[0]]
        return torch.stack([states[c] for c in self.concat]).mean(0)

    def _edge_weights(self, weights):
        n_edges = edge_count(self.steps)
        if weights is None or tuple(weights.shape) != (n_edges, len(self.ops)):
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"hybrid supernet needs edge weights of shape ({n_edges}, {len(self.ops)}), got {got}")
        active = weights[:, self._active]  # [E, K'] tensors (for autograd) and floats (to skip exact zeros)
        values = active.detach().tolist()
        return [(active[e].unbind(0), values[e]) for e in range(n_edges)]

    def _unsampled(self, weights):
        """On a GDAS path that needs α's gradient (weights from :func:`nas.mixed.gumbel_hard`): per node i, the sum
        of the unsampled ops' weights of its edges [steps] (value 0); else None."""
        index = sampled_index(weights)
        if index is None or not weights.requires_grad:
            return None
        per_edge = (weights * torch.ones_like(weights).scatter_(-1, index.unsqueeze(-1), 0.0)).sum(1)  # [E]
        return torch.stack([per_edge[i * (i - 1) // 2: i * (i + 1) // 2].sum() for i in range(1, self.steps + 1)])


class ClassifierOutput(NamedTuple):
    """What :class:`SentenceClassifier` returns: ``logits`` [B, C]; ``loss`` mean cross-entropy in nats when
    the forward got ``targets``; ``hidden`` is always None (no state to carry; the strategies' interface)."""

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden: None = None


class SentenceClassifier(nn.Module):
    """Embedding -> DAG (bidirectional ops, padding masked) -> mean over valid positions -> linear -> C logits.

    Args:
        ntoken: vocabulary size (index 0 is padding); dag: a non-causal :class:`HybridDAG`; emsize: embedding
        size (projected to the DAG width when different); num_classes: C; dropout: on the pooled vector;
        dropouti: on embeddings (one mask per sentence); dropoute: word-level dropout.
    Forward: tokens [T, B] (right-padded), lengths [B], weights [E, K] (supernet) -> :class:`ClassifierOutput`.
    """

    def __init__(self, ntoken: int, dag: HybridDAG, emsize: int, num_classes: int, dropout: float = 0.0,
                 dropouti: float = 0.0, dropoute: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self.encoder = padded_embedding(ntoken, emsize)
        self.proj = nn.Linear(emsize, dag.nhid) if emsize != dag.nhid else None
        self.lockdrop = LockedDropout()
        self.dag = dag
        self.classifier = nn.Linear(dag.nhid, num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> ClassifierOutput:
        x = embedded_dropout(self.encoder, tokens, self.dropoute if self.training else 0.0)
        x = self.lockdrop(x, self.dropouti)
        if self.proj is not None:
            x = self.proj(x)
        h = self.dag.run(x, weights, lengths)  # padded positions are zero
        pooled = mean_over_lengths(h, lengths)
        if self.training and self.dropout > 0:
            pooled = nn.functional.dropout(pooled, self.dropout)
        logits = self.classifier(pooled)
        loss = None if targets is None else nn.functional.cross_entropy(logits, targets)
        return ClassifierOutput(logits, loss)


@SPACES.register("hybrid", config=HybridConfig)
class HybridSpace:
    """``space=hybrid``: builds the supernet and frozen models for both tasks, and derives genotypes.

    Raises:
        ConfigError: invalid op list, fewer than 2 nodes, k < 1, or an unknown output mode (at construction).
    """

    name = "hybrid"

    def __init__(self, cfg: HybridConfig):
        self.cfg = cfg
        self.ops = tuple(cfg.ops)
        check_sequence_ops(self.ops)
        if cfg.nodes < 2:
            raise ConfigError(f"space.nodes must be >= 2 (node 0 is the input), got {cfg.nodes}")
        if cfg.k < 1:
            raise ConfigError(f"space.k must be >= 1, got {cfg.k}")
        if cfg.output not in OUTPUTS:
            raise ConfigError(f"space.output={cfg.output!r}; valid: {', '.join(OUTPUTS)}")
        self.steps = cfg.nodes - 1

    @property
    def alpha_shape(self):
        """(edges, ops) = (N(N-1)/2, K); default (6, 8)."""
        return (edge_count(self.steps), len(self.ops))

    @property
    def concat(self):
        return (self.steps,) if self.cfg.output == "last" else tuple(range(1, self.steps + 1))

    def _dag(self, causal: bool, genotype: Optional[Genotype] = None) -> HybridDAG:
        c = self.cfg
        ops = genotype.ops if genotype is not None else self.ops
        return HybridDAG(c.nhid, ops, self.steps, causal, self.concat, genotype, c.heads, c.dropouth, c.dropouta)

    def _model(self, dag: HybridDAG, ntoken: int, num_classes: Optional[int]):
        c = self.cfg
        if num_classes is None:
            # U(-0.1, 0.1) embedding (AWD-LSTM's), as this space's measured results were made with
            return RNNLanguageModel(ntoken, dag, c.emsize, c.dropout, c.dropouti, c.dropoute, init_range=0.1)
        return SentenceClassifier(ntoken, dag, c.emsize, num_classes, c.dropout, c.dropouti, c.dropoute)

    def build_supernet(self, ntoken: int, num_classes: Optional[int] = None) -> nn.Module:
        """The supernet: a language model over ``ntoken`` words, or with ``num_classes`` a sentence classifier.

        Its forward takes edge weights [E, K].
        """
        return self._model(self._dag(num_classes is None), ntoken, num_classes)

    def freeze(self, genotype: Genotype, ntoken: int, num_classes: Optional[int] = None) -> nn.Module:
        """The discrete model of ``genotype`` (same op modules, kept edges only).

        Raises:
            GenotypeError: if the genotype belongs to another space or names an op this code does not know.
        """
        self.check_genotype(genotype)
        return self._model(self._dag(num_classes is None, genotype), ntoken, num_classes)

    def check_genotype(self, genotype: Genotype) -> None:
        """Raise GenotypeError unless ``genotype`` is a valid hybrid genotype."""
        check_space_genotype(genotype, self.name, check_sequence_ops)

    def op_params(self, model: nn.Module) -> torch.Tensor:
        """The parameters of each candidate op's module on each edge of the supernet ``model``, [E, K] (float64; zero
        ops 0; ``strategy.param_penalty``): what the op adds to a derived model that keeps that edge."""
        dag = next(m for m in model.modules() if isinstance(m, HybridDAG))
        out = torch.zeros(self.alpha_shape, dtype=torch.float64)
        for e, edge in enumerate(dag.edges):
            for j, k in enumerate(dag._active):
                out[e, k] = sum(p.numel() for p in edge[j].parameters())
        return out

    def derive(self, alphas: torch.Tensor) -> Genotype:
        """Per node, the top-``k`` incoming edges by their best non-zero softmax weight, each with that op
        (:func:`nas.genotype.derive`); the genotype records the space, op list, and output nodes."""
        return derive(alphas, self.ops, self.name, k=self.cfg.k, concat=self.concat,
                      max_parameter_free=self.cfg.max_parameter_free)

    def decision_margins(self, alphas: torch.Tensor) -> list:
        """Per node, the smallest lead of a kept edge over its best alternative (:func:`nas.genotype.dag_margins`, with
        the space's ``max_parameter_free``): ``[("node i", lead)]``."""
        return [(f"node {i}", lead)
                for i, lead in dag_margins(alphas, self.ops, self.cfg.k, self.cfg.max_parameter_free)]

    def decisions(self) -> list:
        """The categorical decisions of one genotype (:func:`nas.genotype.dag_decisions`, with this space's k)."""
        return dag_decisions(self.steps, self.ops, self.cfg.k)

    def from_decisions(self, choice: dict) -> Genotype:
        """The genotype of one combination of :meth:`decisions`. Raises GenotypeError for a bad choice."""
        return genotype_from_decisions(choice, self.name, self.ops, self.steps, self.cfg.k, self.concat)
