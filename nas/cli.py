"""What the ``search.py`` / ``train.py`` entry points share: override checks and clean error reporting.

Hydra's ``+key=value`` adds a key that the schema does not have, and ``~key`` deletes one; a misspelled
option would then run silently with its default.  Both are refused here.  The project's own errors (missing
data, a bad genotype or checkpoint, a NaN loss, an invalid setting) are reported as one clear line, written
to the run log too, with exit status 1 and no traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable

from omegaconf import DictConfig

log = logging.getLogger("nas")


class UsageError(ValueError):  # noqa: N818 (reads better in the one-line message)
    """A command-line override the schemas do not allow."""


def check_overrides(overrides) -> None:
    """Refuse ``+key=...`` / ``++key=...`` (adds a key) and ``~key`` (deletes one).

    Raises:
        UsageError: naming the offending overrides and how to list the valid keys.
    """
    bad = [o for o in overrides if o.startswith(("+", "~"))]
    if bad:
        raise UsageError(f"overrides {bad} would add or delete config keys; every option already exists in "
                         f"the schema (list them with --cfg job), so set it without '+' or '~'")


def run_entry(fn: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Check the overrides, run ``fn(cfg)``, and turn the project's known errors into one-line exits."""
    from hydra.core.hydra_config import HydraConfig

    from nas.data import DataError
    from nas.engine.common import CheckpointError
    from nas.engine.lm import NonFiniteLossError
    from nas.errors import ConfigError
    from nas.genotype import GenotypeError

    try:
        check_overrides(HydraConfig.get().overrides.task)
        fn(cfg)
    except (UsageError, ConfigError, DataError, GenotypeError, CheckpointError, NonFiniteLossError) as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(1)
