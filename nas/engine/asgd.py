"""Non-monotonically triggered averaged SGD (NT-ASGD; Merity et al. 2018, AWD-LSTM sec. 3), as DARTS retrains.

Training starts with plain SGD.  After every validation pass, if the validation loss is worse than the best
of all but the last ``nonmono`` previous passes, the optimizer is replaced by averaged SGD
(``torch.optim.ASGD`` with ``t0=0, lambd=0``: same steps as SGD, plus a running mean of the iterates in
``state[p]["ax"]``).  From then on the model is *evaluated* (and checkpointed) with the averaged weights;
training continues on the raw ones.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

#: ``train.py optimizer=``: NT-ASGD, plain SGD, ASGD from the start, or Adam (Kingma & Ba 2015; the
#: sentence classifiers, which plain SGD trains slowly)
OPTIMIZERS = ("ntasgd", "sgd", "asgd", "adam")
#: ``search.py optimizer=`` (the weights' optimizer during search)
SEARCH_OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, params: Iterable[nn.Parameter], lr: float, weight_decay: float):
    """The optimizer a run starts with: ASGD for ``asgd``, Adam for ``adam``, else plain SGD (``ntasgd`` starts
    as SGD and switches later).  Raises ValueError for an unknown name."""
    if name == "asgd":
        return make_asgd(params, lr, weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name in ("sgd", "ntasgd"):
        return make_sgd(params, lr, weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def make_sgd(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.SGD:
    """Plain SGD without momentum (the first phase of NT-ASGD)."""
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def make_asgd(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.ASGD:
    """Averaged SGD as in AWD-LSTM / DARTS: ``ASGD(lr, t0=0, lambd=0, weight_decay)``.

    With ``lambd=0`` the step size stays ``lr`` (no decay schedule) and ``t0=0`` averages from the start.
    """
    return torch.optim.ASGD(params, lr=lr, t0=0, lambd=0.0, weight_decay=weight_decay)


def is_averaging(optimizer: Optional[torch.optim.Optimizer]) -> bool:
    """True when ``optimizer`` keeps averaged weights (ASGD)."""
    return isinstance(optimizer, torch.optim.ASGD)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the step size of every parameter group for the *next* step.

    ``torch.optim.ASGD`` takes its step from ``state["eta"]``, which it recomputes from ``group["lr"]``
    only *after* a step, so a per-step rescaling (AWD-LSTM's ``lr * seq_len / bptt``) would land one step
    late.  With ``lambd=0`` that ``eta`` is just the learning rate, so it is set here as well.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        if is_averaging(optimizer):
            for p in group["params"]:
                eta = optimizer.state.get(p, {}).get("eta")
                if eta is not None:
                    eta.fill_(lr)


def nonmono_trigger(history: Sequence[float], val_loss: float, nonmono: int) -> bool:
    """The NT-ASGD switching condition (AWD-LSTM sec. 3; DARTS ``rnn/train.py``).

    Args:
        history: validation losses of the *previous* evaluations (nats per token), oldest first.
        val_loss: the current validation loss.
        nonmono: the non-monotone interval n (AWD-LSTM / DARTS: 5).
    Returns:
        True when more than ``nonmono`` evaluations precede this one and ``val_loss`` is worse than the
        best of all of them except the last ``nonmono``.  (``nonmono=0``: worse than the best so far.)
    Raises:
        ValueError: if ``nonmono`` is negative.
    """
    if nonmono < 0:
        raise ValueError(f"nonmono must be >= 0, got {nonmono}")
    if len(history) <= nonmono:
        return False
    return val_loss > min(history[: len(history) - nonmono])


@contextmanager
def averaged_weights(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Iterator[bool]:
    """Within the block, the model's parameters hold ASGD's averages ``state[p]["ax"]``; restored after.

    A no-op (yields False) unless ``optimizer`` is ASGD.  Values are copied in place, so parameter
    objects, the optimizer's references and its state are untouched; the raw values come back even if the
    block raises.  A parameter that ASGD has not stepped yet keeps its raw value.  Yields True when
    averaged weights are in place.
    """
    if not is_averaging(optimizer):
        yield False
        return
    swapped = []
    with torch.no_grad():
        for p in model.parameters():
            ax = optimizer.state.get(p, {}).get("ax")
            if ax is not None:
                swapped.append((p, p.detach().clone()))
                p.copy_(ax)
    try:
        yield True
    finally:
        with torch.no_grad():
            for p, raw in swapped:
                p.copy_(raw)
