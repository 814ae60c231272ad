"""Search spaces, one module each, registered by name in :data:`SPACES`.

A space builds both the supernet (``build_supernet``) and, from a genotype, the discrete model
(``freeze``) with the same code, and turns α into a genotype (``derive``).
"""
from nas.registry import import_modules
from nas.spaces.base import SPACES, check_space_genotype  # noqa: F401

import_modules(__name__, __path__)  # every module of the package registers itself: adding one is adding its file


def build_space(cfg):
    """Instantiate the space named ``cfg.name`` with its config. Raises KeyError for an unknown name."""
    return SPACES.get(cfg.name)(cfg)
