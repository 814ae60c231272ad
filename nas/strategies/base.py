"""The strategy registry (its own module, so a strategy module registers itself without importing the package).

A one-shot strategy (``kind = "one_shot"``: darts, gdas, random_ws) owns α (or its path sampler) over a supernet and exposes
``edge_weights`` / ``step`` / ``export`` / ``state_dict``; a black-box strategy (``kind = "black_box"``: random,
bayesian) proposes genotypes (``ask``) and receives their scores (``tell``).
"""
from nas.registry import Registry

STRATEGIES = Registry("strategy")
