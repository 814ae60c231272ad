"""Random search with weight sharing (Li & Talwalkar 2019, "Random Search and Reproducibility for NAS", sec. 4).

The supernet's weights are trained with one uniformly random path per minibatch: a genotype drawn uniformly
from the space (:meth:`space.decisions`: per node, its input and its non-zero op, each uniform -- as their
``sample_arch`` in ``benchmarks/ptb/darts/darts_wrapper_discrete.py``), whose edges get weight 1 and all others 0
(:func:`nas.genotype.path_weights`; the hybrid supernet then skips the unused ops).  With ``space.batchnorm=false``
this path computes exactly the discrete cell of that genotype, which is what their code trains.

Selection (``selection``: after every epoch, or once at the end): ``candidates`` random genotypes are scored with
the shared weights on the first ``score_batches`` validation segments (null: all of them), the best
``rescore_top`` are scored again on the whole validation split (0: not at all), and the best of those is the
genotype the search returns.  There are no architecture parameters and nothing is learned on the held-out split
besides this selection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from nas.errors import ConfigError
from nas.genotype import Genotype, genotype_count, path_weights
from nas.strategies.base import STRATEGIES


SELECTIONS = ("every_epoch", "end")


@dataclass
class RandomWSConfig:
    """``strategy=random_ws``: when and how the shared weights select a genotype.

    The defaults are sized for a 2-core CPU (select after every epoch among 20 candidates scored on 4 validation
    segments, rescore 3 on the whole split).  Li & Talwalkar's PTB code (liamcli/randomNAS_release) selects once,
    at the end, among 1000 candidates each scored on the whole validation split at batch 1024, with no rescoring:
    ``experiment=rsws_ptb`` (the README's "RS-WS as Li & Talwalkar ran it" cites each value).
    """

    name: str = "random_ws"
    #: when to select: ``every_epoch`` (after each epoch, the current best competing again; CPU default) or
    #: ``end`` (once, after the last epoch, as their ``searcher.run()`` then ``get_eval_arch()``; before that the
    #: per-epoch validation and genotype records are of a uniformly random path)
    selection: str = "every_epoch"
    #: random genotypes scored with the shared weights at each selection (their code: 1000 per round)
    candidates: int = 20
    #: validation segments (LM) / batches (classification) each candidate is scored on first; null: the whole
    #: split (``limit_eval_batches``; their PTB code)
    score_batches: Optional[int] = 4
    #: the best few candidates scored again on the whole split (``limit_eval_batches``); 0: no rescoring, the
    #: best first score wins (their PTB code; their CIFAR-10 code rescored 10 after 10-batch scores)
    rescore_top: int = 3
    #: batch size (columns) of the validation split when scoring candidates; null: ``eval_batch_size``.  A
    #: language model's score depends on it through the carried hidden state (their PTB code: 256 * 4 = 1024)
    score_batch_size: Optional[int] = None


def check_config(cfg: RandomWSConfig) -> None:
    """Raise ConfigError (one line) for a setting :class:`RandomWSStrategy` cannot run."""
    if cfg.selection not in SELECTIONS:
        raise ConfigError(f"strategy.selection={cfg.selection!r}; valid: {', '.join(SELECTIONS)}")
    for key, low in (("candidates", 1), ("rescore_top", 0)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"strategy.{key} must be >= {low}, got {getattr(cfg, key)}")
    for key in ("score_batches", "score_batch_size"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"strategy.{key} must be >= 1 or null, got {getattr(cfg, key)}")


@STRATEGIES.register("random_ws", config=RandomWSConfig)
class RandomWSStrategy:
    """Single-path supernet training with uniform random paths, then selection by shared-weight validation.

    Same interface as :class:`nas.strategies.darts.DartsStrategy` (``edge_weights``, ``step``, ``export``,
    ``state_dict``), plus ``select`` (called by the engines after each epoch, ``final`` after the last) and no
    ``alphas``.
    Raises:
        ConfigError: an unknown ``selection``, ``candidates`` < 1, ``rescore_top`` < 0, or ``score_batches`` /
        ``score_batch_size`` < 1.
    """

    kind = "one_shot"

    def __init__(self, cfg: RandomWSConfig, space, model, train_objective=None, weight_decay: float = 0.0,
                 clip: Optional[float] = None, seed: int = 0):
        check_config(cfg)
        self.cfg, self.space, self.model = cfg, space, model
        # a space whose black-box decisions include what its supernet fixes (stacked_rnn: units, dropout) gives the
        # one-shot ones separately
        self.decisions = (space.one_shot_decisions() if hasattr(space, "one_shot_decisions")
                          else space.decisions())
        self._from_decisions = getattr(space, "from_one_shot_decisions", space.from_decisions)
        self.size = genotype_count(self.decisions)
        self.rng = np.random.default_rng(seed)
        p = next(model.parameters())
        self._like = (p.dtype, p.device)
        self.best: Optional[Genotype] = None
        self.best_value: Optional[float] = None

    def sample(self) -> Genotype:
        """A genotype drawn uniformly from the space."""
        return self._from_decisions({n: c[self.rng.integers(len(c))] for n, c in self.decisions})

    def weights_of(self, genotype: Genotype) -> torch.Tensor:
        """The supernet weights computing ``genotype``: the space's ``path_weights`` when it has one (a chain
        space's), else the DAG layout's (:func:`nas.genotype.path_weights`)."""
        if hasattr(self.space, "path_weights"):
            return self.space.path_weights(genotype, *self._like)
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

    def select(self, score: Callable[[torch.Tensor, Optional[int]], float], direction: str = "minimize",
               final: bool = True) -> List:
        """Pick the best of random genotypes by their shared-weight validation score.

        Scores ``candidates`` random genotypes (plus the current best, under ``selection=every_epoch``) with
        ``score(weights [E, K], score_batches)``, rescores the best ``rescore_top`` with ``score(weights, None)``
        (``None``: the whole split), keeps the best.  A NaN score ranks last.  Under ``selection=end`` only the
        ``final`` call (after the last epoch) selects; the others do nothing and return ``[]``.

        Returns the ranked ``[(genotype, value), ...]``, best first: the rescored ones, or every candidate when
        ``rescore_top`` is 0.
        """
        if self.cfg.selection == "end" and not final:
            return []
        sign = 1.0 if direction == "minimize" else -1.0

        def key(value: float) -> float:  # smaller is better; NaN (a diverged path) is worst
            return math.inf if math.isnan(value) else sign * value

        pool = {}
        for g in ([self.best] if self.best is not None else []) + [self.sample() for _ in range(self.cfg.candidates)]:
            pool.setdefault(g.key(), g)
        ranked = sorted(((score(self.weights_of(g), self.cfg.score_batches), g) for g in pool.values()),
                        key=lambda x: key(x[0]))
        if self.cfg.rescore_top > 0:
            ranked = sorted(((score(self.weights_of(g), None), g) for _, g in ranked[:self.cfg.rescore_top]),
                            key=lambda x: key(x[0]))
        self.best_value, self.best = ranked[0]
        return [(g, v) for v, g in ranked]

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
