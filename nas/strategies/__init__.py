"""Search strategies, one module each, registered by name in :data:`STRATEGIES` (:mod:`nas.strategies.base`).

A one-shot strategy (``kind = "one_shot"``: darts, gdas, random_ws) owns α and its optimizer over a supernet and exposes
``edge_weights`` / ``step`` / ``export`` / ``state_dict``.
"""
from nas.registry import import_modules
from nas.strategies.base import STRATEGIES  # noqa: F401

import_modules(__name__, __path__)  # every module of the package registers itself: adding one is adding its file
