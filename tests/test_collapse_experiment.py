"""experiments/collapse/run.py: DARTS-ES replayed on a finished search's eigenvalues, and its tables."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from nas.diagnostics import EarlyStopConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("collapse_run", os.path.join(ROOT, "experiments", "collapse", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def history(values):
    g = {"nodes": [[{"op": "identity", "input": 0}]]}
    return [{"epoch": e, "valid_ppl": 100.0 - e, "genotype": g,
             "diagnostics": {"hessian_eigenvalue": v, "hessian_seconds": 2.0, "hessian_matvecs": 10,
                             "parameter_free_genotype": 1.0, "parameter_free_mass": 0.2 + 0.01 * e,
                             "edge_entropy_mean": 1.6, "min_lead": 0.01 * e}} for e, v in enumerate(values, 1)]


def test_es_replay_takes_the_decision_the_search_would_have_taken(tmp_path):
    """The sequence of tests/test_diagnostics.py's hand-worked rule: 1 1 1 1 2 4 (window 3, delta 2, factor 1.5,
    from epoch 2) stops after epoch 6 with epoch 3's genotype -- unless epoch 6 is the last, where the search never
    applies the rule."""
    run = load()
    es = EarlyStopConfig(True, window=3, delta=2, factor=1.5, start_epoch=2)
    h = history([1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 8.0])
    d = run.es_replay(h, es, epochs=7)
    assert (d["stopped_after_epoch"], d["genotype_epoch"]) == (6, 3) and math.isclose(d["ratio"], 7 / 3)
    assert run.es_replay(h[:6], es, epochs=6) is None

    # the tables: each epoch's Hessian share is its Hessian seconds over the epoch's seconds (trials.jsonl)
    run_dir = tmp_path / "seed0"
    run_dir.mkdir()
    with open(run_dir / "trials.jsonl", "w") as f:
        for e in range(1, 8):
            f.write(json.dumps({"epoch": e, "wall_seconds": 40.0}) + "\n")
    metrics = {"history": h, "epochs": 7, "wall_seconds": 280.0, "genotype": h[0]["genotype"],
               "decidedness": {"decided": False, "min_lead": 0.01, "margin": 0.05}}
    rows = run.epoch_rows(0, str(run_dir), metrics)
    assert [r["hessian_share"] for r in rows] == [0.05] * 7
    run.write_outputs(str(tmp_path), "test", rows, {0: d}, {0: metrics})
    text = open(tmp_path / "results.md").read()
    assert "would have stopped after epoch 6" in text and "returned epoch 3's genotype" in text
    assert "| 2 | 98.00 | 1 | 10 | 2.0 | 40 | 5.0% | 100% | 0.220 | 1.6000 | 0.02 |" in text
    assert os.path.getsize(tmp_path / "collapse.png") > 0 and len(open(tmp_path / "results.csv").readlines()) == 8


def test_seeds_run_side_by_side_with_the_cores_shared_out(tmp_path):
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    preset = tmp_path / "tiny.yaml"
    preset.write_text("seeds: [0, 1]\nsearch: [experiment=smoke, epochs=2, limit_train_batches=2, "
                      "limit_eval_batches=2, diagnostics.hessian_max_matvecs=3]\n"
                      "early_stop: {window: 1, delta: 1, factor: 1.3, start_epoch: 1}\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "collapse", "run.py"), "--preset",
                        str(preset), "--out", str(out), "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["seed"], row["epoch"]) for row in rows] == [("0", "1"), ("0", "2"), ("1", "1"), ("1", "2")]
    cores = len(os.sched_getaffinity(0))
    for seed in (0, 1):
        assert f"\nnum_threads: {max(1, cores // 2)}\n" in open(out / f"seed{seed}" / "config.yaml").read()
