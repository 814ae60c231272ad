"""Genotypes: the discrete architecture a search returns, as a small frozen value stored as JSON.

A genotype names its search space, the candidate op list of that space, and for every intermediate
node the incoming edges it keeps as ``(op name, input node)`` pairs.  Ops are stored by *name*, never
by index, so a genotype file stays valid when an op list is reordered.  Node numbering follows DARTS
(Liu et al. 2019, sec. 2.1): node 0 is the cell's initial state and intermediate node ``i`` (1-based)
may take inputs from nodes ``0 .. i-1``; ``concat`` lists the nodes averaged into the cell output.

``derive`` turns architecture parameters α into a genotype the DARTS way (sec. 2.4): per node, keep the
``k`` predecessors whose strongest non-zero op has the largest *softmax* weight, each with that op.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple

import torch

from nas.atomic import atomic_write_text

#: op names that mean "no edge"; they are never part of a derived genotype.
ZERO_OPS = frozenset({"none", "zero"})
#: ops the cap ``space.max_parameter_free`` counts (:func:`cap_parameter_free`): ``identity``, the op a collapsing
#: DARTS search drifts to (Zela et al., ICLR 2020, sec. 3; the recurrent counterpart of the CNN cell's skip_connect).
#: In stacked_rnn and hybrid it has no parameters; in the DARTS recurrent cell every op, identity too, follows its
#: node's matrix W_i, and identity is the op that adds no nonlinearity (the zero ops are never derived).
PARAMETER_FREE_OPS = frozenset({"identity"})


class GenotypeError(ValueError):
    """A genotype (or genotype file) is malformed or does not fit the space it is used with."""


@dataclass(frozen=True)
class Edge:
    """One kept edge: ``op`` applied to the state of node ``input``."""

    op: str
    input: int


@dataclass(frozen=True)
class Genotype:
    """A discrete architecture.

    Attributes:
        space: name of the search space it belongs to (``"darts_rnn"``, ``"hybrid"``).
        ops: the space's candidate op names, in the order of the α columns during search.
        nodes: ``nodes[i-1]`` holds the incoming edges of intermediate node ``i``.
        concat: indices of the nodes whose mean (or combination) forms the cell output.
        k: the edges-per-node budget it was derived with (a node i keeps ``min(k, i)`` edges), or None when
            the genotype does not record one (published genotypes); stored in the JSON when set.
        task, dataset: where it was searched (``language_modeling`` on ``ptb``, ``classification`` on ``sst2``...),
            or None when not recorded (published genotypes, files written before these fields); stored in the JSON
            when set.  They describe the genotype's origin, not the architecture: two genotypes that differ only
            there are equal.  ``train.py arch=`` takes the dataset from them (:mod:`nas.cli`).
        params: per intermediate node, its hyperparameters as sorted ``(key, value)`` pairs (values JSON scalars:
            bool, int, float, str or None), or None for the DAG spaces, whose nodes have none.  The stacked_rnn
            space records a layer's ``units``, ``dropout`` and ``bidirectional`` here.  Part of the architecture
            (equality, hash, :meth:`key`); stored in the JSON as a list of objects when set.

    Raises:
        GenotypeError: on construction, if an op is unknown or zero, an input is not an earlier node,
            a node has no edge, ``concat`` names a node that does not exist, a node keeps more than
            ``k`` edges or the same input twice, or ``params`` does not hold one mapping of names to JSON scalars
            per node.
    """

    space: str
    ops: Tuple[str, ...]
    nodes: Tuple[Tuple[Edge, ...], ...]
    concat: Tuple[int, ...]
    k: Optional[int] = None
    task: Optional[str] = field(default=None, compare=False)
    dataset: Optional[str] = field(default=None, compare=False)
    params: Optional[Tuple[Tuple[Tuple[str, object], ...], ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.params is not None:
            object.__setattr__(self, "params", _normalize_params(self.params))
        object.__setattr__(self, "nodes", tuple(tuple(Edge(*e) if not isinstance(e, Edge) else e
                                                      for e in node) for node in self.nodes))
        object.__setattr__(self, "concat", tuple(int(c) for c in self.concat))
        self.validate()

    @property
    def steps(self) -> int:
        """Number of intermediate nodes."""
        return len(self.nodes)

    def validate(self) -> None:
        """Check internal consistency (see class docstring). Raises GenotypeError."""
        if not self.space or not isinstance(self.space, str):
            raise GenotypeError("genotype has no 'space' name")
        if len(set(self.ops)) != len(self.ops):
            raise GenotypeError(f"duplicate op names in {list(self.ops)}")
        if not self.nodes:
            raise GenotypeError("genotype has no nodes")
        for i, node in enumerate(self.nodes, start=1):
            if not node:
                raise GenotypeError(f"node {i} has no incoming edge")
            for edge in node:
                if edge.op not in self.ops:
                    raise GenotypeError(
                        f"node {i}: unknown op {edge.op!r}; this space's ops are {list(self.ops)}")
                if edge.op in ZERO_OPS:
                    raise GenotypeError(f"node {i}: a genotype never keeps a {edge.op!r} edge")
                if not isinstance(edge.input, int) or not 0 <= edge.input < i:
                    raise GenotypeError(
                        f"node {i}: input {edge.input!r} is not an earlier node (0..{i - 1})")
            if len({e.input for e in node}) != len(node):
                raise GenotypeError(f"node {i}: the same input node appears twice")
        if self.k is not None:
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise GenotypeError(f"k must be a positive integer, got {self.k!r}")
            over = [i for i, node in enumerate(self.nodes, start=1) if len(node) > self.k]
            if over:
                raise GenotypeError(f"node(s) {over} keep more than k={self.k} edges")
        if not self.concat or any(not 0 <= c <= self.steps for c in self.concat):
            raise GenotypeError(f"concat {list(self.concat)} must name nodes 0..{self.steps}")
        if self.params is not None and len(self.params) != self.steps:
            raise GenotypeError(f"params has {len(self.params)} entries for {self.steps} nodes (one per node)")

    def node_params(self, i: int) -> dict:
        """The hyperparameters of intermediate node ``i`` (1-based) as a dict; {} when the genotype has none."""
        return {} if self.params is None else dict(self.params[i - 1])

    # -- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict: ``{"space", "ops", "nodes": [[{"op", "input"}, ...], ...], "concat"}`` (and
        ``"k"``, ``"task"``, ``"dataset"``, ``"params": [{name: value}, ...]`` when set)."""
        d = {
            "space": self.space,
            "ops": list(self.ops),
            "nodes": [[{"op": e.op, "input": e.input} for e in node] for node in self.nodes],
            "concat": list(self.concat),
        }
        if self.k is not None:
            d["k"] = self.k
        for key in ("task", "dataset"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.params is not None:
            d["params"] = [dict(p) for p in self.params]
        return d

    def key(self) -> str:
        """The architecture as a string, without the origin (``task``, ``dataset``): equal for equal genotypes, so
        strategies use it to recognise a genotype already tried (``hash`` is not stable across processes)."""
        return json.dumps(self.with_origin(None, None).to_dict(), sort_keys=True)

    def with_origin(self, task: Optional[str], dataset: Optional[str]) -> "Genotype":
        """The same genotype recording the task and dataset it was searched for."""
        return replace(self, task=task, dataset=dataset)

    @classmethod
    def from_dict(cls, d: dict, where: str = "genotype") -> "Genotype":
        """Inverse of :meth:`to_dict`. Raises GenotypeError naming ``where`` on any malformed field."""
        if not isinstance(d, dict):
            raise GenotypeError(f"{where}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("space", "ops", "nodes", "concat") if k not in d]
        if missing:
            raise GenotypeError(f"{where}: missing field(s) {missing}")
        try:
            nodes = tuple(tuple(Edge(str(e["op"]), _as_int(e["input"])) for e in node)
                          for node in d["nodes"])
            return cls(space=str(d["space"]), ops=tuple(str(o) for o in d["ops"]), nodes=nodes,
                       concat=tuple(_as_int(c) for c in d["concat"]),
                       k=_as_int(d["k"]) if d.get("k") is not None else None,
                       task=_name(d, "task"), dataset=_name(d, "dataset"),
                       params=_params_field(d.get("params")))
        except GenotypeError as err:
            raise GenotypeError(f"{where}: {err}") from None
        except (KeyError, TypeError, ValueError) as err:
            raise GenotypeError(f"{where}: malformed nodes/concat ({err!r})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "genotype") -> "Genotype":
        """Parse JSON text. Raises GenotypeError if it is not JSON or not a valid genotype."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise GenotypeError(f"{where} is not valid JSON: {err}") from None
        return cls.from_dict(d, where)

    def save(self, path: str) -> None:
        """Write the JSON atomically (temporary file in the same folder, then rename)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "Genotype":
        """Read a genotype file. Raises GenotypeError (unreadable, not JSON, invalid)."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise GenotypeError(f"cannot read genotype file {path}: {err}") from None
        return cls.from_json(text, where=f"genotype file {path}")

    def __str__(self) -> str:
        nodes = "; ".join(f"{i}<-" + ",".join(f"{e.op}({e.input})" for e in node) + _params_text(self.node_params(i))
                          for i, node in enumerate(self.nodes, start=1))
        return f"{self.space}[{nodes}] concat={list(self.concat)}"


_SCALARS = (bool, int, float, str, type(None))


def _normalize_params(params) -> tuple:
    """``params`` (per node a mapping or a sequence of ``(key, value)`` pairs) as per node a tuple of pairs sorted
    by key. Raises GenotypeError for anything else, or a value that is not a finite JSON scalar."""
    if isinstance(params, (str, bytes, dict)) or not isinstance(params, (list, tuple)):
        raise GenotypeError(f"params must be a list with one mapping per node, got {type(params).__name__}")
    out = []
    for i, node in enumerate(params, start=1):
        try:
            pairs = dict(node.items() if isinstance(node, dict) else node)
        except (TypeError, ValueError):
            raise GenotypeError(f"params of node {i}: expected a mapping of names to values, got {node!r}") from None
        for key, value in pairs.items():
            if not isinstance(key, str) or not key:
                raise GenotypeError(f"params of node {i}: key {key!r} is not a name")
            if not isinstance(value, _SCALARS) or (isinstance(value, float) and not math.isfinite(value)):
                raise GenotypeError(f"params of node {i}: {key}={value!r} is not a finite JSON scalar")
        out.append(tuple(sorted(pairs.items())))
    return tuple(out)


def _params_field(value):
    """The JSON ``params`` field: None (absent) or a list of objects (checked by :func:`_normalize_params`)."""
    if value is not None and (not isinstance(value, list) or not all(isinstance(p, dict) for p in value)):
        raise GenotypeError(f"'params' must be a list of objects (one per node), got {value!r}")
    return value


def _params_text(params: dict) -> str:
    return "{" + ",".join(f"{k}={v}" for k, v in params.items()) + "}" if params else ""


def _name(d: dict, key: str) -> Optional[str]:
    value = d.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise GenotypeError(f"'{key}' must be a name, got {value!r}")
    return value


def _as_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise ValueError(f"expected an integer node index, got {x!r}")
    return x


def edge_count(steps: int) -> int:
    """Number of mixed edges in a DAG with ``steps`` intermediate nodes: node i has i inputs."""
    return steps * (steps + 1) // 2


def derive(alphas: torch.Tensor, ops: Sequence[str], space: str, k: int = 1,
           concat: Iterable[int] | None = None, max_parameter_free: Optional[int] = None) -> Genotype:
    """Discretize architecture parameters into a genotype (DARTS, Liu et al. 2019, sec. 2.4).

    For each intermediate node ``i`` (1..steps), with edges from nodes ``0..i-1`` stored in
    consecutive α rows: take the row-wise softmax, score each predecessor by its largest weight over
    the non-zero ops, keep the ``k`` best predecessors (ties: lower node index), each with its
    strongest non-zero op (ties: earlier op).  Softmax, not raw logits, decides between predecessors,
    and adding a constant to a row changes nothing.  With ``max_parameter_free`` the kept edges then go through
    :func:`cap_parameter_free` (the predecessors stay; surplus ``identity`` ops give way to the edge's best other op).

    Args:
        alphas: [E, K] architecture logits, ``E = steps*(steps+1)/2`` edges in node order.
        ops: the K op names (columns of α).
        space: space name recorded in the genotype.
        k: edges kept per node (DARTS RNN: 1; capped at the node's number of inputs).
        concat: output nodes; default ``1..steps`` (all intermediate nodes, as DARTS RNN).
        max_parameter_free: at most this many kept edges with an op of :data:`PARAMETER_FREE_OPS` (None: no cap).

    Returns:
        the derived :class:`Genotype` (it never contains a zero op).

    Raises:
        GenotypeError: if α's shape does not match ``ops`` / a triangular edge count, or every op is zero, or the
        cap cannot hold (no other non-zero op).
    """
    full, picks = _dag_picks(alphas, ops, k)
    columns = [p.column for p in picks]
    if max_parameter_free is not None:
        columns = cap_parameter_free([(p.row, p.column) for p in picks], full, ops, max_parameter_free)
    steps = steps_for_edges(alphas.size(0))
    nodes = [[] for _ in range(steps)]
    for p, c in zip(picks, columns):
        nodes[p.node - 1].append(Edge(ops[c], p.input))
    return Genotype(space=space, ops=tuple(ops), nodes=tuple(tuple(n) for n in nodes),
                    concat=tuple(concat) if concat is not None else tuple(range(1, steps + 1)), k=k)


class _Pick(NamedTuple):
    """One edge :func:`derive` keeps: node ``node`` takes ``input`` with the op of α column ``column`` (α row
    ``row``); ``lead``: that choice's softmax weight minus its best alternative's (:func:`dag_margins`)."""

    node: int
    input: int
    row: int
    column: int
    lead: float


def _dag_picks(alphas: torch.Tensor, ops: Sequence[str], k: int) -> tuple:
    """DARTS's selection (:func:`derive`, uncapped) with each kept edge's lead: ``(softmax(α) [E, K] float64, [_Pick]
    in node order)``.  Raises GenotypeError as :func:`derive`."""
    if alphas.dim() != 2 or alphas.size(1) != len(ops):
        raise GenotypeError(f"alphas of shape {tuple(alphas.shape)} do not fit {len(ops)} ops {list(ops)}")
    keep = [j for j, name in enumerate(ops) if name not in ZERO_OPS]
    if not keep:
        raise GenotypeError(f"op list {list(ops)} has no non-zero op")
    steps = steps_for_edges(alphas.size(0))
    full = torch.softmax(alphas.detach().double().cpu(), dim=-1)
    probs = full[:, keep]  # [E, K']
    picks, offset = [], 0
    for i in range(1, steps + 1):
        w = probs[offset:offset + i]  # [i, K'] rows = predecessors 0..i-1
        best_w, best_k = w.max(dim=1)  # max returns the first maximal index on ties
        second = w.topk(2, dim=1).values[:, 1] if w.size(1) > 1 else torch.zeros(i, dtype=w.dtype)
        order = sorted(range(i), key=lambda j: (-best_w[j].item(), j))
        kept, dropped = order[:min(k, i)], order[min(k, i):]
        rival = max((best_w[j].item() for j in dropped), default=0.0)  # the best predecessor the node drops
        picks += [_Pick(i, j, offset + j, keep[best_k[j].item()],
                        best_w[j].item() - max(rival, second[j].item())) for j in sorted(kept)]
        offset += i
    return full, picks


def cap_parameter_free(picks: Sequence[Tuple[int, int]], probs: torch.Tensor, ops: Sequence[str],
                       cap: int) -> list:
    """Hold a derived genotype to at most ``cap`` ops of :data:`PARAMETER_FREE_OPS` (``space.max_parameter_free``).

    The rule of P-DARTS (Chen et al., ICCV 2019, sec. 3.3, "search space regularization", which keeps the M skip
    connections of largest weight): the ``cap`` parameter-free picks of largest softmax weight stay (ties: the
    earlier pick); each other one takes the best allowed op of its own α row instead -- the largest softmax weight
    among the non-zero ops that are not parameter-free (ties: the earlier op).  The picked edges (a DAG node's
    predecessors, a stack's layers) stay where they are.

    Args:
        picks: ``(α row, α column)`` of each pick, in genotype order.
        probs: softmax(α) [E, K].
        ops: the K op names.
        cap: the most parameter-free picks allowed (>= 0).
    Returns:
        the picks' α columns after the cap, in the same order.
    Raises:
        GenotypeError: a negative cap, or a surplus pick with no allowed op to take instead.
    """
    if cap < 0:
        raise GenotypeError(f"space.max_parameter_free must be >= 0 (null: no cap), got {cap}")
    columns = [c for _, c in picks]
    free = [n for n, (_, c) in enumerate(picks) if ops[c] in PARAMETER_FREE_OPS]
    if len(free) <= cap:
        return columns
    allowed = [c for c, name in enumerate(ops) if name not in ZERO_OPS and name not in PARAMETER_FREE_OPS]
    if not allowed:
        raise GenotypeError(f"space.max_parameter_free={cap}: op list {list(ops)} has no other non-zero op to take "
                            "the place of the surplus parameter-free ones")
    ranked = sorted(free, key=lambda n: (-probs[picks[n][0], picks[n][1]].item(), n))
    for n in ranked[cap:]:
        row = probs[picks[n][0]]
        columns[n] = max(allowed, key=lambda c: (row[c].item(), -c))
    return columns


def dag_margins(alphas: torch.Tensor, ops: Sequence[str], k: int = 1,
                max_parameter_free: Optional[int] = None) -> list:
    """How decided each node's choice is under :func:`derive`: per node ``i``, the smallest lead in softmax weight
    of a kept edge's op over the best alternative to it -- the second-best non-zero op of the same edge, or the best
    non-zero op of a predecessor the node drops.  With ``max_parameter_free``, an edge whose op the cap replaced
    (:func:`cap_parameter_free`) chose among the edge's allowed ops: its lead is over the best other allowed op of
    that edge.  A lead below a few hundredths means the choice can flip with noise (u01 item 10).

    Args: as :func:`derive`.  Returns: ``[(node, lead)]``, nodes 1..steps, leads in [0, 1].
    Raises: GenotypeError as :func:`derive`.
    """
    full, picks = _dag_picks(alphas, ops, k)
    leads = [p.lead for p in picks]
    if max_parameter_free is not None:
        allowed = [c for c, name in enumerate(ops) if name not in ZERO_OPS and name not in PARAMETER_FREE_OPS]
        capped = cap_parameter_free([(p.row, p.column) for p in picks], full, ops, max_parameter_free)
        for n, (p, after) in enumerate(zip(picks, capped)):
            if after != p.column:  # chosen by the cap among the allowed ops of its edge
                others = [full[p.row, c].item() for c in allowed if c != after]
                leads[n] = full[p.row, after].item() - max(others, default=0.0)
    out = {}
    for p, lead in zip(picks, leads):
        out[p.node] = min(out.get(p.node, lead), lead)
    return sorted(out.items())


def steps_for_edges(num_edges: int) -> int:
    """Inverse of :func:`edge_count`: N with N(N+1)/2 == num_edges. Raises GenotypeError otherwise."""
    steps = int(round(((8 * num_edges + 1) ** 0.5 - 1) / 2))
    if edge_count(steps) != num_edges:
        raise GenotypeError(f"{num_edges} α rows is not a triangular edge count n(n+1)/2")
    return steps


# -- a genotype as independent categorical decisions (random search, Bayesian optimization) -------------------

def dag_decisions(steps: int, ops: Sequence[str], k: int = 1) -> list:
    """The categorical decisions that pick one genotype of a DAG space, as ``[(name, choices), ...]``.

    Node ``i`` (1..steps) keeps ``m = min(k, i)`` of its ``i`` inputs: ``node{i}_inputs`` chooses the set (a
    string ``"0,2"``; absent when every input is kept), and ``node{i}_op{p}`` the op of its p-th kept input
    (non-zero ops only).  Every combination of choices is a distinct genotype and every genotype is one
    combination, so choosing each decision uniformly draws a genotype uniformly from the space, and their
    number is the product of the choice counts (:func:`genotype_count`).  Choices are strings, so any
    black-box optimizer's categorical parameters can hold them.
    Raises:
        GenotypeError: if ``ops`` has no non-zero op or ``k`` < 1.
    """
    from itertools import combinations

    active = tuple(o for o in ops if o not in ZERO_OPS)
    if not active:
        raise GenotypeError(f"op list {list(ops)} has no non-zero op")
    if k < 1:
        raise GenotypeError(f"k must be >= 1, got {k}")
    out = []
    for i in range(1, steps + 1):
        m = min(k, i)
        if m < i:
            out.append((f"node{i}_inputs", tuple(",".join(map(str, c)) for c in combinations(range(i), m))))
        out.extend((f"node{i}_op{p}", active) for p in range(m))
    return out


def genotype_from_decisions(choice: dict, space: str, ops: Sequence[str], steps: int, k: int = 1,
                            concat: Iterable[int] | None = None) -> Genotype:
    """The genotype of one combination of :func:`dag_decisions` (``choice``: name -> chosen value).

    Raises:
        GenotypeError: a decision is missing or holds a value that is not one of its choices.
    """
    decisions = dict(dag_decisions(steps, ops, k))
    for name, choices in decisions.items():
        if name not in choice:
            raise GenotypeError(f"decision {name!r} is missing")
        if choice[name] not in choices:
            raise GenotypeError(f"decision {name}={choice[name]!r} is not one of {list(choices)}")
    nodes = []
    for i in range(1, steps + 1):
        m = min(k, i)
        inputs = [int(j) for j in choice[f"node{i}_inputs"].split(",")] if m < i else list(range(i))
        nodes.append(tuple(Edge(choice[f"node{i}_op{p}"], j) for p, j in enumerate(inputs)))
    return Genotype(space=space, ops=tuple(ops), nodes=tuple(nodes),
                    concat=tuple(concat) if concat is not None else tuple(range(1, steps + 1)), k=k)


def genotype_decisions(genotype: Genotype) -> dict:
    """Inverse of :func:`genotype_from_decisions`: the decisions a genotype (with ``k`` set) was made of."""
    k = genotype.k if genotype.k is not None else max(len(n) for n in genotype.nodes)
    choice = {}
    for i, node in enumerate(genotype.nodes, start=1):
        edges = sorted(node, key=lambda e: e.input)
        if min(k, i) < i:
            choice[f"node{i}_inputs"] = ",".join(str(e.input) for e in edges)
        for p, e in enumerate(edges):
            choice[f"node{i}_op{p}"] = e.op
    return choice


def genotype_count(decisions) -> int:
    """How many genotypes a list of decisions spans: the product of their choice counts."""
    n = 1
    for _, choices in decisions:
        n *= len(choices)
    return n


def path_weights(genotype: Genotype, ops: Sequence[str], dtype=None, device=None) -> torch.Tensor:
    """The supernet edge weights [E, K] under which it computes exactly ``genotype``: 1 at the kept op of every
    kept edge, 0 elsewhere (a single-path sample, as random search with weight sharing trains; Li & Talwalkar
    2019, sec. 4).  Row ``i(i-1)/2 + j`` is the edge j -> i, as in α.

    Raises:
        GenotypeError: if the genotype names an op that is not in ``ops``.
    """
    ops = list(ops)
    w = torch.zeros(edge_count(genotype.steps), len(ops), dtype=dtype, device=device)
    for i, node in enumerate(genotype.nodes, start=1):
        for e in node:
            if e.op not in ops:
                raise GenotypeError(f"op {e.op!r} is not one of {ops}")
            w[i * (i - 1) // 2 + e.input, ops.index(e.op)] = 1.0
    return w


# -- the decision protocol of the black-box strategies ------------------------------------------------------------
# A space's decisions are drawn define-by-run (Optuna's term: the search space is built while a trial runs, so a
# decision can depend on earlier ones; https://optuna.readthedocs.io/en/stable/tutorial/10_key_features/
# 002_configurations.html, "Pythonic Search Space": branches and loops).  A space with conditional decisions
# defines ``sample_decisions(suggest) -> dict``: it calls ``suggest(name, choices)`` for each decision that is
# active given the answers so far, in order, and returns ``{name: answer}`` of exactly those (stacked_rnn: ``depth``,
# then the decisions of layers 1..depth only).  A space without it (the DAG spaces) has independent decisions:
# every one of ``space.decisions()`` is asked.  ``space.from_decisions`` takes what ``sample_decisions`` returned.


def sample_decisions(space, suggest) -> dict:
    """The active decisions of one draw: ``suggest(name, choices)`` is called for each, in order (an Optuna trial's
    ``suggest_categorical``, a uniform draw, a replay of recorded params).  Returns ``{name: value}`` of exactly the
    decisions asked."""
    if hasattr(space, "sample_decisions"):
        return space.sample_decisions(suggest)
    return {name: suggest(name, choices) for name, choices in space.decisions()}


def active_decisions(space, params: dict) -> Optional[dict]:
    """``params`` (e.g. an Optuna trial's) replayed through :func:`sample_decisions`: the active decisions they hold,
    or None when one is missing or not one of its choices (a trial whose params are incomplete)."""
    def suggest(name, choices):
        if name not in params or params[name] not in choices:
            raise KeyError(name)
        return params[name]

    try:
        return sample_decisions(space, suggest)
    except KeyError:
        return None


def enumerate_decisions(space):
    """Every combination of active decisions once (each one genotype), by depth-first replay of
    :func:`sample_decisions`: an odometer over the answers, whose later digits are the decisions the earlier
    answers activate."""
    path: list = []  # per decision asked in the current draw: [index, number of choices]
    while True:
        depth = [0]

        def suggest(name, choices):
            i = depth[0]
            if i == len(path):
                path.append([0, len(choices)])
            depth[0] += 1
            return choices[path[i][0]]

        yield sample_decisions(space, suggest)
        del path[depth[0]:]
        while path and path[-1][0] + 1 == path[-1][1]:
            path.pop()
        if not path:
            return
        path[-1][0] += 1


def space_genotype_count(space) -> int:
    """How many genotypes a space's black-box decisions span: ``space.genotype_count()`` when it counts them itself
    (conditional decisions), else the product of the choice counts (:func:`genotype_count`)."""
    return space.genotype_count() if hasattr(space, "genotype_count") else genotype_count(space.decisions())
