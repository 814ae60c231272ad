"""Search spaces, one module each, registered by name in :data:`SPACES`.

A space builds both the supernet (``build_supernet``) and, from a genotype, the discrete model
(``freeze``) with the same code, and turns α into a genotype (``derive``).
"""
from nas.registry import Registry

SPACES = Registry("space")


def check_space_genotype(genotype, name: str, check_ops) -> None:
    """Raise GenotypeError unless ``genotype`` belongs to space ``name`` and its op list passes ``check_ops``
    (a space's op-list validator, which raises ValueError)."""
    from nas.genotype import GenotypeError

    if genotype.space != name:
        raise GenotypeError(f"genotype is for space {genotype.space!r}, not {name!r}")
    try:
        check_ops(genotype.ops)
    except ValueError as err:
        raise GenotypeError(str(err)) from None

from nas.spaces import darts_rnn, hybrid  # noqa: E402,F401  (register themselves)


def build_space(cfg):
    """Instantiate the space named ``cfg.name`` with its config. Raises KeyError for an unknown name."""
    return SPACES.get(cfg.name)(cfg)
