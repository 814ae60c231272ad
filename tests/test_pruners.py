"""Multi-fidelity black-box search (``strategy.pruner``): successive halving and Hyperband on a toy objective whose
learning curves never cross, so the best configuration is best at every rung and halving must never stop it."""
import binascii
import hashlib
import json
import math
import os

import pytest
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
from nas.engine.blackbox import TRIALS_FILE, TrialResult, search_black_box
from nas.engine.resume import Interrupted
from nas.errors import ConfigError
from nas.genotype import Genotype, genotype_decisions
from nas.spaces import build_space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["space.steps=3", "progress=false"]  # darts_rnn, 3 nodes: 384 genotypes
TOKENS_PER_EPOCH = 100


def cfg_for(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("search", overrides=TOY + overrides)


def records(run_dir):
    with open(os.path.join(run_dir, TRIALS_FILE)) as f:
        return [json.loads(line) for line in f]


def quality(cfg):
    """q(genotype) >= 0, distinct for distinct genotypes: the decisions differing from a fixed target, plus a
    tie-break below 0.01 from the genotype's hash."""
    sp = build_space(cfg.space)
    target = genotype_decisions(sp.from_decisions({n: c[len(c) // 2] for n, c in sp.decisions()}))

    def q(genotype):
        d = genotype_decisions(genotype)
        tie = int(hashlib.md5(genotype.to_json().encode()).hexdigest()[:8], 16) / 16 ** 8 / 100
        return sum(d[k] != target[k] for k in target) + tie

    return q


def curve(q, epoch):
    """Validation perplexity after ``epoch``: (q + 1) (1 + 1/epoch), decreasing in the epoch, increasing in q, so two
    configurations' curves never cross (their order is the same at every epoch)."""
    return (q + 1) * (1 + 1 / epoch)


def toy(cfg, interrupt_in=None):
    """``evaluate(genotype, trial_dir, report=None)``: trains ``trial_epochs`` toy epochs of ``TOKENS_PER_EPOCH``
    tokens each, reporting the curve after each; stops when the hook says so.  ``interrupt_in=(n, epoch)``: the n-th
    call raises Interrupted after that epoch (as SIGINT during a trial does)."""
    q, epochs, calls = quality(cfg), cfg.strategy.trial_epochs, []

    def evaluate(genotype, trial_dir, report=None):
        calls.append(genotype)
        for epoch in range(1, epochs + 1):
            value = curve(q(genotype), epoch)
            if interrupt_in == (len(calls), epoch):
                raise Interrupted("toy interruption")
            if report is not None and report.report(epoch, value):
                return TrialResult(value, 0.01 * epoch, TOKENS_PER_EPOCH * epoch, pruned=epoch)
        return TrialResult(value, 0.01 * epochs, TOKENS_PER_EPOCH * epochs)

    return evaluate, calls


def hyperband_bracket(number, n_brackets, eta, study_name="nas"):
    """Optuna's HyperbandPruner bracket of trial ``number`` (its documented rule): brackets s = 0 .. n-1 get shares
    ceil(n * eta^(n-1-s) / (n-s)) of crc32("<study>_<number>") modulo their sum, in order."""
    shares = [math.ceil(n_brackets * eta ** (n_brackets - 1 - s) / (n_brackets - s)) for s in range(n_brackets)]
    n = binascii.crc32(f"{study_name}_{number}".encode()) % sum(shares)
    for s, share in enumerate(shares):
        n -= share
        if n < 0:
            return s


# (strategy, pruner settings, trial epochs) -> the rung epochs, by hand: min_resource * eta^(s + k) < trial_epochs
# (a SQLite study commits each report: ~0.5 s a trial on a busy disk, so the fast cases are two)
CASES = [
    # r=1, eta=3, s=0: rungs 1, 3, 9, ... below trial_epochs (3 itself is the last epoch: a trial there completes)
    ("random", ["strategy.pruner=asha"], 3, {0: [1]}),
    pytest.param("random", ["strategy.pruner=asha"], 4, {0: [1, 3]}, marks=pytest.mark.slow),
    pytest.param("random", ["strategy.pruner=asha"], 9, {0: [1, 3]}, marks=pytest.mark.slow),  # 9: the last
    pytest.param("random", ["strategy.pruner=asha", "strategy.min_resource=2", "strategy.reduction_factor=2"], 9,
                 {0: [2, 4, 8]}, marks=pytest.mark.slow),
    pytest.param("random", ["strategy.pruner=asha", "strategy.min_early_stopping_rate=1"], 9, {0: [3]},  # 1 * 3^1
                 marks=pytest.mark.slow),
    # Hyperband, r=1, eta=3, R=4: floor(log3 4) + 1 = 2 brackets, R=9: 3; bracket s: rungs 3^(s+k) < R
    ("bayesian", ["strategy.pruner=hyperband", "strategy.n_startup_trials=4"], 4, {0: [1, 3], 1: [3]}),
    pytest.param("bayesian", ["strategy.pruner=hyperband", "strategy.n_startup_trials=4"], 9,
                 {0: [1, 3], 1: [3], 2: []}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("strategy,overrides,epochs,rungs", CASES)
def test_halving_never_prunes_the_best_and_stops_at_the_rungs(tmp_path, strategy, overrides, epochs, rungs):
    trials = 16
    cfg = cfg_for([f"strategy={strategy}", f"strategy.trials={trials}", f"strategy.trial_epochs={epochs}"]
                  + overrides)
    evaluate, calls = toy(cfg)
    m = search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    recs = records(tmp_path)
    q = quality(cfg)
    assert len(recs) == m["trials"] == trials  # a pruned trial is one of strategy.trials
    assert len(calls) == sum(not r["repeated"] for r in recs)  # TPE may propose a finished genotype again: reported
    pruned = [r for r in recs if r.get("pruned") is not None]
    assert pruned and m["pruned_trials"] == len(pruned) < trials
    import optuna

    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/study.db")
    states = {t.number: t.state for t in study.trials}
    for r in recs:
        bracket = hyperband_bracket(r["study_trial"], len(rungs), 3) if cfg.strategy.pruner == "hyperband" else 0
        g = Genotype.from_dict(r["genotype"])
        if r.get("pruned") is not None:
            assert r["pruned"] in rungs[bracket], (r["pruned"], bracket)  # stopped at a rung of its bracket
            assert states[r["study_trial"]] == optuna.trial.TrialState.PRUNED
        epochs_run = r.get("pruned") or epochs
        # what it trained on, pruned or not (nothing: a reported repeat)
        assert r["train_tokens"] == (0 if r["repeated"] else TOKENS_PER_EPOCH * epochs_run)
        assert r["value"] == pytest.approx(curve(q(g), epochs_run))
    # the tokens of pruned trials are counted: in each cumulative cost and in metrics.json
    expected = [0 if r["repeated"] else TOKENS_PER_EPOCH * (r.get("pruned") or epochs) for r in recs]
    assert [r["cum_train_tokens"] for r in recs] == [sum(expected[:i + 1]) for i in range(trials)]
    assert m["train_tokens"] == sum(expected) < trials * epochs * TOKENS_PER_EPOCH
    # a trial better than every earlier one is best among those at each rung it reaches (the curves never cross),
    # which successive halving always promotes: never pruned -- the overall best included
    best_so_far = math.inf
    for r in recs:
        value = q(Genotype.from_dict(r["genotype"]))
        if value < best_so_far:
            assert r.get("pruned") is None, (r["trial"], value)
            best_so_far = value
    best = min(recs, key=lambda r: q(Genotype.from_dict(r["genotype"])))
    assert m["genotype"] == best["genotype"] and m["best_valid_ppl"] == pytest.approx(best["value"])
    # pruned values never count as the best so far, even when lower than a finished trial's (earlier epoch)
    best, expected_best = None, []
    for r in recs:
        if r.get("pruned") is None:
            best = r["value"] if best is None else min(best, r["value"])
        expected_best.append(best)
    assert [r["best_value"] for r in recs] == expected_best
    table = open(tmp_path / "results.md").read()
    assert table.count("pruned after epoch") == len(pruned)


def test_a_pruned_value_is_never_the_best(tmp_path):
    """A pruned trial's intermediate value (after an early epoch) can be lower than every finished one; it is
    recorded, but best_value, genotype.json and results.md's * take finished trials only (as Optuna's best_trial)."""
    from nas.engine.trials import TrialLog
    from nas.genotype import Edge

    g = Genotype("darts_rnn", ("none", "tanh"), [[Edge("tanh", 0)]], [1])
    h = Genotype("darts_rnn", ("none", "tanh", "relu"), [[Edge("relu", 0)]], [1])
    log = TrialLog(str(tmp_path), "random", "valid_ppl", "minimize", 0)
    log.add(g, 50.0, 1.0, 100)
    log.add(h, 10.0, 0.2, 20, pruned=1)
    assert log.best == 50.0 and log.best_genotype == g and log.cum_tokens == 120
    assert records(tmp_path)[1]["best_value"] == 50.0 and records(tmp_path)[1]["pruned"] == 1
    again = TrialLog(str(tmp_path), "random", "valid_ppl", "minimize", 0)
    assert again.resume() == 2 and again.best == 50.0 and again.best_genotype == g and again.cum_tokens == 120
    assert "| 1 * |" in again.results_table() and "pruned after epoch 1" in again.results_table()


def test_budget_tokens_counts_pruned_trials(tmp_path):
    cfg = cfg_for(["strategy=random", "strategy.pruner=asha", "strategy.trials=50", "strategy.trial_epochs=4",
                   "strategy.budget_tokens=1500"])
    m = search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    recs = records(tmp_path)
    # the search stops at the first trial that takes the spent tokens (pruned ones' included) to the budget
    assert recs[-1]["cum_train_tokens"] >= 1500 > recs[-2]["cum_train_tokens"]
    assert m["train_tokens"] == sum(r["train_tokens"] for r in recs) and any(r.get("pruned") for r in recs)


@pytest.mark.parametrize("strategy,pruner,where", [
    ("random", "asha", "in"), ("bayesian", "hyperband", "in"),
    pytest.param("random", "asha", "after", marks=pytest.mark.slow),
    pytest.param("bayesian", "hyperband", "after", marks=pytest.mark.slow)])
def test_an_interrupted_pruned_search_resumes_as_if_never_interrupted(tmp_path, strategy, pruner, where):
    """Interrupted after trial 4, or inside a trial after its third epoch (past the rungs at 1 and 3): ``resume=``
    continues the study (an interrupted trial as the same Optuna trial, its reported epochs kept) and ends with the
    records of an uninterrupted run."""
    import signal

    import optuna

    cfg = cfg_for([f"strategy={strategy}", f"strategy.pruner={pruner}", "strategy.trials=7", "strategy.trial_epochs=4"]
                  + (["strategy.n_startup_trials=3"] if strategy == "bayesian" else []))
    search_black_box(cfg, str(tmp_path / "whole"), evaluate=toy(cfg)[0])
    if where == "after":
        evaluate, calls = toy(cfg)

        def interrupting(genotype, trial_dir, report=None):
            result = evaluate(genotype, trial_dir, report=report)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGINT)
            return result

        with pytest.raises(Interrupted, match=r"after trial \d+"):
            search_black_box(cfg, str(tmp_path / "cut"), evaluate=interrupting)
    else:
        # the first trained trial after the third that the uninterrupted run took past epoch 3
        trained = [r for r in records(tmp_path / "whole") if not r["repeated"]]
        k = next(i for i, r in enumerate(trained) if i >= 3 and (r.get("pruned") or 4) > 3)
        with pytest.raises(Interrupted, match=f"in trial {trained[k]['trial']}"):
            search_black_box(cfg, str(tmp_path / "cut"), evaluate=toy(cfg, interrupt_in=(k + 1, 4))[0])
        cut = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/cut/study.db")
        assert [len(t.intermediate_values) for t in cut.trials if t.state.name == "RUNNING"] == [3]
    search_black_box(cfg_for([f"resume={tmp_path / 'cut'}"]), evaluate=toy(cfg)[0])
    keys = ("trial", "genotype", "value", "best_value", "pruned", "train_tokens", "cum_train_tokens", "study_trial")
    strip = lambda recs: [{k: r.get(k) for k in keys} for r in recs]  # noqa: E731
    assert strip(records(tmp_path / "cut")) == strip(records(tmp_path / "whole"))
    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/cut/study.db")
    assert len(study.trials) == 7 and not [t for t in study.trials if t.state.name in ("RUNNING", "FAIL")]


@pytest.mark.parametrize("overrides,message", [
    (["strategy=random", "strategy.pruner=asha", "strategy.trial_epochs=1"], "nothing would be halved"),
    (["strategy=bayesian", "strategy.pruner=hyperband", "strategy.trial_epochs=1"], "nothing would be halved"),
    (["strategy=random", "strategy.pruner=asha", "strategy.trial_epochs=3", "strategy.min_resource=3"],
     "first rung is at epoch 3"),
    (["strategy=random", "strategy.pruner=median", "strategy.trial_epochs=3"], "valid: asha, hyperband"),
    (["strategy=random", "strategy.pruner=asha", "strategy.trial_epochs=3", "strategy.repeat=true"], "repeat"),
    (["strategy=bayesian", "strategy.pruner=asha", "strategy.trial_epochs=3", "strategy.reduction_factor=1"],
     r"reduction_factor=1 \(must be >= 2\)"),
])
def test_bad_pruner_settings_are_one_line_config_errors(tmp_path, overrides, message):
    cfg = cfg_for(overrides)
    with pytest.raises(ConfigError, match=message) as err:
        search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    assert "\n" not in str(err.value)


def test_the_reporter_never_prunes_at_the_last_epoch():
    """A trial that trained every epoch completes (ASHA's top rung is the maximum resource): the hook reports the
    last epoch's value but never stops there, even when the pruner would; None (not measured) is not reported."""
    from nas.strategies.blackbox import EpochReporter

    class AlwaysPrune:  # an Optuna trial whose pruner prunes at every step
        def __init__(self):
            self.reports = []

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return True

    trial = AlwaysPrune()
    reporter = EpochReporter(trial, last_epoch=3)
    assert reporter.report(3, 1.5) is False and reporter.pruned is None and trial.reports == [(3, 1.5)]
    assert reporter.report(2, None) is False and trial.reports == [(3, 1.5)]
    assert reporter.report(2, 2.0) is True and reporter.pruned == 2


@pytest.mark.slow  # two short trainings (~15 s on a busy 2-core machine)
def test_train_stopped_by_on_epoch_writes_the_metrics_of_the_epochs_it_ran(tmp_path):
    """train()'s per-epoch hook: returning True after epoch 2 of 3 ends the run there with metrics.json written (the
    cost is counted, the trial dir reads back as finished), and it equals a 2-epoch run of the same seed."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import smoke_cfg, write_corpus

    from nas.engine.resume import run_dir_status
    from nas.engine.train import train

    root = write_corpus(tmp_path / "corpus" / "ptb")
    FAST = ("limit_train_batches=3", "limit_eval_batches=2")  # noqa: N806
    seen = []

    def on_epoch(epoch, progress):
        seen.append((epoch, progress["train_tokens"], progress["best_valid_ppl"], len(progress["history"])))
        return epoch == 2

    stopped = train(smoke_cfg(root, "epochs=3", *FAST), run_dir=str(tmp_path / "stopped"), score_test=False,
                    on_epoch=on_epoch)
    two = train(smoke_cfg(root, "epochs=2", *FAST), run_dir=str(tmp_path / "two"), score_test=False)
    assert [s[0] for s in seen] == [1, 2] and stopped["stopped_at_epoch"] == 2 and "stopped_at_epoch" not in two
    assert stopped["train_tokens"] == two["train_tokens"] == seen[-1][1] > seen[0][1] > 0
    assert stopped["best_valid_ppl"] == two["best_valid_ppl"] == seen[-1][2] and len(stopped["history"]) == 2
    assert run_dir_status(str(tmp_path / "stopped")) == "finished"
    assert json.load(open(tmp_path / "stopped" / "metrics.json"))["train_tokens"] == stopped["train_tokens"]
