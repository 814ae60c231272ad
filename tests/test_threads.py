"""A run with ``num_threads: null`` takes only the cores other processes leave free (issue 21, item 4).

Expected thread counts are worked out by hand from the rule (a core is free when at least 3/4 of it is idle);
the sampler is checked against a real busy process.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from nas.engine.common import busy_cores_of_others, device_summary, free_core_threads

BUSY_LOOP = "import time\nt = time.time()\nwhile time.time() - t < 30: pass\n"


@pytest.mark.parametrize("default, cpus, busy, expected", [
    (2, 2, 0.0, 2),     # nothing else running: torch's default
    (2, 2, 0.2, 2),     # background noise: 1.8 free cores, both at least 3/4 idle
    (2, 2, 1.0, 1),     # one busy process on 2 cores
    (2, 2, 0.7, 1),     # 1.3 free: the second core is only 30% idle
    (2, 2, 0.4, 1),     # 1.6 free: the second core is 60% idle, under 3/4
    (2, 2, 0.24, 2),    # 1.76 free: both at least 3/4 idle
    (2, 2, 2.0, 1),     # every core taken: still one thread
    (2, 2, 5.0, 1),     # more busy than there are cores (steal time): one thread
    (8, 8, 3.0, 5),
    (4, 16, 2.0, 4),    # never above torch's default
    (2, 2, None, 2),    # unknown (no /proc/stat): torch's default
])
def test_free_core_threads_counts_the_cores_other_processes_leave(default, cpus, busy, expected):
    assert free_core_threads(default, cpus, busy) == expected


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_busy_cores_of_others_sees_a_busy_process_and_not_its_own_sleep():
    quiet = busy_cores_of_others()
    if quiet is not None and quiet > len(os.sched_getaffinity(0)) - 1.2:
        pytest.skip(f"other processes keep {quiet:.1f} cores busy already: no free core to see one more busy one on")
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # past its start-up
        busy = busy_cores_of_others()
    finally:
        proc.kill()
        proc.wait()
    assert quiet is not None and busy is not None
    assert busy - quiet > 0.6, (quiet, busy)  # one core's worth more, measured over 0.2 s at 10 ms resolution
    assert busy < quiet + 1.6, (quiet, busy)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_a_run_beside_a_busy_process_runs_on_the_free_cores_and_says_so():
    """configure_runtime (what search.py and train.py call) in a fresh process, beside one busy loop."""
    probe = ("import logging, sys, torch\nlogging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
             "from omegaconf import OmegaConf\nfrom nas.engine.common import configure_runtime\n"
             "default = torch.get_num_threads()\n"
             "configure_runtime(OmegaConf.create({'num_threads': None, 'device': 'cpu', 'tune_cpu_allocator': False}))\n"
             "print('THREADS', default, torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    finally:
        busy.kill()
        busy.wait()
    assert r.returncode == 0, r.stderr
    default, threads = map(int, r.stdout.split("THREADS")[-1].split())
    cpus = len(os.sched_getaffinity(0))
    if default == 1:
        pytest.skip("torch runs on one thread here already")
    assert threads == max(1, min(default, cpus - 1))
    if threads < default:
        assert "busy with other processes: running on" in r.stdout
    # with OMP_NUM_THREADS given, the user's count stands
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)
        r = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_NUM_THREADS": str(default)},
                           capture_output=True, text=True, timeout=120)
    finally:
        busy.kill()
        busy.wait()
    assert r.stdout.split("THREADS")[-1].split() == [str(default), str(default)]


def test_the_start_log_line_gives_a_cpu_runs_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert device_summary(torch.device("cpu")) == "cpu (1 thread)"
        torch.set_num_threads(2)
        assert device_summary(torch.device("cpu")) == "cpu (2 threads)"
    finally:
        torch.set_num_threads(before)
    assert device_summary(torch.device("cuda", 1)) == "cuda:1"


class _Machine:
    """A fake /proc/stat and process clock: ``advance(wall, machine_busy, own)`` in seconds (busy: every process's
    CPU seconds over the interval, own: this process's)."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0.0, 0.0

    def advance(self, wall, machine_busy, own):
        self.t += wall
        self.busy += machine_busy
        self.own += own

    def ticks(self):
        clk = os.sysconf("SC_CLK_TCK")
        return round(self.busy * clk), round((self.t * 2) * clk)  # (busy, total) of a 2-core machine


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_runs_thread_count_follows_a_neighbour_that_comes_and_goes(threads_restored, caplog):
    """2 cores, torch's default 2 threads, a check due every 30 s.  Figures worked out by hand: a busy neighbour
    beside 2 spinning threads gets 2/3 of a core (3 runnable threads on 2 cores), the run 4/3 of each second."""
    import logging

    from nas.engine.common import FreeCoreWatch

    torch.set_num_threads(2)
    m = _Machine()
    watch = FreeCoreWatch(2, 2, every=30.0, clock=lambda: m.t, ticks=m.ticks, own=lambda: m.own)
    m.advance(20, 40, 40)  # alone, 2 threads busy
    assert watch.check() is None and torch.get_num_threads() == 2  # not due yet
    m.advance(10, 20, 20)
    assert watch.check() is None and torch.get_num_threads() == 2  # due; nobody else: 0 busy
    m.advance(30, 60, 40)  # the neighbour came: machine 2 cores busy, the run 4/3 -> others 2/3 of a core
    with caplog.at_level(logging.INFO):
        assert watch.check() == 1 and torch.get_num_threads() == 1
    assert "0.7 of 2 cores were busy with other processes over the last 30 s: running on 1 thread(s) now, not 2" \
        in caplog.text
    m.advance(30, 60, 30)  # 1 thread beside it: others 1 core -> 1 free, no change
    assert watch.check() is None and torch.get_num_threads() == 1
    m.advance(30, 30, 30)  # the neighbour left: only the run's own core busy
    assert watch.check() == 2 and torch.get_num_threads() == 2
    # a compiled run keeps its count (a new one would compile again), and says so once; interval 0: never re-checked
    watch.compiled = True
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            m.advance(30, 60, 40)
            assert watch.check() is None and torch.get_num_threads() == 2
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "this compiled run keeps its 2 thread(s)" in caplog.text and "Give num_threads=1" in caplog.text
    watch.restart(0.0)
    m.advance(300, 600, 400)
    assert watch.check() is None and torch.get_num_threads() == 2
    watch.restart(30.0)  # a new run, re-checked again (compiled reset): the whole 300 s since the last check
    assert watch.check() == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_a_run_goes_down_to_the_free_cores_when_a_neighbour_starts_after_it(tmp_path, corpus):
    """search.py (eager, smoke preset, more epochs) started alone; a busy loop per core but one starts after its
    first log line; with a re-check every second the run drops to the free cores and logs it."""
    cpus = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "search.py"),
                            "experiment=smoke", f"dataset.root={corpus}", "epochs=200", "progress=false",
                            "threads_recheck_seconds=1", f"hydra.run.dir={tmp_path}/run"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    busy, lines = [], []
    try:
        for line in run.stdout:
            lines.append(line)
            if "device cpu (" in line:
                break
        started = int(lines[-1].split("device cpu (")[1].split()[0])
        if started < 2:
            pytest.skip(f"the run started on {started} thread(s): the machine had no second free core")
        busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(cpus - 1)]
        first_after = len(lines)
        deadline = time.time() + 25
        for line in run.stdout:
            lines.append(line)
            if "running on 1 thread(s) now" in line or time.time() > deadline:
                break
    finally:
        run.kill()
        run.wait()
        for p in busy:
            p.kill()
            p.wait()
    assert any("busy with other processes over the last" in line and "running on 1 thread(s) now, not" in line
               for line in lines[first_after:]), "".join(lines[-20:])


def test_a_run_with_a_thread_count_of_its_own_is_not_followed_and_a_negative_interval_is_refused(monkeypatch):
    """In one process (a black-box search's trials, a notebook): a later run that gives num_threads= keeps it; the
    watch started by an earlier num_threads: null run is paused for it and resumed by the next null run."""
    from omegaconf import OmegaConf

    import nas.engine.common as common
    from nas.errors import ConfigError

    watch = common.FreeCoreWatch(2, 2, every=30.0, clock=lambda: 0.0, ticks=lambda: (0, 0), own=lambda: 0.0)
    monkeypatch.setattr(common, "_WATCH", watch)
    monkeypatch.setattr(common, "fit_threads_to_free_cores", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    base = {"device": "cpu", "tune_cpu_allocator": False}
    try:
        common.configure_runtime(OmegaConf.create({**base, "num_threads": 1, "threads_recheck_seconds": 30}))
        assert watch.every == 0.0 and watch.check() is None
        common.configure_runtime(OmegaConf.create({**base, "num_threads": None, "threads_recheck_seconds": 7}))
        assert watch.every == 7.0
        with pytest.raises(ConfigError, match="threads_recheck_seconds must be >= 0"):
            common.configure_runtime(OmegaConf.create({**base, "num_threads": None, "threads_recheck_seconds": -1}))
    finally:
        torch.set_num_threads(before)
