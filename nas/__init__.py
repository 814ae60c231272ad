"""nas: differentiable neural architecture search (DARTS-style) for NLP.

The library: search spaces (``nas.spaces``), strategies (``nas.strategies``), genotypes
(``nas.genotype``), data (``nas.data``) and the training / search loops (``nas.engine``).
Nothing here parses argv; ``search.py`` and ``train.py`` are thin Hydra entry points.
"""

__version__ = "0.1.0"
