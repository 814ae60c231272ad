"""Regularized (aging) evolution (nas/strategies/evolution.py): the population ages, a mutation changes exactly one
decision, no genotype is proposed twice until the space is exhausted, an interrupted search resumes bit-exactly, and
the non-dominated sort on points with a known front."""
import os

import numpy as np
import optuna
import pytest
from hydra import compose, initialize_config_dir

from nas.errors import ConfigError
from nas.engine.blackbox import search_black_box
from nas.genotype import enumerate_decisions, genotype_decisions
from nas.spaces import build_space
from nas.strategies.evolution import evolve, mutations, non_dominated_ranks, select_parent
from test_blackbox import ROOT, cfg_for, interrupting, records, toy

optuna.logging.set_verbosity(optuna.logging.WARNING)


def hamming(a: dict, b: dict) -> int:
    return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


def space_of(overrides=()):
    return build_space(cfg_for(["strategy=evolution", *overrides]).space)


def completed(params_values):
    """FrozenTrials numbered in order, COMPLETE with the given (params, value or values)."""
    out = []
    for number, (params, value) in enumerate(params_values):
        dists = {k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()}
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        t = optuna.trial.create_trial(params=params, distributions=dists, values=values)
        t.number = number
        out.append(t)
    return out


def test_a_mutation_changes_exactly_one_decision_and_every_neighbour_comes_once():
    space = space_of()
    parent = next(iter(enumerate_decisions(space)))
    # independently: every genotype of the space at Hamming distance 1 from the parent (the space has 384)
    expected = {tuple(sorted(c.items())) for c in enumerate_decisions(space) if hamming(c, parent) == 1}
    children = list(mutations(space, parent, np.random.default_rng(0)))
    assert all(hamming(c, parent) == 1 for c in children)
    assert len(children) == len(expected) and {tuple(sorted(c.items())) for c in children} == expected
    # the first child (the paper's mutation) varies with the seed: a uniform decision, a uniform new value
    firsts = {tuple(sorted(next(mutations(space, parent, np.random.default_rng(s))).items())) for s in range(40)}
    assert len(firsts) > 5


def test_stacked_rnn_mutation_of_depth_adds_drawn_layers_and_keeps_the_rest():
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        space = build_space(compose("search", overrides=["space=stacked_rnn", "strategy=evolution"]).space)
    parent = {"depth": 2, "cell_1": "lstm", "units_1": 64, "dropout_1": 0.0,
              "cell_2": "gru", "units_2": 128, "dropout_2": 0.5}
    depths = set()
    for child in mutations(space, parent, np.random.default_rng(3)):
        depths.add(child["depth"])
        if child["depth"] == parent["depth"]:
            assert hamming(child, parent) == 1 and set(child) == set(parent)
            continue
        low = min(child["depth"], parent["depth"])
        kept = {k: v for k, v in parent.items() if k != "depth" and int(k.rsplit("_", 1)[1]) <= low}
        assert {k: child[k] for k in kept} == kept  # the layers both have are the parent's
        assert all(int(k.rsplit("_", 1)[1]) > low for k in set(child) ^ set(parent) if k != "depth")
        assert len(child) == 1 + 3 * child["depth"]
    assert depths == {1, 2, 3, 4}


def test_the_population_ages_the_oldest_best_is_no_parent_once_dead():
    """Six evaluated genotypes far apart (Hamming >= 3 between any two); the oldest is by far the best.  With P=3
    the population is trials 3-5, and a sample of 60 draws holds trial 5 (the best of them) with probability
    1 - (2/3)^60: the child must be trial 5's neighbour, never trial 0's."""
    space = space_of()
    pool, members = list(enumerate_decisions(space)), []
    for c in pool:
        if all(hamming(c, m) >= 3 for m in members):
            members.append(c)
        if len(members) == 6:
            break
    values = [0.0, 9.0, 8.0, 7.0, 6.0, 5.0]
    trials = completed(list(zip(members, values)))
    for seed in range(10):
        child = evolve(space, 384, trials, 3, 60, ["minimize"], np.random.default_rng(seed))
        assert hamming(child, members[5]) == 1 and hamming(child, members[0]) > 1
    # maximizing, the best of the population is trial 3 (value 7)
    child = evolve(space, 384, trials, 3, 60, ["maximize"], np.random.default_rng(0))
    assert hamming(child, members[3]) == 1
    # fewer evaluated trials than P: the initial population is drawn at random (untaken genotypes)
    child = evolve(space, 384, trials, 7, 60, ["minimize"], np.random.default_rng(0))
    assert all(child != m for m in members)


def test_parent_is_the_best_of_the_sample_by_non_dominated_rank():
    space_params = [{"x": i} for i in range(5)]
    # (error, params): 0 and 1 are on the front, 2 is dominated by 1, 3 by 2, 4 by everything
    trials = completed(list(zip(space_params, [(1.0, 50.0), (2.0, 10.0), (3.0, 20.0), (4.0, 30.0), (9.0, 90.0)])))
    directions = ["minimize", "minimize"]
    assert select_parent([trials[2], trials[1], trials[3]], trials, directions).number == 1
    assert select_parent([trials[3], trials[2]], trials, directions).number == 2
    assert select_parent([trials[1], trials[0]], trials, directions).number == 0  # both rank 0: the lower error
    single = completed(list(zip(space_params, [3.0, 1.0, 2.0, 5.0, 4.0])))
    assert select_parent(single[2:], single, ["minimize"]).number == 2
    assert select_parent(single[2:], single, ["maximize"]).number == 3


def test_non_dominated_ranks_on_a_known_front():
    """Points on the curve y = 1/x are mutually non-dominated; each shifted copy is dominated exactly by the
    copies below it."""
    front = [(x, 1.0 / x) for x in (0.5, 1.0, 2.0, 4.0)]
    points = front + [(x + 1, y + 1) for x, y in front] + [(x + 2, y + 2) for x, y in front]
    assert non_dominated_ranks(points, ["minimize", "minimize"]) == [0] * 4 + [1] * 4 + [2] * 4
    # maximizing the second figure instead: a point dominates another with a smaller x and a larger y
    flipped = non_dominated_ranks([(1, 5), (2, 4), (0, 6), (3, 3), (1, 7)], ["minimize", "maximize"])
    assert flipped == [1, 2, 0, 3, 0]
    # ties: no worse in every figure and better in one dominates
    assert non_dominated_ranks([(1, 5), (1, 7), (2, 7), (1, 7)], ["minimize", "maximize"]) == [1, 0, 1, 0]


def test_evolve_proposes_only_untaken_genotypes_and_none_once_all_are_taken():
    space = space_of(["space.steps=2", "space.ops=[none,tanh,relu]"])
    every = list(enumerate_decisions(space))
    assert len(every) == 8
    for left in range(8):  # all but one evaluated (values: the population's parents are all taken neighbours)
        trials = completed([(c, float(i)) for i, c in enumerate(every) if i != left])
        for seed in range(3):
            assert evolve(space, 8, trials, 2, 2, ["minimize"], np.random.default_rng(seed)) == every[left]
    assert evolve(space, 8, completed([(c, 1.0) for c in every]), 2, 2, ["minimize"], np.random.default_rng(0)) is None


def test_evolution_never_repeats_a_genotype_until_the_space_is_exhausted(tmp_path):
    cfg = cfg_for(["strategy=evolution", "space.steps=2", "space.ops=[none,tanh,relu]", "strategy.trials=20",
                   "strategy.population=3", "strategy.sample_size=2"])
    evaluate, calls = toy(cfg)
    metrics = search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    keys = [g.key() for g in calls]
    assert len(keys) == len(set(keys)) == 8 == metrics["trials"]  # 1*2 x 2*2 genotypes, each once


@pytest.mark.slow
def test_evolution_children_are_one_decision_apart_and_it_beats_random_search(tmp_path):
    best = {"evolution": [], "random": []}
    for seed in range(4):
        for strategy in best:
            cfg = cfg_for([f"strategy={strategy}", "strategy.trials=40", f"seed={seed}", "strategy.population=6",
                           "strategy.sample_size=3"] if strategy == "evolution" else
                          [f"strategy={strategy}", "strategy.trials=40", f"seed={seed}"])
            evaluate, calls = toy(cfg)
            search_black_box(cfg, str(tmp_path / f"{strategy}{seed}"), evaluate=evaluate)
            best[strategy].append(min(r["value"] for r in records(tmp_path / f"{strategy}{seed}")))
            if strategy == "evolution":
                decisions = [genotype_decisions(g) for g in calls]
                # after the 6 random ones, every proposal is one decision away from one of the 6 evaluated before it
                for n in range(6, len(decisions)):
                    assert min(hamming(decisions[n], d) for d in decisions[n - 6:n]) == 1, n
    # the toy's value is the number of decisions off a target: mutating the best of the population walks towards it,
    # uniform draws do not (random search's best of 40 out of 384 genotypes is mostly 1 or 2 decisions off)
    assert np.mean(best["evolution"]) < np.mean(best["random"]), best


def test_interrupted_evolution_resumes_as_if_never_interrupted(tmp_path):
    from nas.engine.resume import Interrupted

    cfg = cfg_for(["strategy=evolution", "strategy.trials=12", "strategy.population=4"])
    search_black_box(cfg, str(tmp_path / "whole"), evaluate=toy(cfg)[0])
    with pytest.raises(Interrupted):
        search_black_box(cfg, str(tmp_path / "cut"), evaluate=interrupting(toy(cfg)[0], 6))
    evaluate, calls = toy(cfg)
    search_black_box(cfg_for([f"resume={tmp_path / 'cut'}"]), evaluate=evaluate)
    assert len(calls) <= 6
    keep = ("trial", "genotype", "value", "best_value")
    assert [{k: r[k] for k in keep} for r in records(tmp_path / "cut")] == \
        [{k: r[k] for k in keep} for r in records(tmp_path / "whole")]


def test_bad_evolution_settings_are_one_line_errors(tmp_path):
    for override in ("strategy.population=0", "strategy.sample_size=0"):
        cfg = cfg_for(["strategy=evolution", override])
        with pytest.raises(ConfigError, match=r"out of range: strategy\.(population|sample_size)=0 \(must be >= 1\)") as err:
            search_black_box(cfg, str(tmp_path / override[-1]), evaluate=toy(cfg)[0])
        assert "\n" not in str(err.value)


def test_two_evolution_workers_share_one_population_and_never_train_a_genotype_twice(tmp_path):
    """Two workers on one journal storage: the budget is the study's, every trial is one worker's, and no genotype
    is trained twice (the population is the study's evaluated trials, whoever trained them)."""
    from optuna.storages.journal import JournalFileBackend

    from test_blackbox import run_workers

    storage = f"journal:{tmp_path}/study.log"
    cfg = cfg_for(["strategy=evolution", "strategy.trials=16", "strategy.population=4", f"strategy.storage={storage}"])
    trained = []

    def evaluate_for(i):
        evaluate, calls = toy(cfg)
        trained.append(calls)
        return evaluate

    run_workers(cfg, tmp_path, evaluate_for)
    study = optuna.load_study(study_name="nas",
                              storage=optuna.storages.JournalStorage(JournalFileBackend(f"{tmp_path}/study.log")))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 16
    mine = [len(records(tmp_path / f"w{i}")) for i in range(2)]
    assert all(n > 0 for n in mine) and sum(mine) == len(done)
    keys = [g.key() for calls in trained for g in calls]
    assert len(keys) == len(set(keys))
    # after the first 4 evaluated, each trial is a one-decision mutation of one of the trials evaluated before it
    params = [dict(t.params) for t in sorted(done, key=lambda t: t.number)]
    assert sum(min(hamming(p, q) for q in params[:n]) == 1 for n, p in enumerate(params) if n >= 4) >= len(params) - 6
