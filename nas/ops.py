"""Candidate operations, by name.

DARTS recurrent-cell ops (Liu et al. 2019, sec. 2.1 and appendix A.1.2): an edge from state ``s`` computes
``[c; h] = s W``, then ``s + sigmoid(c) * (f(h) - s)`` (a highway-style gate), and the op name picks the
activation ``f``.  One signature for all of them: ``f(h: Tensor[..., H]) -> Tensor[..., H]``.  The name
``none`` (or ``zero``) means the edge contributes nothing; it has no activation and is handled by name,
never by position in the op list.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from nas.genotype import ZERO_OPS
from nas.errors import ConfigError

Activation = Callable[[torch.Tensor], torch.Tensor]

#: DARTS recurrent-cell activations, ``name -> f`` (shape preserving, elementwise).
CELL_ACTIVATIONS: Dict[str, Activation] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda h: h,
}

#: the DARTS paper's recurrent op list; ``none`` first as in the paper, but nothing depends on that.
DARTS_RNN_OPS = ("none", "tanh", "relu", "sigmoid", "identity")


def cell_activation(name: str) -> Optional[Activation]:
    """The activation for a DARTS cell op name; ``None`` for a zero op.

    Raises:
        KeyError: listing the valid names, if ``name`` is unknown.
    """
    if name in ZERO_OPS:
        return None
    try:
        return CELL_ACTIVATIONS[name]
    except KeyError:
        valid = sorted(CELL_ACTIVATIONS) + sorted(ZERO_OPS)
        raise KeyError(f"unknown recurrent-cell op {name!r}; valid ops: {', '.join(valid)}") from None


def check_cell_ops(ops: Sequence[str]) -> None:
    """Validate a DARTS cell op list (known names, no duplicates, at least one non-zero op).

    Raises:
        ValueError: describing the problem.
    """
    if len(set(ops)) != len(ops):
        raise ConfigError(f"duplicate op names in {list(ops)}")
    for name in ops:
        try:
            cell_activation(name)
        except KeyError as err:
            raise ConfigError(err.args[0]) from None
    if all(name in ZERO_OPS for name in ops):
        raise ConfigError(f"op list {list(ops)} has no non-zero op")
