"""nas: differentiable neural architecture search (DARTS-style) for NLP.

The library: search spaces (``nas.spaces``), strategies (``nas.strategies``), genotypes
(``nas.genotype``), data (``nas.data``) and the training / search loops (``nas.engine``).
Nothing here parses argv; ``search.py`` and ``train.py`` are thin Hydra entry points.
"""

import os as _os

__version__ = "0.1.0"

#: OpenMP's wait policy, set before torch loads OpenMP (the entry scripts import ``nas`` first): waiting threads sleep
#: instead of spinning, so that a run beside another busy process slows by 1.6x rather than 2.8-4.7x (issue 21,
#: item 4; experiments/README.md, "Sharing the cores"), at 15-25% of a step when the cores are free.  An
#: ``OMP_WAIT_POLICY`` already in the environment is kept (``OMP_WAIT_POLICY=ACTIVE`` for the spinning default).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
