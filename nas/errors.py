"""Error types shared across the library."""


class ConfigError(ValueError):
    """A setting that is valid YAML but not a valid value (a device that is not there, emsize != nhid, ...)."""


class SearchFailed(RuntimeError):  # noqa: N818 (reads better in the one-line message)
    """A black-box search that ended without any successful trial (every trial failed: in a shared study possibly
    through other workers), so there is no genotype to write."""


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf."""
