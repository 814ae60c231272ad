"""Error types shared across the library."""


class ConfigError(ValueError):
    """A setting that is valid YAML but not a valid value (a device that is not there, emsize != nhid, ...)."""
