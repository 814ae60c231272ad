"""Random search with weight sharing (Li & Talwalkar 2019, "Random Search and Reproducibility for NAS", sec. 4).

The supernet's weights are trained with one uniformly random path per minibatch: a genotype drawn uniformly
from the space (:meth:`space.decisions`), whose edges get weight 1 and all others 0 (:func:`nas.genotype.
path_weights`; the hybrid supernet then skips the unused ops).  After each epoch, ``candidates`` random genotypes
are scored with the shared weights on the first ``score_batches`` validation segments, the best ``rescore_top``
are scored again on the whole validation split (``limit_eval_batches``), and the best of those is the genotype
the search returns.  There are no architecture parameters and nothing is learned on the held-out split besides
this selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from nas.errors import ConfigError
from nas.genotype import Genotype, genotype_count, path_weights
from nas.strategies import STRATEGIES


@dataclass
class RandomWSConfig:
    """``strategy=random_ws``: the candidate scoring after each epoch."""

    name: str = "random_ws"
    #: random genotypes scored with the shared weights after each epoch (Li & Talwalkar scored 1,000 at the
    #: end of a GPU search; each costs ``score_batches`` supernet forward passes)
    candidates: int = 20
    #: validation segments (LM) / batches (classification) each candidate is scored on
    score_batches: int = 4
    #: the best few candidates scored again on the whole validation split (``limit_eval_batches``)
    rescore_top: int = 3


@STRATEGIES.register("random_ws", config=RandomWSConfig)
class RandomWSStrategy:
    """Single-path supernet training with uniform random paths, then selection by shared-weight validation.

    Same interface as :class:`nas.strategies.darts.DartsStrategy` (``edge_weights``, ``step``, ``export``,
    ``state_dict``), plus ``select`` (called by the engines after each epoch) and no ``alphas``.
    Raises:
        ConfigError: a non-positive ``candidates``, ``score_batches`` or ``rescore_top``.
    """

    kind = "one_shot"

    def __init__(self, cfg: RandomWSConfig, space, model, train_objective=None, weight_decay: float = 0.0,
                 clip: Optional[float] = None, seed: int = 0):
        for key in ("candidates", "score_batches", "rescore_top"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"strategy.{key} must be >= 1, got {getattr(cfg, key)}")
        self.cfg, self.space, self.model = cfg, space, model
        self.decisions = space.decisions()
        self.size = genotype_count(self.decisions)
        self.rng = np.random.default_rng(seed)
        p = next(model.parameters())
        self._like = (p.dtype, p.device)
        self.best: Optional[Genotype] = None
        self.best_value: Optional[float] = None

    def sample(self) -> Genotype:
        """A genotype drawn uniformly from the space."""
        return self.space.from_decisions({n: c[self.rng.integers(len(c))] for n, c in self.decisions})

    def weights_of(self, genotype: Genotype) -> torch.Tensor:
        return path_weights(genotype, self.space.ops, *self._like)

    def edge_weights(self) -> torch.Tensor:
        """A fresh uniformly random path [E, K] (one per training minibatch)."""
        return self.weights_of(self.sample())

    def eval_weights(self) -> torch.Tensor:
        """The path of the best genotype selected so far (a random one before the first selection)."""
        return self.weights_of(self.best if self.best is not None else self.sample())

    def step(self, train, valid, eta: float):
        """No architecture update: returns the held-out batch's incoming hidden state unchanged (None for a
        classifier), so the engine's loop stays the same as DARTS's."""
        return getattr(valid, "hidden", None)

    def select(self, score: Callable[[torch.Tensor, Optional[int]], float], direction: str = "minimize") -> List:
        """Score ``candidates`` random genotypes (plus the current best) on ``score_batches`` batches, rescore the
        best ``rescore_top`` on the whole split, keep the best.  ``score(weights, max_batches) -> value``.

        Returns the rescored ``[(genotype, value), ...]``, best first.
        """
        sign = 1.0 if direction == "minimize" else -1.0
        pool = {}
        for g in ([self.best] if self.best is not None else []) + [self.sample() for _ in range(self.cfg.candidates)]:
            pool.setdefault(g.to_json(), g)
        quick = sorted(((sign * score(self.weights_of(g), self.cfg.score_batches), g) for g in pool.values()),
                       key=lambda x: x[0])
        full = sorted(((sign * score(self.weights_of(g), None), g) for _, g in quick[:self.cfg.rescore_top]),
                      key=lambda x: x[0])
        self.best, self.best_value = full[0][1], sign * full[0][0]
        return [(g, sign * v) for v, g in full]

    def export(self) -> Genotype:
        """The best genotype selected so far (a uniform random one before the first selection)."""
        return self.best if self.best is not None else self.sample()

    def state_dict(self) -> dict:
        return {"best": None if self.best is None else self.best.to_dict(), "best_value": self.best_value,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else Genotype.from_dict(state["best"])
        self.best_value = state["best_value"]
        self.rng.bit_generator.state = state["rng"]
