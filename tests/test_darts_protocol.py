"""experiments/darts_protocol/run.py: the selection rule, and the smoke preset end to end on real PTB (the table
checked against the run dirs' own metrics.json, skipping of finished stages, resuming of an interrupted one)."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "darts_protocol", "run.py")


def _protocol():
    spec = importlib.util.spec_from_file_location("darts_protocol_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_select_takes_lowest_finite_valid_ppl_first_on_ties():
    select = _protocol().select
    assert select({3: 80.0, 1: 60.0, 2: 70.0}) == 1             # neither the first nor the last listed
    assert select({3: 61.0, 1: 60.5, 2: 60.5}) == 1             # a tie: the earlier in the preset's order
    assert select({1: math.nan, 2: math.inf, 3: 500.0}) == 3    # a diverged run is never selected
    with pytest.raises(ValueError, match="no short retraining has a finite"):
        select({1: math.nan, 2: math.inf})


def _metrics(out, key):
    return json.load(open(os.path.join(out, key, "metrics.json")))


@pytest.mark.slow
def test_smoke_protocol_table_matches_runs_and_resumes(tmp_path):
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    from omegaconf import OmegaConf

    preset = OmegaConf.load(os.path.join(ROOT, "experiments", "darts_protocol", "smoke.yaml"))
    seeds = list(preset.seeds)
    cmd = [sys.executable, RUN, "--preset", "smoke", "--out", str(tmp_path), "--num-threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    # the selection, recomputed from the short retrainings' own metrics.json
    short = {s: _metrics(tmp_path, f"short_retrain/seed{s}")["best_valid_ppl"] for s in seeds}
    best = min(short, key=lambda s: (short[s], seeds.index(s)))
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(row["stage"], row["seed"]) for row in rows] == (
        [(stage, str(s)) for s in seeds for stage in ("search", "short_retrain")]
        + [("full_retrain", str(preset.final_seed))])
    final = rows[-1]
    assert final["cell_of_seed"] == str(best)
    assert [row["cell_of_seed"] for row in rows if row["selected"] == "True"] == [str(best)] * 3
    # every figure of the table is its run's metrics.json figure
    full = _metrics(tmp_path, "full_retrain")
    assert float(final["valid_ppl"]) == full["best_valid_ppl"] and float(final["test_ppl"]) == full["test_ppl"]
    for row in rows[:-1]:
        m = _metrics(tmp_path, f"{row['stage']}/seed{row['seed']}")
        assert float(row["valid_ppl"]) == m["final_valid_ppl" if row["stage"] == "search" else "best_valid_ppl"]
        assert float(row["run_seconds"]) == m["wall_seconds"] and float(row["process_seconds"]) > 0
    # the full retraining trained the selected seed's genotype, with the final seed
    assert full["genotype"] == _metrics(tmp_path, f"search/seed{best}")["genotype"]
    assert OmegaConf.load(tmp_path / "full_retrain" / "config.yaml").seed == preset.final_seed
    table = open(tmp_path / "results.md").read()
    assert f"Selected: seed {best} " in table and f"| {full['test_ppl']:.2f} |" in table

    # a second run finds every stage finished and only rebuilds the table
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("done before") == 2 * len(seeds) + 1 and "$ " not in r.stdout
    assert list(csv.DictReader(open(tmp_path / "results.csv"))) == rows
    # a full retraining cut off before its metrics.json (here: at its very end) is resumed, not redone
    os.remove(tmp_path / "full_retrain" / "metrics.json")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("done before") == 2 * len(seeds) and "resume=" in r.stdout
    assert _metrics(tmp_path, "full_retrain")["test_ppl"] == full["test_ppl"]
