"""Pareto search over several objectives (strategy.objectives): the front written is exactly the non-dominated set,
on a toy objective whose front is known, for random search, multi-objective TPE / NSGA-II and evolution."""
import json
import os

import optuna
import pytest

from nas.engine.blackbox import PARETO_FILE, TrialResult, search_black_box
from nas.errors import ConfigError
from nas.genotype import enumerate_decisions, genotype_decisions
from nas.spaces import build_space
from test_blackbox import cfg_for, records

optuna.logging.set_verbosity(optuna.logging.WARNING)


def two_targets(cfg):
    """Toy objectives with a known front: the metric is the number of decisions off target A, ``params`` the number
    off target B.  d(g, A) + d(g, B) >= d(A, B) for every g, with equality exactly where g takes A's or B's value in
    every decision, so those genotypes (and no other) are the front of the whole space."""
    space = build_space(cfg.space)
    decisions = space.decisions()
    a = {n: c[0] for n, c in decisions}
    b = {n: c[-1] if i % 2 == 0 else c[0] for i, (n, c) in enumerate(decisions)}  # differs from A in half of them

    def off(d, target):
        return sum(d[k] != target[k] for k in target)

    def evaluate(genotype, trial_dir):
        d = genotype_decisions(genotype)
        return TrialResult(float(off(d, a)), 0.01, 10, figures={"params": off(d, b), "accuracy": None,
                                                               "cross_entropy": None})

    front = {tuple(sorted(c.items())) for c in enumerate_decisions(space) if off(c, a) + off(c, b) == off(a, b)}
    return evaluate, front


def key(genotype_dict):
    from nas.genotype import Genotype

    return tuple(sorted(genotype_decisions(Genotype.from_dict(genotype_dict)).items()))


def brute_front(recs, directions=("minimize", "minimize")):
    """The non-dominated records, by direct pairwise comparison (not the code's sort)."""
    sign = [1 if d == "minimize" else -1 for d in directions]
    pts = [(r, [s * v for s, v in zip(sign, r["objectives"].values())]) for r in recs if r.get("objectives")]
    return {r["trial"] for r, p in pts
            if not any(all(x <= y for x, y in zip(q, p)) and any(x < y for x, y in zip(q, p)) for _, q in pts)}


def test_random_search_over_the_whole_space_finds_exactly_the_known_front(tmp_path):
    cfg = cfg_for(["strategy=random", "strategy.trials=400", "strategy.objectives=[metric,params]"])
    evaluate, front = two_targets(cfg)
    metrics = search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    assert metrics["trials"] == 384  # the space is exhausted
    written = json.load(open(tmp_path / PARETO_FILE))
    assert written["objectives"] == ["valid_ppl", "params"] and written["directions"] == ["minimize", "minimize"]
    assert {key(m["genotype"]) for m in written["front"]} == front and len(front) == 2 ** 3
    assert metrics["pareto_front"] == len(front)
    # genotype.json: the front's best on the first objective (target A itself, 0 decisions off)
    assert written["front"][0]["valid_ppl"] == 0.0 and metrics["best_valid_ppl"] == 0.0
    assert key(json.load(open(tmp_path / "genotype.json"))) == key(written["front"][0]["genotype"])
    assert os.path.getsize(tmp_path / "pareto.png") > 1000


@pytest.mark.parametrize("strategy", [["strategy=bayesian"], ["strategy=bayesian", "strategy.sampler=nsga2"],
                                      ["strategy=evolution", "strategy.population=4"]])
def test_multi_objective_study_front_is_the_non_dominated_set_of_its_trials(tmp_path, strategy):
    cfg = cfg_for(strategy + ["strategy.trials=14", "strategy.objectives=[metric,params]",
                              "strategy.n_startup_trials=4"] if "strategy=bayesian" in strategy
                  else strategy + ["strategy.trials=14", "strategy.objectives=[metric,params]"])
    evaluate, _ = two_targets(cfg)
    search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    recs = records(tmp_path)
    assert len(recs) == 14 and all(set(r["objectives"]) == {"metric", "params"} for r in recs)
    written = {m["trial"] for m in json.load(open(tmp_path / PARETO_FILE))["front"]}
    # a genotype repeated by the sampler is one member: compare genotypes
    by_trial = {r["trial"]: key(r["genotype"]) for r in recs}
    assert {by_trial[t] for t in written} == {by_trial[t] for t in brute_front(recs)}
    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/study.db")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    told = {t.number: t.values for t in study.trials if t.values}
    assert sorted(map(tuple, told.values())) == sorted(tuple(r["objectives"].values()) for r in recs)


def test_pareto_settings_are_one_line_errors(tmp_path):
    for override, message in (("strategy.objectives=[metric]", "two or more"),
                              ("strategy.objectives=[metric,size]", "two or more"),
                              ("strategy.objectives=[params,metric]", "can only come first"),
                              ("strategy.objectives=[metric,params] strategy.objective=accuracy", "both set"),
                              ("strategy.objectives=[metric,params] strategy.pruner=asha strategy.trial_epochs=3",
                               "one objective")):
        cfg = cfg_for(["strategy=bayesian", *override.split()])
        with pytest.raises(ConfigError, match=message) as err:
            search_black_box(cfg, str(tmp_path / str(abs(hash(override)))), evaluate=two_targets(cfg)[0])
        assert "\n" not in str(err.value)


def test_a_tie_on_the_first_objective_goes_to_the_better_second_and_three_objectives_plot(tmp_path):
    """Two genotypes share the best metric; the one with fewer params is genotype.json (found by a fresh-user trial:
    the first recorded, the larger, was kept).  A third objective: the front is over all three."""
    cfg = cfg_for(["strategy=random", "strategy.trials=30", "strategy.objectives=[metric,params,cross_entropy]"])
    order = []

    def evaluate(genotype, trial_dir):
        order.append(genotype)
        # the metric: 0 for the first two genotypes drawn, 1 after; params: 9 for the first, 5 for the second
        n = len(order)
        return TrialResult(0.0 if n <= 2 else 1.0, 0.01, 10, figures={"params": {1: 9, 2: 5}.get(n, 1),
                                                                  "cross_entropy": float(n), "accuracy": None})

    search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    assert key(json.load(open(tmp_path / "genotype.json"))) == key(order[1].to_dict())
    written = json.load(open(tmp_path / PARETO_FILE))
    assert written["objectives"] == ["valid_ppl", "params", "cross_entropy"]
    # front over three: trial 2 (0, 5, 2) dominates trial 1 (0, 9, 1)? no: trial 1 has the lower cross-entropy
    assert [m["trial"] for m in written["front"]][:2] == [2, 1] and 3 in {m["trial"] for m in written["front"]}
    assert os.path.getsize(tmp_path / "pareto.png") > 1000
