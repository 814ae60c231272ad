"""Search strategies, one module each, registered by name in :data:`STRATEGIES`.

A one-shot strategy (``kind = "one_shot"``: darts) owns α and its optimizer over a supernet and exposes
``edge_weights`` / ``step`` / ``export`` / ``state_dict``.
"""
from nas.registry import Registry

STRATEGIES = Registry("strategy")

from nas.strategies import blackbox, darts, random_ws  # noqa: E402,F401  (register themselves)
