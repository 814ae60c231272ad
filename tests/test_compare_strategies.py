"""experiments/compare_strategies/run.py end to end on its smoke preset (real PTB)."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_comparison_pipeline_writes_table_and_plot_and_resumes(tmp_path):
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    # one strategy of each kind (one-shot, black-box): the pipeline is the same for all five, and every strategy's
    # smoke search is tested on its own (tests/test_blackbox.py); 8 runs instead of 20 keep the suite near 20 minutes
    strategies = ["darts_1st", "bayesian"]
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "compare_strategies", "run.py"), "--preset", "smoke",
           "--out", str(tmp_path), "--strategies", *strategies]
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
        assert cells[4].startswith(f"{sum(float(r['test_accuracy']) for r in rs) / 2:.4f} ± ")
        assert cells[5].startswith(f"{sum(float(r['test_cross_entropy']) for r in rs) / 2:.4f} ± ")
        assert cells[6] == f"{sum(int(r['params']) for r in rs) / 2:,.0f}"
    assert os.path.getsize(tmp_path / "best_so_far.png") > 5000
    # a second run finds every run finished and only rebuilds the table
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("done before") == 2 * len(strategies) * 2 and "$ " not in r.stdout
    # a run cut off before it wrote metrics.json (here: at its very end) is resumed, not refused or redone
    before = {(row["strategy"], row["seed"]): row["test"] for row in rows}
    os.remove(tmp_path / "train" / "bayesian" / "seed0" / "metrics.json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("done before") == 2 * len(strategies) * 2 - 1 and "resume=" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(row["strategy"], row["seed"]): row["test"] for row in rows} == before
