"""Search strategies, one module each, registered by name in :data:`STRATEGIES` (:mod:`nas.strategies.base`).

A one-shot strategy (``kind = "one_shot"``: darts) owns α and its optimizer over a supernet and exposes
``edge_weights`` / ``step`` / ``export`` / ``state_dict``.
"""
from nas.strategies.base import STRATEGIES  # noqa: F401

from nas.strategies import blackbox, darts, random_ws  # noqa: E402,F401  (register themselves)
