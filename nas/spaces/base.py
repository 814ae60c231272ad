"""The space registry and what spaces share (its own module, so a space module registers itself without
importing the package)."""
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
