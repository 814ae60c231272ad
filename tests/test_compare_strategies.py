"""experiments/compare_strategies/run.py: its statistics and HParams view on numbers chosen here, and end to end on
its smoke preset (real PTB)."""
import csv
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "compare_strategies", "run.py")


def load_run():
    spec = importlib.util.spec_from_file_location("compare_strategies_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# retrained test perplexities chosen for the test: unequal seeds and spreads (so Welch's and Student's p differ),
# five seeds for one strategy (so the bootstrap interval is not just the range of three), one single-seed strategy
TEST_PPL = {"darts_1st": [170.1, 171.9, 169.5], "random": [176.0, 182.3, 179.1],
            "bayesian": [174.2, 181.0, 169.8, 177.5, 172.6], "gdas": [175.0]}


def make_rows(test_ppl=TEST_PPL):
    rows = []
    for strategy, values in test_ppl.items():
        for seed, v in enumerate(values):  # valid differs from test by a seed-dependent amount: a mix-up shows
            rows.append({"strategy": strategy, "seed": seed, "valid": v + 3.0 + seed ** 2, "test": v,
                         "test_accuracy": 0.2 + seed / 100, "test_cross_entropy": math.log(v), "params": 1_000_000 + seed,
                         "search_seconds": 100.0 + seed, "search_tokens": 929_472, "evaluations": 1 + seed,
                         "retrain_seconds": 300.0 + seed, "genotype": "[]"})
    return rows


def welch_by_hand(a, b):
    """Welch's t statistic, Welch-Satterthwaite degrees of freedom and two-sided p (Welch 1947), written out."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, 2 * stats.t.sf(abs(t), df)


def test_summary_has_bootstrap_ci_and_welch_test_against_random(tmp_path):
    run = load_run()
    run.write_tables(make_rows(), str(tmp_path), metric="perplexity")
    summary = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert list(summary) == list(TEST_PPL)
    table = open(tmp_path / "results.md").read().splitlines()
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    assert header[2:7] == ["retrained valid perplexity", "retrained test perplexity",
                           "test perplexity: 95% CI of the mean", "Δ test vs random", "p vs random (Welch)"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in table[2:]
             if line.startswith("| ")}
    base = TEST_PPL["random"]
    for strategy, values in TEST_PPL.items():
        s, c = summary[strategy], cells[strategy]
        assert int(s["seeds"]) == len(values) and c[1] == str(len(values))
        assert float(s["test_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
        assert c[3] == f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0:.2f}"
        if len(values) == 1:
            assert s["test_ci_low"] == s["test_ci_high"] == "" and c[4] == "— (1 seed: no CI)"
        else:  # the documented settings: 95%, percentile, 9999 resamples, rng 0
            ci = stats.bootstrap((np.array(values),), np.mean, confidence_level=0.95, n_resamples=9999,
                                 method="percentile", rng=0).confidence_interval
            assert (float(s["test_ci_low"]), float(s["test_ci_high"])) == pytest.approx((ci.low, ci.high), rel=1e-12)
            assert c[4] == f"[{ci.low:.2f}, {ci.high:.2f}]"
            # the percentile interval of a mean lies within the seeds' range (up to the rounding of a mean of equal values)
            assert min(values) - 1e-9 <= ci.low < statistics.fmean(values) < ci.high <= max(values) + 1e-9
        if strategy == "random":
            assert c[5] == c[6] == "—" and s["test_diff"] == s["test_p"] == ""
            continue
        diff = statistics.fmean(values) - statistics.fmean(base)
        assert float(s["test_diff"]) == pytest.approx(diff, rel=1e-12) and c[5] == f"{diff:+.2f}"
        if len(values) == 1:
            assert s["test_p"] == "" and c[6] == "— (< 2 seeds)"
            continue
        t, df, p = welch_by_hand(values, base)
        assert (float(s["welch_t"]), float(s["welch_df"]), float(s["test_p"])) == pytest.approx((t, df, p), rel=1e-9)
        assert float(s["test_p"]) == pytest.approx(stats.ttest_ind(values, base, equal_var=False).pvalue, rel=1e-12)
        assert c[6] == f"{p:.3g}"
    # the figures chosen make the test's choice visible: Student's pooled t-test would give other p-values
    assert abs(stats.ttest_ind(TEST_PPL["bayesian"], base).pvalue - float(summary["bayesian"]["test_p"])) > 1e-3
    assert float(summary["darts_1st"]["test_p"]) < 0.05 < float(summary["bayesian"]["test_p"])


def test_summary_without_the_baseline_says_so(tmp_path):
    run = load_run()
    run.write_tables(make_rows({"darts_1st": [170.0, 171.0], "bayesian": [172.0, 175.0]}), str(tmp_path),
                     metric="perplexity")
    line = next(x for x in open(tmp_path / "results.md") if x.startswith("| darts_1st |"))
    assert [c.strip() for c in line.split("|")[1:-1]][5:7] == ["— (no random)", "—"]


def write_search_configs(out, strategies, seeds):
    """A config.yaml per search run, as search.py writes it (the keys write_hparams reads)."""
    for strategy, cfg in strategies.items():
        for seed in seeds:
            folder = out / "search" / strategy / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "config.yaml").write_text(json.dumps({"seed": seed, **cfg}))  # JSON is YAML


def test_hparams_view_holds_every_runs_hparams_and_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    run = load_run()
    common = {"epochs": 1, "batch_size": 64, "space": {"nhid": 64}}
    write_search_configs(tmp_path, {
        "darts_1st": {**common, "strategy": {"name": "darts", "unrolled": False}},
        "random": {**common, "strategy": {"name": "random", "budget_tokens": 929589, "trial_limit_train_batches": 60}},
    }, seeds=(0, 1, 2))
    preset = {"darts_1st": ["strategy=darts", "strategy.unrolled=false"],
              "random": ["strategy=random", "strategy.budget_tokens=929589", "strategy.trial_limit_train_batches=60"]}
    rows = [r for r in make_rows() if r["strategy"] in preset]
    for _ in range(2):  # written again (a rerun of the comparison): still one record per run
        root = run.write_hparams(rows, str(tmp_path), preset)
    assert sorted(os.listdir(root)) == sorted(f"{s}_seed{k}" for s in preset for k in (0, 1, 2))
    keys = {"strategy", "seed", "strategy.name", "epochs", "space.nhid", "batch_size", "strategy.unrolled",
            "strategy.budget_tokens", "strategy.trial_limit_train_batches"}
    metrics = {"retrained/valid": "valid", "retrained/test": "test", "retrained/test_accuracy": "test_accuracy",
               "retrained/test_cross_entropy": "test_cross_entropy", "retrained/params": "params",
               "search/wall_seconds": "search_seconds", "search/train_tokens": "search_tokens",
               "search/evaluations": "evaluations", "retrain/wall_seconds": "retrain_seconds"}
    for r in rows:
        acc = EventAccumulator(os.path.join(root, f"{r['strategy']}_seed{r['seed']}"))
        acc.Reload()
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
        assert {h.name for h in experiment.hparam_infos} == keys  # every run: the same columns
        assert {m.name.tag for m in experiment.metric_infos} == set(metrics)
        hp = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]).hparams
        assert hp["strategy"].string_value == r["strategy"] and hp["seed"].number_value == r["seed"]
        assert hp["epochs"].number_value == 1 and hp["space.nhid"].number_value == 64
        if r["strategy"] == "darts_1st":
            assert hp["strategy.name"].string_value == "darts" and hp["strategy.unrolled"].string_value == "False"
            assert hp["strategy.budget_tokens"].string_value == "—"  # a key the run's config lacks
        else:
            assert hp["strategy.budget_tokens"].string_value == "929589"
            assert hp["strategy.trial_limit_train_batches"].string_value == "60"
        for tag, key in metrics.items():
            events = acc.Scalars(tag)
            assert len(events) == 1 and events[0].value == pytest.approx(r[key], rel=1e-6), (r["strategy"], tag)


@pytest.mark.slow
def test_comparison_pipeline_writes_table_and_plot_and_resumes(tmp_path):
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    # one strategy of each kind (one-shot, black-box; random: the baseline of the table's test): the pipeline is
    # the same for all, and every strategy's
    # smoke search is tested on its own (tests/test_blackbox.py); 8 runs instead of 20 keep the suite near 20 minutes
    strategies = ["darts_1st", "random"]
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare_strategies", "run.py"), "--preset", "smoke",
           "--out", str(tmp_path), "--strategies", *strategies, "--seeds", "0", "1", "--jobs", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(row["strategy"], row["seed"]) for row in rows] == [(s, str(seed)) for s in strategies for seed in (0, 1)]
    assert all(float(row["search_tokens"]) > 0 for row in rows)
    for row in rows:  # each row reports its own runs: the retrain's figures, the search's genotype
        where = os.path.join(row["strategy"], f"seed{row['seed']}")
        trained = json.load(open(tmp_path / "train" / where / "metrics.json"))
        searched = json.load(open(tmp_path / "search" / where / "genotype.json"))
        assert float(row["test"]) == trained["test_ppl"] and float(row["valid"]) == trained["best_valid_ppl"], where
        assert (float(row["test_accuracy"]), float(row["test_cross_entropy"]), int(row["params"])) == (
            trained["test_accuracy"], trained["test_cross_entropy"], trained["params"]), where
        assert json.loads(row["genotype"]) == searched["nodes"] == trained["genotype"]["nodes"], where
    table = open(tmp_path / "results.md").read()
    assert all(f"| {s} | 2 |" in table for s in strategies)
    assert "| test accuracy | test cross-entropy | params |" in table.splitlines()[0]
    for s in strategies:  # the mean over seeds of the three evaluations, in the strategy's row
        rs = [row for row in rows if row["strategy"] == s]
        line = next(line for line in table.splitlines() if line.startswith(f"| {s} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[7].startswith(f"{sum(float(r['test_accuracy']) for r in rs) / 2:.4f} ± ")
        assert cells[8].startswith(f"{sum(float(r['test_cross_entropy']) for r in rs) / 2:.4f} ± ")
        assert cells[9] == f"{sum(int(r['params']) for r in rs) / 2:,.0f}"
        assert cells[4].startswith("[") and (cells[5:7] == ["—", "—"] if s == "random" else cells[5][0] in "+-")
    summary = {row["strategy"]: row for row in csv.DictReader(open(tmp_path / "summary.csv"))}
    assert float(summary["darts_1st"]["test_diff"]) == pytest.approx(
        sum(float(r["test"]) for r in rows if r["strategy"] == "darts_1st") / 2
        - sum(float(r["test"]) for r in rows if r["strategy"] == "random") / 2, rel=1e-9)
    assert sorted(os.listdir(tmp_path / "tb_hparams")) == sorted(f"{s}_seed{k}" for s in strategies for k in (0, 1))
    assert os.path.getsize(tmp_path / "best_so_far.png") > 5000
    cores = len(os.sched_getaffinity(0))  # --jobs 2 without --num-threads: every run gets its share of the cores
    for kind in ("search", "train"):
        cfg = open(tmp_path / kind / "random" / "seed1" / "config.yaml").read()
        assert f"\nnum_threads: {max(1, cores // 2)}\n" in cfg, kind
    # a second run finds every run finished and only rebuilds the table
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("done before") == 2 * len(strategies) * 2 and "$ " not in r.stdout
    # a subset (--strategies / --seeds) into the same folder keeps the other finished runs in the table
    r = subprocess.run(cmd[:cmd.index("--strategies")] + ["--strategies", "random", "--seeds", "0", "--jobs", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "the table also holds 3 finished runs" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert list(csv.DictReader(open(tmp_path / "results.csv"))) == rows
    # a run cut off before it wrote metrics.json (here: at its very end) is resumed, not refused or redone
    before = {(row["strategy"], row["seed"]): row["test"] for row in rows}
    os.remove(tmp_path / "train" / "random" / "seed0" / "metrics.json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("done before") == 2 * len(strategies) * 2 - 1 and "resume=" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(row["strategy"], row["seed"]): row["test"] for row in rows} == before


def test_jobs_share_the_cores_out_unless_num_threads_is_given():
    share = load_run().threads_per_job
    # 2 jobs on 2 cores: 1 thread each, not torch's default of 2 each (4 busy threads on 2 cores)
    assert [share(2, cores=2), share(2, cores=4), share(3, cores=8), share(4, cores=2)] == [1, 2, 2, 1]
    assert share(1, cores=2) is None  # one job: torch's own default


NINE = ["darts_1st", "darts_2nd", "random_ws", "gdas", "random", "bayesian", "evolution", "random_asha",
        "bayesian_hyperband"]


@pytest.mark.parametrize("name", ["cpu3", "paper"])
def test_presets_run_every_strategy_with_three_seeds_at_one_token_budget(name):
    preset = load_run().load_preset(name)
    assert len(set(preset["seeds"])) >= 3 and sorted(preset["strategies"]) == sorted(NINE)

    def settings(strategy):
        return dict(o.split("=", 1) for o in preset["strategies"][strategy])

    def unpruned_trial(s):  # training batches of a trial that is not stopped early
        epochs, limit = int(s.get("strategy.trial_epochs", 1)), s.get("strategy.trial_limit_train_batches")
        return epochs * int(limit) if limit else f"{epochs} whole epochs"

    random = settings("random")
    for strategy in ("bayesian", "evolution", "random_asha", "bayesian_hyperband"):
        s = settings(strategy)  # the black-box ones: random's token budget, and unpruned trials as long as its
        assert s["strategy.budget_tokens"] == random["strategy.budget_tokens"], strategy
        assert unpruned_trial(s) == unpruned_trial(random), strategy
    for strategy, kind in (("random_asha", "random"), ("bayesian_hyperband", "bayesian")):
        s = settings(strategy)  # multi-fidelity: halving needs more than one epoch per trial
        assert s["strategy"] == kind and s["strategy.pruner"] in ("asha", "hyperband")
        assert int(s["strategy.trial_epochs"]) > 1, strategy


def test_an_unknown_baseline_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_run().main(["--preset", "smoke", "--baseline", "randm", "--out", str(tmp_path / "cmp")])
    assert exit_.value.code == 2 and "--baseline 'randm' is not a strategy of the preset" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    with pytest.raises(SystemExit) as exit_:  # an unknown --strategies name: refused, not silently dropped
        load_run().main(["--preset", "smoke", "--strategies", "darts_1", "random", "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--strategies darts_1: not in preset 'smoke'" in err and "darts_1st" in err
    assert not (tmp_path / "cmp").exists()


def test_stopping_interrupts_the_runs_under_way_and_starts_no_new_one(tmp_path):
    """``stop_runs`` (Ctrl-C or a failed run with ``--jobs`` > 1) sends SIGINT to the runs under way and ``run`` then
    starts nothing (before, the other worker thread started its next search after a Ctrl-C and the script waited for
    it).  A stand-in script that sleeps until SIGINT plays the search."""
    import threading
    import time

    mod = load_run()
    script = tmp_path / "sleeper.py"
    # its own SIGINT handler, as search.py and train.py install one (a process started in the background, e.g. a CI
    # job, inherits SIGINT ignored, and Python then raises no KeyboardInterrupt)
    # it says when it is ready: a SIGINT that lands during the interpreter's start-up (a loaded CI machine) is not
    # the case under test
    ready = tmp_path / "ready"
    script.write_text("import pathlib, signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(3))\n"
                      f"pathlib.Path({str(ready)!r}).write_text('1')\ntime.sleep(60)\n")
    mod.ROOT = str(tmp_path)
    outcome = {}

    def worker():
        try:
            mod.run("sleeper.py", [], str(tmp_path / "a"), str(tmp_path / "logs" / "a.log"))
        except SystemExit as err:
            outcome["exit"] = str(err)

    t = threading.Thread(target=worker)
    t.start()
    deadline = time.time() + 20
    while not (mod._RUNNING and ready.exists()) and time.time() < deadline:
        time.sleep(0.05)
    start = time.time()
    mod.stop_runs()
    t.join(timeout=20)
    assert not t.is_alive() and time.time() - start < 10
    assert "failed (exit 3)" in outcome["exit"]  # it was interrupted, not left to sleep its 60 s
    with pytest.raises(SystemExit, match="not started"):
        mod.run("sleeper.py", [], str(tmp_path / "b"), str(tmp_path / "logs" / "b.log"))
    assert not (tmp_path / "b").exists()


def test_a_signal_to_a_comparison_started_in_the_background_stops_its_run(tmp_path):
    """A comparison started in the background (``nohup ... &`` from a script) inherits SIGINT ignored: ``kill -INT``
    once did nothing.  With its handlers installed, SIGINT to it (here: this process, running ``run`` with
    ``--jobs 1``) raises KeyboardInterrupt, and the run under way is stopped too, not left orphaned."""
    import signal
    import threading
    import time

    mod = load_run()
    script = tmp_path / "sleeper.py"
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    script.write_text("import pathlib, signal, sys, time\n"
                      f"signal.signal(signal.SIGINT, lambda *a: (pathlib.Path({str(stopped)!r}).write_text('1'), "
                      "sys.exit(3)))\n"
                      f"pathlib.Path({str(ready)!r}).write_text('1')\ntime.sleep(60)\n")
    mod.ROOT = str(tmp_path)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        mod.install_stop_handlers()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

        def interrupt():
            deadline = time.time() + 20
            while not ready.exists() and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=interrupt, daemon=True).start()
        start = time.time()
        with pytest.raises(KeyboardInterrupt):
            mod.run("sleeper.py", [], str(tmp_path / "a"), str(tmp_path / "logs" / "a.log"))
        assert stopped.exists() and time.time() - start < 15  # the run got its SIGINT and ended before run() did
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_a_stopped_comparison_ends_with_one_line_not_a_traceback(capsys):
    def interrupted():
        raise KeyboardInterrupt("signal 15")

    with pytest.raises(SystemExit) as exit_:
        load_run().main_stopping_cleanly(interrupted)
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the same command resumes" in err and "Traceback" not in err
