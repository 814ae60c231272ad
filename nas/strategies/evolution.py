"""Regularized (aging) evolution over a space's decisions (Real et al. 2019, "Regularized Evolution for Image
Classifier Architecture Search", AAAI, Algorithm 1).

The population is the ``population`` (P) most recently evaluated genotypes; each new proposal samples
``sample_size`` (S) members of it uniformly *with replacement* (Algorithm 1: "candidate <- random element from
population", the element stays in the population), takes the best of that sample as the parent, and proposes the
parent with exactly one decision changed (the mutation: a decision chosen uniformly among those with more than one
choice, its new value uniform among the others).  The oldest member leaves the population when a child joins it
(aging), whatever its fitness: that is the regularization.  Until P genotypes are evaluated, proposals are uniform
random draws (Algorithm 1's initial population).

Where this departs from Algorithm 1, for a discrete space whose genotypes are cheap to tell apart:

* never the same genotype twice: a mutation that gives a genotype the study holds already (evaluated, or being
  trained by another worker) is replaced by the parent's next one-decision neighbour, in a random order (the paper
  retrains duplicates; with a small space and an expensive evaluation, a repeat buys nothing); when every
  neighbour is taken, a uniform draw among the untaken genotypes; the search ends when the space is exhausted;
* a diverged trial (no finite value) is evaluated but has no fitness: it never joins the population;
* in a conditional space (stacked_rnn), a mutation of ``depth`` that adds layers draws the new layers' decisions
  uniformly (they did not exist in the parent).

The population is a function of the study's evaluated trials in trial-number order, and each proposal's random
draws of the seed and the number of proposals before it, so a resumed search proposes exactly what an
uninterrupted one would (:class:`nas.strategies.blackbox.BayesianStrategy`'s own study re-proposes an interrupted
trial first); several workers share the population through ``strategy.storage`` as the other black-box strategies
share their study.

With several objectives (``strategy.objectives``), the parent is the sample member of the lowest non-dominated rank
within the population (:func:`non_dominated_ranks`; Deb et al. 2002, NSGA-II's fast non-dominated sort), ties to
the lower first objective (the validation metric) -- the multi-objective use of aging evolution of Elsken et al.
2019 (LEMONADE) simplified to tournament selection by rank.

Defaults (``population``, ``sample_size`` null): the paper's main search used P = 100, S = 25 over C = 20,000 models
(Real et al. 2019, sec. 4 "Methods Details"); that P is 0.5% of its budget, which would be less than one genotype
here, so P = trials // 4 clipped to [4, 100] (at least a few random genotypes, and the paper's P at large
budgets), and S = P // 4 as in the paper, at least 2 (a tournament of one is random search).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from nas.errors import ConfigError
from nas.genotype import sample_decisions
from nas.strategies import shared_study
from nas.strategies.base import STRATEGIES
from nas.strategies.blackbox import BayesianStrategy, BlackBoxConfig


@dataclass
class EvolutionConfig(BlackBoxConfig):
    """``strategy=evolution``: :class:`nas.strategies.blackbox.BlackBoxConfig` plus the population and tournament
    sizes (null: scaled to ``trials``, see the module docstring)."""

    name: str = "evolution"
    #: P, the genotypes alive (the most recently evaluated); null: ``trials // 4`` clipped to [4, 100]
    population: Optional[int] = None
    #: S, the population members sampled (with replacement) per proposal, the best of which is mutated; null:
    #: ``max(2, population // 4)`` (the paper's 100 / 25)
    sample_size: Optional[int] = None


def evolution_sizes(cfg) -> tuple:
    """``(P, S)`` of a config, the defaults resolved.  Raises ConfigError for P or S < 1 (S may exceed P: the
    sample is drawn with replacement)."""
    population = cfg.population if cfg.population is not None else min(100, max(4, cfg.trials // 4))
    sample = cfg.sample_size if cfg.sample_size is not None else max(2, population // 4)
    if population < 1 or sample < 1:
        raise ConfigError(f"strategy.population and strategy.sample_size must be >= 1 (or null), got {cfg.population} "
                          f"and {cfg.sample_size}")
    return population, sample


def non_dominated_ranks(points: Sequence[Sequence[float]], directions: Sequence[str]) -> List[int]:
    """The non-dominated rank of each point (0: the Pareto front; rank r: dominated only by points of ranks < r).

    ``points``: N points of M objectives; ``directions``: M of ``minimize`` / ``maximize``.  Point a dominates b when
    it is no worse in every objective and better in one (Deb et al. 2002, sec. III-A).  O(M N^2), for the small
    populations and trial counts of a search."""
    signs = [1.0 if d == "minimize" else -1.0 for d in directions]
    pts = [[s * float(v) for s, v in zip(signs, p)] for p in points]
    n = len(pts)

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    beaten_by = [[j for j in range(n) if dominates(pts[j], pts[i])] for i in range(n)]
    ranks, left, rank = [-1] * n, set(range(n)), 0
    while left:
        front = [i for i in left if not any(j in left for j in beaten_by[i])]
        for i in front:
            ranks[i] = rank
        left -= set(front)
        rank += 1
    return ranks


def _values(trial) -> tuple:
    return tuple(trial.values)


def select_parent(sample: list, population: list, directions: Sequence[str]):
    """The best of ``sample`` (FrozenTrials, members of ``population``): the lowest non-dominated rank within the
    population (one objective: the best value), ties to the better first objective, then to the earlier draw."""
    ranks = dict(zip((t.number for t in population),
                     non_dominated_ranks([_values(t) for t in population], directions)))
    sign = 1.0 if directions[0] == "minimize" else -1.0
    return min(sample, key=lambda t: (ranks[t.number], sign * _values(t)[0]))


def mutations(space, parent: dict, rng: np.random.Generator) -> Iterator[dict]:
    """The parent's one-decision neighbours (active decisions, :func:`nas.genotype.sample_decisions`), in a random
    order whose first element is the paper's mutation: a decision uniform among those with more than one choice,
    a new value uniform among its other choices.  A decision the change activates (a deeper stack's new layer) is
    drawn uniformly."""
    choices = {}  # the parent's active decisions and their choices, in the order the space asks them

    def replay(name, c):
        choices[name] = list(c)
        return parent[name]

    sample_decisions(space, replay)
    names = [n for n in choices if len(choices[n]) > 1]
    for name in (names[i] for i in rng.permutation(len(names))):
        others = [v for v in choices[name] if v != parent[name]]
        for value in (others[i] for i in rng.permutation(len(others))):
            def suggest(n, c, name=name, value=value):
                if n == name:
                    return value
                return parent[n] if n in parent and parent[n] in c else c[rng.integers(len(c))]

            yield sample_decisions(space, suggest)


def evolve(space, size: int, trials: list, population_size: int, sample_size: int, directions: Sequence[str],
           rng: np.random.Generator):
    """The next proposal's decisions (a dict), ``"wait"`` or None, as :func:`nas.strategies.shared_study.unseen_choice`
    (None: every genotype of the space, ``size`` of them, is evaluated).

    ``trials``: the study's FrozenTrials in number order.  The population: the last ``population_size`` COMPLETE
    ones (a trial with a finite value); fewer than that: a uniform draw of an untaken genotype."""
    import optuna

    evaluated = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(evaluated) < population_size:
        return shared_study.unseen_choice(space, size, trials, rng)
    population = evaluated[-population_size:]
    sample = [population[i] for i in rng.integers(len(population), size=sample_size)]
    parent = select_parent(sample, population, directions)
    done, running = shared_study.taken(trials)
    for child in mutations(space, dict(parent.params), rng):
        if shared_study._key(child) not in done | running:
            return child
    return shared_study.unseen_choice(space, size, trials, rng)


@STRATEGIES.register("evolution", config=EvolutionConfig)
class EvolutionStrategy(BayesianStrategy):
    """Aging evolution (module docstring) on an Optuna study: the study holds the history (one worker: a SQLite file
    in the run dir, so an interrupted search resumes; ``strategy.storage``: shared by several workers), each child's
    decisions are fixed on the study's trial (``PartialFixedSampler``), and ``tell`` records its value.

    Args: as :class:`nas.strategies.blackbox.BayesianStrategy`.
    Raises:
        ConfigError: ``population`` or ``sample_size`` < 1, or what the study's storage raises.
    """

    kind = "black_box"

    def __init__(self, cfg: EvolutionConfig, space, seed: int = 0, direction: str = "minimize",
                 run_dir: Optional[str] = None):
        self.population_size, self.sample_size = evolution_sizes(cfg)
        super().__init__(cfg, space, seed, direction, run_dir, sampler="evolution")

    @property
    def unique(self) -> bool:
        return True

    def _fixed_choice(self, trials, done: int):
        # each proposal's draws: a function of the seed and of the proposals before it (resumes exactly)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, done, 1]))
        directions = [d.name.lower() for d in self.study.directions]
        return evolve(self.space, self.size, list(trials), self.population_size, self.sample_size, directions, rng)
