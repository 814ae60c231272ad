"""Run plumbing shared by search and retraining: device, seeding, atomic checkpoints, output dirs."""
from __future__ import annotations

import logging
import os
import random
from typing import Any, Optional

import numpy as np
import torch

from nas.atomic import atomic_write
from nas.errors import ConfigError

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the run."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: for an unparsable name, or ``cuda`` requested when CUDA is unavailable.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a device name (auto, cpu, cuda, cuda:N): {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    return device


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch (all devices); return a numpy Generator for data sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def rng_state() -> dict:
    """All random states a run depends on (to store in a checkpoint)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` atomically: temporary file in the same folder, fsync, then ``os.replace``.

    A crash or a full disk leaves the previous file at ``path`` intact (the temporary file is removed).
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str, map_location: Optional[torch.device] = None) -> dict:
    """Load a checkpoint written by :func:`atomic_torch_save`.

    Raises:
        CheckpointError: naming the file, if it is missing, truncated or not a checkpoint.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state


def run_dir_from_hydra() -> str:
    """The current Hydra run's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


def absolute_path(path: Optional[str]) -> Optional[str]:
    """Resolve a user-given path against the launch directory (Hydra-aware); None stays None."""
    if path is None:
        return None
    from hydra.utils import to_absolute_path

    return to_absolute_path(os.path.expanduser(path))
