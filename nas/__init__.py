"""nas: differentiable neural architecture search (DARTS-style) for NLP.

The library: search spaces (``nas.spaces``), strategies (``nas.strategies``), genotypes
(``nas.genotype``), data (``nas.data``) and the training / search loops (``nas.engine``).
Nothing here parses argv; ``search.py`` and ``train.py`` are thin Hydra entry points.
"""

__version__ = "0.1.0"

# OpenMP's wait policy is left to OpenMP (libgomp: threads spin a while before they sleep).  Passive waiting
# (OMP_WAIT_POLICY=PASSIVE, the default from issue 21 item 4 until 2026-12-02) cost 15-25% of the default search step
# on an AMD EPYC and 3.5x on a Xeon VM, where waking an idle core is slow; runs beside busy processes are served by
# running on the free cores instead (nas.engine.common.fit_threads_to_free_cores).  experiments/README.md, "Sharing
# the cores".
