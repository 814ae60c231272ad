"""experiments/benchmark.py's shared-cores mode (issue 21, item 4): its bookkeeping, not speed (speed is shown by
running the benchmark, never by a timed test)."""
import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "experiments", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_alternates_alone_and_busy_and_reports_the_ratio_of_medians(monkeypatch):
    bench = load_benchmark()
    calls = []
    alone, beside = iter([1.0, 1.2, 0.9]), iter([2.0, 5.0, 2.6])

    def fake(spec, args, busy=0):
        calls.append((spec, busy))
        return {"seconds_per_step": next(beside if busy else alone), "threads": 1 if busy else 2}

    monkeypatch.setattr(bench, "_in_subprocess", fake)
    out = bench.shared_cores(argparse.Namespace(shared=3, cases=["search_small_first"], busy_kind="loop"))
    assert [b for _, b in calls] == [0, 1, 0, 1, 0, 1]
    assert all(spec == list(bench.CASES["search_small_first"]) for spec, _ in calls)
    case = out["cases"]["search_small_first"]
    assert case["seconds_per_step"] == {"alone": [1.0, 1.2, 0.9], "busy": [2.0, 5.0, 2.6]}
    assert case["threads"] == {"alone": [2, 2, 2], "busy": [1, 1, 1]}
    assert (case["median_alone"], case["median_busy"], case["busy_over_alone"]) == (1.0, 2.6, 2.6)
    assert out["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")  # what the cases inherit


def test_the_busy_process_runs_during_the_case_and_is_gone_after(monkeypatch):
    bench = load_benchmark()
    started, seen = [], {}
    real_popen = subprocess.Popen

    def popen(cmd, *a, **k):
        p = real_popen(cmd, *a, **k)
        real_wait = p.wait  # a benchmark that waits on a busy process it did not kill fails here, not hangs
        p.wait = lambda timeout=None: real_wait(timeout=30 if timeout is None else timeout)
        started.append((cmd, p))
        return p

    def run(cmd, *a, **k):  # instead of the case: look at the busy process while "the case" runs
        seen["alive"] = [p.poll() is None for _, p in started]
        return subprocess.CompletedProcess(cmd, 0, stdout='{"seconds_per_step": 1.0}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    monkeypatch.setattr(bench.subprocess, "run", run)
    args = argparse.Namespace(device="cpu", steps=1, warmup=0, compile=False, busy_kind="loop", matmul_dtype=None)
    try:
        assert bench._in_subprocess(["search", 64, 64, 8, False], args, busy=1) == {"seconds_per_step": 1.0}
        assert seen["alive"] == [True] and started[0][0] == [sys.executable, "-c", bench.BUSY["loop"]]
        assert started[0][1].poll() is not None  # killed and reaped after the case
    finally:
        for _, p in started:  # never leave a busy loop behind, whatever failed
            p.kill()
            p.communicate()
    started.clear()
    bench._in_subprocess(["search", 64, 64, 8, False], args, busy=0)
    assert started == [] and seen["alive"] == []


def test_the_case_process_gets_the_matmul_dtype(monkeypatch):
    bench = load_benchmark()
    cmds = []

    def run(cmd, *a, **k):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"seconds_per_step": 1.0}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    for dtype in (None, "bfloat16"):
        args = argparse.Namespace(device="cpu", steps=1, warmup=0, compile=False, busy_kind="loop", matmul_dtype=dtype)
        bench._in_subprocess(["retrain", 128, 64, 8, False], args)
    assert "--matmul-dtype" not in cmds[0]
    assert cmds[1][cmds[1].index("--matmul-dtype") + 1] == "bfloat16"



def test_a_failed_case_fails_the_run_after_the_json(monkeypatch, capsys):
    bench = load_benchmark()
    results = iter([{"seconds_per_step": 1.0}, {"error": "boom"}])
    monkeypatch.setattr(bench, "_in_subprocess", lambda spec, args, busy=0: next(results))
    with pytest.raises(SystemExit, match="1 case\\(s\\) failed: search_small_second"):
        bench.main(["--cases", "search_small_first", "search_small_second", "--no-sweep"])
    assert '"error": "boom"' in capsys.readouterr().out  # the JSON is still printed


def test_matmul_dtype_on_hardware_without_it_fails_once_up_front(monkeypatch):
    import torch

    bench = load_benchmark()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(bench, "_in_subprocess", lambda *a, **k: pytest.fail("no case should start"))
    with pytest.raises(SystemExit, match="--matmul-dtype bfloat16: .*no AVX512-BF16.*leave out --matmul-dtype"):
        bench.main(["--device", "cpu", "--matmul-dtype", "bfloat16", "--cases", "retrain_darts_v2_128", "--no-sweep"])
