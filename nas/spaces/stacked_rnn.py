"""The stacked-RNN search space: a chain of torch's fused recurrent layers (``nn.RNN`` tanh / relu, ``nn.LSTM``,
``nn.GRU``; Elman 1990, Hochreiter & Schmidhuber 1997, Cho et al. 2014).

A genotype is a chain: layer i (1..L) reads layer i-1 (0 = the embedding), ``concat = (L,)``, and
``Genotype.params`` gives each layer its ``units``, the ``dropout`` after it (locked: one mask per sequence, as
AWD-LSTM's between layers) and, for classification, ``bidirectional``.  Its ``ops`` are the space's op list:
the cells and ``identity`` (a layer that passes its input on: depth in the one-shot supernet).

* Black-box strategies (random, bayesian) search depth and, per layer, cell, units, dropout (and bidirectional
  when ``space.bidirectional`` has two choices), drawn define-by-run: a layer's decisions only when it is within
  the chosen depth (:meth:`StackedRNNSpace.sample_decisions`).
* One-shot strategies (darts, gdas, random_ws) search the cell of each of ``max_layers`` layers among the cells and
  ``identity``, at the fixed width ``nhid`` (``space.units`` must be ``[nhid]``), with every layer's dropout the
  first of ``space.dropouts`` and unidirectional layers (a bidirectional layer doubles its width, which an
  ``identity`` candidate beside it could not).  :meth:`derive` keeps an ``identity`` layer in the chain as op
  ``identity`` (so the frozen model is exactly the supernet's one-hot path; a chain of identities stays valid).

Language modelling: embedding -> layers (hidden states carried across BPTT segments; every layer's state, an LSTM's
h and c, packed into one [B, H_total] tensor, the engine's interface) -> a linear projection to ``emsize`` when the
last layer's width differs -> decoder tied to the embedding (Press & Wolf 2017) through
:class:`nas.spaces.lm.RNNLanguageModel`.  Classification: embedding -> layers over packed sequences
(``pack_padded_sequence``: padding never enters a state) -> mean of the last layer's outputs over each sentence's
valid positions (as the hybrid space: a bidirectional layer's last valid state would hold only one direction's
summary of the whole sentence) -> linear.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nas.errors import ConfigError
from nas.genotype import Edge, Genotype, GenotypeError, cap_parameter_free
from nas.layers import LockedDropout, embedded_dropout, mean_over_lengths, padded_embedding
from nas.mixed import sampled_index
from nas.spaces.base import SPACES, check_space_genotype
from nas.spaces.hybrid import ClassifierOutput
from nas.spaces.lm import RNNLanguageModel

CELLS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
IDENTITY = "identity"
#: keys of a cell layer's params, and of an identity layer's
CELL_PARAMS = ("bidirectional", "dropout", "units")
IDENTITY_PARAMS = ("dropout",)


@dataclass
class StackedRNNConfig:
    """``space=stacked_rnn``: the choices of each decision and the model around the stack.

    ``cells``: candidate cell types; ``max_layers``: the deepest stack; ``units`` / ``dropouts`` /
    ``bidirectional``: a layer's choices (``bidirectional`` [false] for language models, [false, true] for
    classification in ``conf/tuning/*_stacked_rnn_sst2.yaml``); ``emsize``: word-embedding size; ``nhid``: the
    one-shot supernet's width (must equal ``emsize`` and be the only ``units`` choice there); ``dropouti``: on the
    embedding output (one mask per sequence); ``dropoute``: word-level (AWD-LSTM names).
    """

    name: str = "stacked_rnn"
    cells: List[str] = field(default_factory=lambda: list(CELLS))
    max_layers: int = 4
    units: List[int] = field(default_factory=lambda: [64, 128, 256])
    dropouts: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])
    bidirectional: List[bool] = field(default_factory=lambda: [False])
    emsize: int = 128
    nhid: int = 128
    dropouti: float = 0.1
    dropoute: float = 0.0
    #: one-shot derivation: at most this many ``identity`` layers (null: no cap; issue 20): surplus ones, the weakest
    #: first, take their layer's best cell (:func:`nas.genotype.cap_parameter_free`, P-DARTS's rule)
    max_parameter_free: Optional[int] = None


def check_cells(ops) -> None:
    """Raise ValueError unless ``ops`` are distinct names of :data:`CELLS` and ``identity``, with a cell among them."""
    unknown = [o for o in ops if o not in CELLS + (IDENTITY,)]
    if unknown:
        raise ValueError(f"unknown stacked_rnn op(s) {unknown}; valid: {', '.join(CELLS + (IDENTITY,))}")
    if len(set(ops)) != len(ops) or not any(o in CELLS for o in ops):
        raise ValueError(f"stacked_rnn ops {list(ops)} must be distinct and name at least one cell")


def make_cell(name: str, ninp: int, units: int, bidirectional: bool = False) -> nn.RNNBase:
    """torch's fused recurrent layer ``name`` (one of :data:`CELLS`): input size ``ninp``, hidden size ``units``
    per direction; layout [T, B, D]."""
    if name == "lstm":
        return nn.LSTM(ninp, units, bidirectional=bidirectional)
    if name == "gru":
        return nn.GRU(ninp, units, bidirectional=bidirectional)
    return nn.RNN(ninp, units, nonlinearity=name[len("rnn_"):], bidirectional=bidirectional)


def state_size(name: str, units: int) -> int:
    """Columns of a unidirectional layer's carried state in the packed hidden tensor: LSTM h and c, else h."""
    return 2 * units if name == "lstm" else units


class StackLayer(nn.Module):
    """One layer of the stack: a mixed op over candidate cells (+ ``identity``) in the supernet, one op when frozen.

    Args:
        ops: candidate names (frozen: one); ninp: input width; units: hidden size per direction; dropout: locked
        dropout on the layer's output; bidirectional: both directions (output width 2 * units).
    The candidate cells live in ``self.cells[name]`` under the same names in supernet and frozen model, so a frozen
    model loads the supernet's weights of its path (``load_state_dict(strict=False)``).
    """

    def __init__(self, ops, ninp: int, units: int, dropout: float, bidirectional: bool = False):
        super().__init__()
        self.ops, self.dropout = tuple(ops), dropout
        self.cells = nn.ModuleDict({o: make_cell(o, ninp, units, bidirectional) for o in self.ops if o != IDENTITY})
        widths = {2 * units if bidirectional else units} if self.cells else set()
        if IDENTITY in self.ops:
            widths.add(ninp)
        if len(widths) != 1:
            raise ConfigError(f"a stacked_rnn layer mixes identity (width {ninp}) with cells of width "
                              f"{max(widths)}: the supernet needs emsize == nhid and unidirectional layers")
        self.width = widths.pop()
        #: per op, the columns of its state in the packed hidden tensor (language models)
        self.state_sizes = [state_size(o, units) if o != IDENTITY else 0 for o in self.ops]
        self.units = units
        self.lockdrop = LockedDropout()

    def run(self, x, states, row, rest=None):
        """x: [T, B, D] or a PackedSequence; states: per op its initial state (None: zeros); row: per op (weight
        tensor, float) or None (frozen); rest: GDAS's sum of the unsampled ops' weights (a scalar of value 0 added to
        the output, so each gets the reference estimator's gradient: :class:`nas.spaces.hybrid.HybridDAG`) or None.
        Returns (output: [T, B, width] or packed, new states per op)."""
        data, new = None, []
        for k, op in enumerate(self.ops):
            if row is not None and row[k][1] == 0.0:  # exact 0 (a sampled path): no work, state carried on
                new.append(states[k])
                continue
            if op == IDENTITY:
                y, s = x, None
            else:
                y, s = self.cells[op](x, states[k])
            y = y if torch.is_tensor(y) else y.data  # a PackedSequence's data: same batch sizes for every op
            if row is not None:
                y = row[k][0] * y
            data = y if data is None else data + y
            new.append(s)
        if data is None:  # every weight is exactly 0
            data = torch.zeros_like(x if torch.is_tensor(x) else x.data)
        if rest is not None:
            data = data + rest
        return (data if torch.is_tensor(x) else x._replace(data=data)), new


class Stack(nn.Module):
    """The chain of :class:`StackLayer`; the "cell" of :class:`RNNLanguageModel` and the body of the classifier.

    Args:
        layers: the layers, in order; emsize: the embedding size; project: add a linear map from the last layer's
        width to ``emsize`` when they differ (language models: the tied decoder reads emsize).
    Attributes: ``nhid`` = emsize for a language model (what the tied decoder reads); ``state_size``: columns of
    the packed hidden state [B, H_total].
    """

    def __init__(self, layers, emsize: int, project: bool):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.width = self.layers[-1].width
        self.proj = nn.Linear(self.width, emsize) if project and self.width != emsize else None
        self.nhid = emsize if project else self.width
        self.state_size = sum(sum(layer.state_sizes) for layer in self.layers)

    def _rows(self, weights):
        if weights is None:
            return [None] * len(self.layers)
        shape = (len(self.layers), len(self.layers[0].ops))
        if tuple(weights.shape) != shape:
            raise ValueError(f"stacked_rnn supernet needs layer weights of shape {shape}, got {tuple(weights.shape)}")
        values = weights.detach().tolist()
        return [list(zip(weights[i].unbind(0), values[i])) for i in range(shape[0])]

    def _unsampled(self, weights):
        """On a GDAS path that needs α's gradient (weights from :func:`nas.mixed.gumbel_hard`): per layer the sum of
        its unsampled ops' weights (value 0); else Nones."""
        index = sampled_index(weights)
        if index is None or not weights.requires_grad:
            return [None] * len(self.layers)
        return (weights * torch.ones_like(weights).scatter_(-1, index.unsqueeze(-1), 0.0)).sum(1).unbind(0)

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor, weights: Optional[torch.Tensor] = None):
        """Language model: inputs [T, B, emsize], hidden [B, state_size], weights [L, K] (supernet) ->
        (outputs [T, B, emsize] after the last layer's dropout and the projection, hidden [B, state_size])."""
        parts = iter(hidden.split([n for layer in self.layers for n in layer.state_sizes], dim=1))
        x, out_states = inputs, []
        for layer, row, rest in zip(self.layers, self._rows(weights), self._unsampled(weights)):
            states = [_unpack(op, next(parts)) for op in layer.ops]
            x, new = layer.run(x, states, row, rest)
            x = layer.lockdrop(x, layer.dropout)
            out_states += [_pack(op, s) for op, s in zip(layer.ops, new)]
        if self.proj is not None:
            x = self.proj(x)
        packed = [s for s in out_states if s is not None]
        return x, (torch.cat(packed, dim=1) if packed else hidden)

    def run(self, x: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Classifier: x [T, B, emsize] right-padded, lengths [B] -> [T, B, width], zero at padded positions.
        Each layer reads a PackedSequence, so padding never enters a recurrent state."""
        T = x.size(0)
        mask = (torch.arange(T, device=x.device).unsqueeze(1) < lengths.to(x.device).unsqueeze(0))
        mask = mask.unsqueeze(-1).to(x.dtype)  # [T, B, 1]
        x = x * mask
        cpu_lengths = lengths.cpu()
        for layer, row, rest in zip(self.layers, self._rows(weights), self._unsampled(weights)):
            packed = pack_padded_sequence(x, cpu_lengths, enforce_sorted=False)
            y, _ = layer.run(packed, [None] * len(layer.ops), row, rest)
            x, _ = pad_packed_sequence(y, total_length=T)
            x = layer.lockdrop(x, layer.dropout) * mask
        return x


def _unpack(op: str, flat: torch.Tensor):
    """A layer's packed state columns [B, n] -> torch's initial state ([1, B, u], or LSTM's (h, c)); None for
    identity."""
    if op == IDENTITY:
        return None
    if op == "lstm":
        h, c = flat.chunk(2, dim=1)
        return h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()
    return flat.unsqueeze(0).contiguous()


def _pack(op: str, state):
    """torch's final state ([1, B, u], or LSTM's (h, c)) -> [B, n] columns (LSTM: [h | c])."""
    if op == IDENTITY:
        return None
    if op == "lstm":
        return torch.cat([state[0][0], state[1][0]], dim=1)
    return state[0]


class StackedLM(RNNLanguageModel):
    """:class:`RNNLanguageModel` around a :class:`Stack`: the hidden state is every layer's, packed [B, H_total]."""

    def init_hidden(self, batch_size: int) -> torch.Tensor:
        """Zero state [B, H_total] (H_total = Σ layers' state columns; LSTM: 2 x units) on the model's device."""
        return self.encoder.weight.new_zeros(batch_size, self.cell.state_size)


class StackedClassifier(nn.Module):
    """Embedding -> :class:`Stack` over packed sentences -> mean over valid positions -> linear -> C logits.

    Args:
        ntoken: vocabulary size (index 0 is padding); stack: the layers; emsize: embedding size;
        num_classes: C >= 2; dropouti, dropoute: embedding-output and word-level dropout.
    Forward: tokens [T, B] (right-padded), lengths [B] (>= 1), weights [L, K] (supernet), targets [B] ->
    :class:`ClassifierOutput` (``loss``: mean cross-entropy in nats when targets are given).
    Raises: ConfigError for fewer than 2 classes.
    """

    def __init__(self, ntoken: int, stack: Stack, emsize: int, num_classes: int, dropouti: float = 0.0,
                 dropoute: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.dropouti, self.dropoute = dropouti, dropoute
        self.encoder = padded_embedding(ntoken, emsize)
        self.lockdrop = LockedDropout()
        self.stack = stack
        self.classifier = nn.Linear(stack.width, num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> ClassifierOutput:
        x = embedded_dropout(self.encoder, tokens, self.dropoute if self.training else 0.0)
        x = self.lockdrop(x, self.dropouti)
        h = self.stack.run(x, lengths, weights)  # [T, B, width], zero at padding
        pooled = mean_over_lengths(h, lengths)
        logits = self.classifier(pooled)
        loss = None if targets is None else nn.functional.cross_entropy(logits, targets)
        return ClassifierOutput(logits, loss)


@SPACES.register("stacked_rnn", config=StackedRNNConfig)
class StackedRNNSpace:
    """``space=stacked_rnn``: frozen stacks of genotypes, the one-shot supernet, α -> genotype, and the black-box
    decisions.

    Raises:
        ConfigError: (at construction) an unknown or repeated cell, ``max_layers`` < 1, an empty or non-positive
        ``units``, a dropout outside [0, 1), an empty ``bidirectional``.
    """

    name = "stacked_rnn"

    def __init__(self, cfg: StackedRNNConfig):
        self.cfg = cfg
        cells = tuple(cfg.cells)
        if IDENTITY in cells:
            raise ConfigError("space.cells lists identity: it is added by the space (a one-shot layer may be identity)")
        try:
            check_cells(cells)
        except ValueError as err:
            raise ConfigError(f"space.cells: {err}") from None
        if cfg.max_layers < 1:
            raise ConfigError(f"space.max_layers must be >= 1, got {cfg.max_layers}")
        if not cfg.units or any(isinstance(u, bool) or int(u) != u or u < 1 for u in cfg.units):
            raise ConfigError(f"space.units must be a non-empty list of positive integers, got {list(cfg.units)}")
        if not cfg.dropouts or any(not 0.0 <= d < 1.0 for d in cfg.dropouts):
            raise ConfigError(f"space.dropouts must be a non-empty list of values in [0, 1), got {list(cfg.dropouts)}")
        if not cfg.bidirectional:
            raise ConfigError("space.bidirectional must list at least one of false, true")
        self.cells = cells
        self.ops = cells + (IDENTITY,)
        self.units = tuple(int(u) for u in cfg.units)
        self.dropouts = tuple(float(d) for d in cfg.dropouts)
        self.directions = tuple(bool(b) for b in cfg.bidirectional)

    # -- the frozen model -------------------------------------------------------------------------------------
    def check_genotype(self, genotype: Genotype, language_model: bool = False) -> None:
        """Raise GenotypeError unless ``genotype`` is a stacked_rnn chain whose layers have valid params
        (``language_model``: and none is bidirectional)."""
        check_space_genotype(genotype, self.name, check_cells)
        for i, node in enumerate(genotype.nodes, start=1):
            if len(node) != 1 or node[0].input != i - 1:
                raise GenotypeError(f"stacked_rnn layer {i} must read layer {i - 1} alone, got "
                                    f"{[(e.op, e.input) for e in node]}")
        if genotype.concat != (genotype.steps,):
            raise GenotypeError(f"a stacked_rnn genotype's output is its last layer: concat must be "
                                f"[{genotype.steps}], got {list(genotype.concat)}")
        if genotype.params is None:
            raise GenotypeError("a stacked_rnn genotype needs params (units, dropout, bidirectional) per layer")
        for i, node in enumerate(genotype.nodes, start=1):
            p, op = genotype.node_params(i), node[0].op
            keys = IDENTITY_PARAMS if op == IDENTITY else CELL_PARAMS
            if tuple(sorted(p)) != keys:
                raise GenotypeError(f"stacked_rnn layer {i} ({op}) needs params {list(keys)}, got {sorted(p)}")
            d = p["dropout"]
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
                raise GenotypeError(f"stacked_rnn layer {i}: dropout must be in [0, 1), got {d!r}")
            if op == IDENTITY:
                continue
            u, b = p["units"], p["bidirectional"]
            if isinstance(u, bool) or not isinstance(u, int) or u < 1:
                raise GenotypeError(f"stacked_rnn layer {i}: units must be a positive integer, got {u!r}")
            if not isinstance(b, bool):
                raise GenotypeError(f"stacked_rnn layer {i}: bidirectional must be true or false, got {b!r}")
            if b and language_model:
                raise GenotypeError(f"stacked_rnn layer {i} is bidirectional: a language model's layers cannot "
                                    "read the future")

    def _stack(self, genotype: Genotype, project: bool) -> Stack:
        layers, width = [], self.cfg.emsize
        for i, node in enumerate(genotype.nodes, start=1):
            p, op = genotype.node_params(i), node[0].op
            units = width if op == IDENTITY else p["units"]
            layer = StackLayer((op,), width, units, float(p["dropout"]), bool(p.get("bidirectional", False)))
            layers.append(layer)
            width = layer.width
        return Stack(layers, self.cfg.emsize, project)

    def _model(self, stack: Stack, ntoken: int, num_classes: Optional[int]):
        c = self.cfg
        if num_classes is None:
            # no output dropout of its own: every layer's dropout follows it, the last one's too
            return StackedLM(ntoken, stack, c.emsize, 0.0, c.dropouti, c.dropoute, init_range=0.1)
        return StackedClassifier(ntoken, stack, c.emsize, num_classes, c.dropouti, c.dropoute)

    def freeze(self, genotype: Genotype, ntoken: int, num_classes: Optional[int] = None) -> nn.Module:
        """The model of ``genotype``: a language model over ``ntoken`` words (``num_classes`` None:
        ``model(data [T,B], hidden [B,H_total], weights=None, targets=None) -> LMOutput``) or a sentence
        classifier (``model(tokens [T,B], lengths [B], weights=None, targets=None) -> ClassifierOutput``).

        Raises:
            GenotypeError: a genotype of another space, not a chain, or with invalid params; a bidirectional layer
            in a language model.
        """
        self.check_genotype(genotype, language_model=num_classes is None)
        return self._model(self._stack(genotype, num_classes is None), ntoken, num_classes)

    # -- one-shot ---------------------------------------------------------------------------------------------
    @property
    def alpha_shape(self):
        """(max_layers, cells + identity); default (4, 5)."""
        return (self.cfg.max_layers, len(self.ops))

    @property
    def alpha_rows(self) -> list:
        """What α's rows are, for the TensorBoard heatmap: ``layer 1`` .. ``layer L``."""
        return [f"layer {i}" for i in range(1, self.cfg.max_layers + 1)]

    def check_one_shot(self) -> None:
        """Raise ConfigError (one line) unless a one-shot strategy can search this config: one ``units`` choice,
        equal to ``nhid``, and ``emsize == nhid`` (an identity first layer passes the embedding on)."""
        c = self.cfg
        if list(self.units) != [c.nhid]:
            raise ConfigError(f"space=stacked_rnn: one-shot strategies (darts, gdas, random_ws) search cell and depth at the "
                              f"fixed width space.nhid={c.nhid}, not units (space.units={list(self.units)}): set "
                              f"space.units=[{c.nhid}], or search units with strategy=random or strategy=bayesian")
        if c.emsize != c.nhid:
            raise ConfigError(f"space=stacked_rnn: the one-shot supernet needs space.emsize == space.nhid (an identity "
                              f"layer passes the embedding on), got {c.emsize} and {c.nhid}")

    def _one_shot_params(self, op: str) -> dict:
        d = self.dropouts[0]
        return {"dropout": d} if op == IDENTITY else {"units": self.cfg.nhid, "dropout": d, "bidirectional": False}

    def build_supernet(self, ntoken: int, num_classes: Optional[int] = None) -> nn.Module:
        """The supernet: ``max_layers`` layers at width ``nhid``, each a mixed op of every cell and identity (outputs
        mixed by the layer's row of weights [max_layers, K]; a weight of exactly 0 skips its candidate), dropout the
        first of ``dropouts``, unidirectional.  The language model's hidden state packs every candidate's state.

        Raises: ConfigError from :meth:`check_one_shot`.
        """
        self.check_one_shot()
        c = self.cfg
        layers = [StackLayer(self.ops, c.nhid, c.nhid, self.dropouts[0]) for _ in range(c.max_layers)]
        return self._model(Stack(layers, c.emsize, num_classes is None), ntoken, num_classes)

    def op_params(self, model: nn.Module) -> torch.Tensor:
        """The parameters of each candidate cell of each layer of the supernet ``model``, [max_layers, K] (float64;
        identity 0; ``strategy.param_penalty``): what the cell adds to a derived stack that keeps that layer."""
        stack = next(m for m in model.modules() if isinstance(m, Stack))
        out = torch.zeros(self.alpha_shape, dtype=torch.float64)
        for i, layer in enumerate(stack.layers):
            for k, op in enumerate(layer.ops):
                if op in layer.cells:
                    out[i, k] = sum(p.numel() for p in layer.cells[op].parameters())
        return out

    def derive(self, alphas: torch.Tensor) -> Genotype:
        """Per layer the op of the largest α (ties: the earlier op); an ``identity`` layer stays in the chain.
        With ``space.max_parameter_free`` at most that many identity layers (:func:`nas.genotype.cap_parameter_free`).
        The params are the supernet's: units ``nhid``, the first dropout, unidirectional.

        Raises: GenotypeError if α's shape is not :attr:`alpha_shape`.
        """
        if tuple(alphas.shape) != self.alpha_shape:
            raise GenotypeError(f"alphas of shape {tuple(alphas.shape)} do not fit stacked_rnn's {self.alpha_shape}")
        columns = alphas.detach().argmax(dim=1).tolist()
        if self.cfg.max_parameter_free is not None:
            probs = torch.softmax(alphas.detach().double().cpu(), dim=-1)
            columns = cap_parameter_free(list(enumerate(columns)), probs, self.ops, self.cfg.max_parameter_free)
        ops = [self.ops[k] for k in columns]
        return self._chain(ops, [self._one_shot_params(o) for o in ops])

    def decision_margins(self, alphas: torch.Tensor) -> list:
        """Per layer, the lead in softmax weight of its derived op over the layer's best other op -- with
        ``space.max_parameter_free``, a layer the cap turned into a cell leads the layer's other cells:
        ``[("layer i", lead)]``."""
        probs = torch.softmax(alphas.detach().double().cpu(), dim=-1)
        chosen = [n[0].op for n in self.derive(alphas).nodes]
        out = []
        for i, op in enumerate(chosen, 1):
            c, capped = self.ops.index(op), op != self.ops[probs[i - 1].argmax().item()]
            rivals = [k for k, name in enumerate(self.ops) if k != c and not (capped and name == IDENTITY)]
            out.append((f"layer {i}", (probs[i - 1, c] - max(probs[i - 1, k] for k in rivals)).item()))
        return out

    def path_weights(self, genotype: Genotype, dtype=None, device=None) -> torch.Tensor:
        """The supernet's layer weights [max_layers, K] computing exactly ``genotype`` (one-hot per layer; layers
        beyond its depth are identity).  Raises GenotypeError for a deeper genotype or an op not in :attr:`ops`."""
        if genotype.steps > self.cfg.max_layers:
            raise GenotypeError(f"genotype has {genotype.steps} layers, the supernet {self.cfg.max_layers}")
        w = torch.zeros(self.alpha_shape, dtype=dtype, device=device)
        for i in range(self.cfg.max_layers):
            op = genotype.nodes[i][0].op if i < genotype.steps else IDENTITY
            if op not in self.ops:
                raise GenotypeError(f"op {op!r} is not one of {list(self.ops)}")
            w[i, self.ops.index(op)] = 1.0
        return w

    def one_shot_decisions(self) -> list:
        """What random_ws draws a supernet path from: ``depth`` (1..max_layers) and per layer ``cell_i`` (the cells);
        layers beyond the depth are identity in :meth:`path_weights`."""
        out = [("depth", tuple(range(1, self.cfg.max_layers + 1)))]
        return out + [(f"cell_{i}", self.cells) for i in range(1, self.cfg.max_layers + 1)]

    def from_one_shot_decisions(self, choice: dict) -> Genotype:
        """The chain of ``depth`` cells of one combination of :meth:`one_shot_decisions`, with the supernet's
        params.  Raises GenotypeError for a missing or invalid decision."""
        _check_choice(choice, self.one_shot_decisions())
        ops = [choice[f"cell_{i}"] for i in range(1, int(choice["depth"]) + 1)]
        return self._chain(ops, [self._one_shot_params(o) for o in ops])

    def _chain(self, ops, params) -> Genotype:
        nodes = tuple((Edge(op, i),) for i, op in enumerate(ops))
        return Genotype(space=self.name, ops=self.ops, nodes=nodes, concat=(len(ops),), params=params)

    # -- black-box --------------------------------------------------------------------------------------------
    def _layer_decisions(self, i: int) -> list:
        out = [(f"cell_{i}", self.cells), (f"units_{i}", self.units), (f"dropout_{i}", self.dropouts)]
        if len(set(self.directions)) > 1:
            out.append((f"bidirectional_{i}", self.directions))
        return out

    def decisions(self) -> list:
        """``[(name, choices)]``, every decision that can be active: ``depth`` (1..max_layers) first, then per layer
        i ``cell_i``, ``units_i``, ``dropout_i`` and, when ``space.bidirectional`` has two choices,
        ``bidirectional_i``.  The decisions are conditional: layer i's are active only when ``depth >= i``, and the
        black-box strategies draw them define-by-run (:meth:`sample_decisions`)."""
        out = [("depth", tuple(range(1, self.cfg.max_layers + 1)))]
        for i in range(1, self.cfg.max_layers + 1):
            out += self._layer_decisions(i)
        return out

    def sample_decisions(self, suggest) -> dict:
        """One define-by-run draw (the protocol of :func:`nas.genotype.sample_decisions`): ``suggest("depth",
        1..max_layers)``, then ``suggest(name, choices)`` for the decisions of layers 1..depth only, so a trial holds
        no parameter of a layer that does not exist and one genotype is one set of answers (Optuna's conditional
        search spaces: https://optuna.readthedocs.io/en/stable/tutorial/10_key_features/002_configurations.html).
        Returns ``{name: answer}`` of the decisions asked."""
        choice = {"depth": suggest("depth", tuple(range(1, self.cfg.max_layers + 1)))}
        for i in range(1, int(choice["depth"]) + 1):
            for name, choices in self._layer_decisions(i):
                choice[name] = suggest(name, choices)
        return choice

    def from_decisions(self, choice: dict) -> Genotype:
        """The genotype of one draw of :meth:`sample_decisions` (layers 1..depth; decisions of deeper layers, if
        given, are ignored).

        Raises: GenotypeError for a missing active decision or a value that is not one of its choices."""
        _check_choice(choice, self.decisions()[:1])
        depth = int(choice["depth"])
        for i in range(1, depth + 1):
            _check_choice(choice, self._layer_decisions(i))
        ops = [choice[f"cell_{i}"] for i in range(1, depth + 1)]
        params = [{"units": int(choice[f"units_{i}"]), "dropout": float(choice[f"dropout_{i}"]),
                   "bidirectional": bool(choice.get(f"bidirectional_{i}", self.directions[0]))}
                  for i in range(1, depth + 1)]
        return self._chain(ops, params)

    def genotype_count(self) -> int:
        """Distinct genotypes :meth:`sample_decisions` draws (each once): Σ_{d=1..max_layers} (cells x units x
        dropouts x directions)^d."""
        per_layer = len(self.cells) * len(self.units) * len(self.dropouts) * len(set(self.directions))
        return sum(per_layer ** d for d in range(1, self.cfg.max_layers + 1))


def _check_choice(choice: dict, decisions) -> None:
    """Raise GenotypeError unless ``choice`` holds one of its choices for every decision."""
    for name, choices in decisions:
        if name not in choice:
            raise GenotypeError(f"decision {name!r} is missing")
        if choice[name] not in choices:
            raise GenotypeError(f"decision {name}={choice[name]!r} is not one of {list(choices)}")
