"""Several black-box search workers on one Optuna study (README: Scaling out), as separate ``search.py`` processes:
on a SQLite file (one machine) and on a real PostgreSQL server (many machines; the ``postgres_url`` fixture starts
one from the machine's packages).  One worker is killed (SIGKILL) in the middle of a trial: its trial is marked
failed through the missing heartbeats, and the other worker completes the study's budget, training no genotype
twice.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from nas.genotype import Genotype
from nas.spaces.darts_rnn import DartsRNNConfig, DartsRNNSpace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIALS = 6
pytestmark = pytest.mark.slow


def worker(run_dir, storage, corpus, study, strategy="bayesian", trials=TRIALS, epochs=12, extra=(), out=None,
           grace=3):
    """A ``search.py`` worker process on the shared study (stdout and stderr together: a pipe, or the file ``out``);
    heartbeats every second, a trial without one for ``grace`` seconds is failed by the next worker that looks."""
    args = ["experiment=smoke", f"dataset.root={corpus}", "progress=false", "num_threads=1",
            f"strategy={strategy}", f"strategy.trials={trials}", f"strategy.storage={storage}",
            f"strategy.study_name={study}", f"strategy.trial_epochs={epochs}", "strategy.heartbeat_interval=1",
            f"strategy.grace_period={grace}", f"hydra.run.dir={run_dir}", *extra]
    if strategy == "bayesian":
        args.append("strategy.n_startup_trials=2")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "search.py"), *args],
                            stdout=subprocess.PIPE if out is None else out, stderr=subprocess.STDOUT, text=True)


def training_trial(run_dir, at_least):
    """The dir of a trial being trained now (started, no metrics.json yet) with number >= ``at_least``, or None."""
    dirs = sorted(glob.glob(os.path.join(run_dir, "trials", "*")))
    if len(dirs) >= at_least and os.path.isfile(os.path.join(dirs[-1], "checkpoint.pt")) \
            and not os.path.isfile(os.path.join(dirs[-1], "metrics.json")):
        return dirs[-1]
    return None


def trained(run_dir):
    """Genotypes (JSON text) this worker trained, from its trials.jsonl (repeats are reported, not trained)."""
    path = os.path.join(run_dir, "trials.jsonl")
    if not os.path.isfile(path):
        return []
    records = [json.loads(line) for line in open(path)]
    return [json.dumps(r["genotype"], sort_keys=True) for r in records if not r.get("repeated")]


@pytest.mark.parametrize("backend, strategy", [("sqlite", "bayesian"), ("postgresql", "bayesian"),
                                               ("sqlite", "random")])
def test_a_killed_worker_leaves_a_failed_trial_and_the_study_completes(tmp_path, corpus, backend, strategy,
                                                                       request):
    storage = (f"sqlite:///{tmp_path}/study.db" if backend == "sqlite" else request.getfixturevalue("postgres_url"))
    study = f"workers_{backend}_{strategy}_{os.getpid()}"
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = worker(a_dir, storage, corpus, study, strategy)
    b = worker(b_dir, storage, corpus, study, strategy)  # at once: creating one study together is safe (r04)
    killed_dir, deadline = None, time.time() + 300
    while killed_dir is None and time.time() < deadline and a.poll() is None:
        killed_dir = training_trial(a_dir, 2)
        time.sleep(0.02)
    assert killed_dir is not None, f"worker A never trained a 2nd trial: {a.communicate()[0][-3000:]}"
    a.send_signal(signal.SIGKILL)  # dies mid-trial: nothing is told to the study
    a.wait()
    out_b, _ = b.communicate(timeout=600)
    assert b.returncode == 0, out_b[-3000:]

    s = optuna.load_study(study_name=study, storage=storage)
    states = [t.state for t in s.trials]
    # a live trial whose heartbeat a busy machine delayed past the grace period is failed too, but its result is
    # kept by a replacing COMPLETE trial (r03); random search marks a simultaneous duplicate draw FAIL too: neither
    # is a lost trial, nor is a trial asked when other workers had just filled the budget (over_budget), so the
    # count does not depend on the machine's load
    replaced = {t.user_attrs["replaces"] for t in s.trials if "replaces" in t.user_attrs}
    failed = [t for t in s.trials if t.state == optuna.trial.TrialState.FAIL and t.number not in replaced
              and "duplicate_of" not in t.user_attrs and "over_budget" not in t.user_attrs]
    # the killed trial is marked failed (not left RUNNING), and it is the genotype A was training
    assert optuna.trial.TrialState.RUNNING not in states
    assert len(failed) == 1, states
    space = DartsRNNSpace(DartsRNNConfig(emsize=16, nhid=16))
    assert space.from_decisions(failed[0].params) == Genotype.load(os.path.join(killed_dir, "candidate.json"))
    assert f"trial {failed[0].number} of study {study!r} sent no heartbeat" in out_b
    # together the workers completed the study's budget; no genotype was trained twice
    assert states.count(optuna.trial.TrialState.COMPLETE) == TRIALS
    both = trained(a_dir) + trained(b_dir)
    assert len(both) == len(set(both)), both
    assert len(trained(b_dir)) >= 1 and len(trained(a_dir)) >= 1
    # each record names its trial of the study
    complete = {t.number for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE}
    numbers = [json.loads(line)["study_trial"] for line in open(b_dir / "trials.jsonl")]
    assert numbers and set(numbers) <= complete
    # B's result is the study's best, whichever worker trained it
    metrics = json.load(open(b_dir / "metrics.json"))
    assert metrics["best_valid_ppl"] == s.best_value and metrics["shared_study"] == study
    assert Genotype.load(b_dir / "genotype.json") == space.from_decisions(s.best_params)


def test_multirun_with_the_workers_launcher_shares_one_study(tmp_path, corpus):
    """``python search.py -m hydra/launcher=workers worker=0,1 ...``: Hydra's joblib launcher runs two worker
    processes at once on one study; together they train the budget, each genotype once."""
    storage = f"sqlite:///{tmp_path}/study.db"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "search.py"), "-m", "hydra/launcher=workers",
                          "worker=0,1", "strategy=bayesian", f"strategy.storage={storage}", f"strategy.trials={TRIALS}",
                          "experiment=smoke", f"dataset.root={corpus}", "progress=false", "num_threads=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(glob.glob(str(tmp_path / "multirun" / "search" / "*" / "*" / "[0-9]")))
    assert [os.path.basename(r) for r in runs] == ["0", "1"]
    s = optuna.load_study(study_name="nas", storage=storage)
    assert [t.state for t in s.trials].count(optuna.trial.TrialState.COMPLETE) == TRIALS, \
        [(t.number, t.state.name, t.user_attrs) for t in s.trials]
    both = trained(runs[0]) + trained(runs[1])
    assert len(both) == len(set(both)) == TRIALS - sum(
        json.loads(line).get("repeated", False) for r in runs for line in open(os.path.join(r, "trials.jsonl")))
    # the two jobs ran at once: each started before the other finished
    import datetime

    spans = []
    for r in runs:
        lines = [line for line in open(os.path.join(r, "search.log")) if line.startswith("[")]
        spans.append([datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in (lines[0], lines[-1])])
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans


def _join_new_study(url, barrier, results):
    import optuna

    from nas.strategies.blackbox import _retry_creation_race, _storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    barrier.wait()
    try:
        study = _retry_creation_race(lambda: optuna.create_study(study_name="race", storage=_storage(url),
                                                                 load_if_exists=True))
        results.put(study._study_id)
    except Exception as err:  # reported to the test
        results.put(f"{type(err).__name__}: {err}")


def test_workers_creating_one_new_study_at_once_all_join_it(tmp_path):
    """r04: N workers started together on a new SQLite storage all join one study, every time (10 rounds of 4
    processes released by one barrier); before the retry 1 round in 2 to 8 lost a worker to the table-creation race."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for round_ in range(10):
        url = f"sqlite:///{tmp_path}/fresh{round_}.db"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_join_new_study, args=(url, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=600) for _ in procs]  # a hang guard only
        for p in procs:
            p.join(timeout=60)
        assert all(isinstance(g, int) for g in got), (round_, got)
        assert len(set(got)) == 1, got  # one study


def test_a_wrong_storage_url_is_not_retried_as_a_race():
    from nas.strategies.blackbox import _retry_creation_race

    calls = []

    def bad():
        calls.append(1)
        raise ValueError("Could not parse SQLAlchemy URL from string 'sqlit://x'")

    with pytest.raises(ValueError, match="Could not parse"):
        _retry_creation_race(bad)
    assert len(calls) == 1


def study_trials_of(study, run_dir, states=None):
    """The study's trials proposed by the worker of ``run_dir`` (user attribute ``worker``: host:run dir)."""
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if str(t.user_attrs.get("worker", "")).endswith(":" + str(run_dir))]


def wait_for(condition, what, timeout=300.0, poll=0.05):
    """Poll ``condition()`` until it returns something true (returned); fails the test after ``timeout`` s, which
    only a hung worker reaches (each wait is for progress the processes report, not for a guessed time)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def stall_inside_a_trial(proc, run_dir, study, at_least=1, others_alive=lambda: True):
    """SIGSTOP ``proc`` while it trains trial ``>= at_least`` (its trial dir has a checkpoint, no metrics.json yet,
    checked again once it is stopped) and keep it stopped until another worker has marked that trial FAIL in the
    study (or no other worker is left to do it); then SIGCONT.  Returns the trial dir, or None when ``proc`` ended
    first."""
    while proc.poll() is None:
        trial_dir = training_trial(run_dir, at_least)
        if trial_dir is None:
            time.sleep(0.02)
            continue
        proc.send_signal(signal.SIGSTOP)
        running = _locked_as_none(lambda: study_trials_of(study, run_dir, (optuna.trial.TrialState.RUNNING,)))
        if running is None:  # stopped in the middle of a SQLite write: the others wait for it; another moment
            proc.send_signal(signal.SIGCONT)
            continue
        if os.path.isfile(os.path.join(trial_dir, "metrics.json")) or not running:  # it finished meanwhile
            proc.send_signal(signal.SIGCONT)
            at_least = int(os.path.basename(trial_dir)) + 1
            continue
        number = running[-1].number
        wait_for(lambda: _failed_or_locked(study, number) or not others_alive(),
                 f"another worker to mark trial {number} failed")
        proc.send_signal(signal.SIGCONT)
        return trial_dir
    return None


def test_a_worker_paused_past_the_grace_period_keeps_its_result_and_goes_on(tmp_path, corpus):
    """r03: worker A is stopped (SIGSTOP, a scheduler's suspend) inside a trial until worker B has marked that
    trial failed (no heartbeat), then continued.  A finishes training, keeps the result (its trials.jsonl, and the
    study as a new COMPLETE trial of the same decisions, one log line), and goes on to the end without a traceback;
    every token is counted once.  Before the fix A exited 1 with 'ValueError: Cannot tell a FAIL trial.'"""
    storage, name = f"sqlite:///{tmp_path}/study.db", f"paused_{os.getpid()}"
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    # a grace period far above any delay a busy machine gives a live worker's heartbeat thread, so that the stalled
    # trial is the only one failed (the stall lasts until B fails it, however long that takes)
    a = worker(a_dir, storage, corpus, name, trials=10, epochs=6, grace=15)
    b = worker(b_dir, storage, corpus, name, trials=10, epochs=6, grace=15)
    study = wait_for(lambda: _load(name, storage), "the study")
    stalled = stall_inside_a_trial(a, a_dir, study)
    assert stalled is not None, a.communicate()[0][-3000:]
    out_a, _ = a.communicate(timeout=600)
    out_b, _ = b.communicate(timeout=600)
    assert a.returncode == 0 and "Traceback" not in out_a, out_a[-3000:]
    assert b.returncode == 0 and "Traceback" not in out_b, out_b[-3000:]

    s = optuna.load_study(study_name=name, storage=storage)
    failed = study_trials_of(s, a_dir, (optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1  # the stalled trial, failed by B
    assert f"trial {failed[0].number} of study {name!r} sent no heartbeat" in out_b
    # A's record of the stalled trial: its trained result, pointing to the new COMPLETE trial that carries it
    metrics = json.load(open(os.path.join(stalled, "metrics.json")))
    rec = next(r for r in map(json.loads, open(a_dir / "trials.jsonl")) if r["trial"] == int(os.path.basename(stalled)))
    assert rec["value"] == metrics["best_valid_ppl"] and rec["train_tokens"] == metrics["train_tokens"] > 0
    new = s.trials[rec["study_trial"]]
    assert new.state == optuna.trial.TrialState.COMPLETE and new.value == rec["value"]
    assert new.params == failed[0].params and new.user_attrs["replaces"] == failed[0].number
    assert out_a.count("marked failed by another worker while this one was paused") == 1
    assert f"recorded as new trial {new.number}" in out_a
    # A went on: it ended normally, with the study's budget met
    assert "done in" in out_a and os.path.isfile(a_dir / "metrics.json")
    assert [t.state for t in s.trials].count(optuna.trial.TrialState.COMPLETE) >= 10
    # every record is one COMPLETE trial of the study and the other way round; tokens counted once
    recs = [r for d in (a_dir, b_dir) for r in map(json.loads, open(d / "trials.jsonl"))]
    complete = {t.number for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert sorted(r["study_trial"] for r in recs) == sorted(complete)
    assert sum(r["train_tokens"] for r in recs) == sum(t.user_attrs.get("train_tokens", 0) for t in s.trials)


def _locked_as_none(read):
    """``read()``, or None when the SQLite file stays locked (a worker stopped in the middle of a write holds it:
    the others wait for it, and nobody can fail its trial until it continues)."""
    import sqlalchemy

    try:
        return read()
    except (sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError) as err:
        if "locked" not in str(err) + str(err.__cause__):
            raise
        return None


def _failed_or_locked(study, number):
    """Trial ``number`` is FAIL, or the SQLite file stays locked by the stopped worker (:func:`_locked_as_none`)."""
    state = _locked_as_none(lambda: study.get_trials(deepcopy=False)[number].state)
    return state is None or state == optuna.trial.TrialState.FAIL


def _load(name, storage):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except Exception:  # not created yet (KeyError), or its tables not yet (SQLAlchemy's errors)
        return None


SOAK_WORKERS, SOAK_EPOCHS, SOAK_TRIALS = 4, 3, 20


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_chaos_soak_of_four_bayesian_workers_stopped_killed_and_restarted(tmp_path, corpus, backend, request):
    """Issue 16's soak: 4 Bayesian workers on one study (a study-wide token budget of about 20 trials) while a
    driver with a seeded RNG SIGSTOPs workers inside a trial until another worker has failed it (then SIGCONT),
    SIGKILLs workers inside a trial (after its first checkpoint, or as its trial dir appears) and restarts them
    with ``resume=<run dir>``.  Every moment is drawn from the progress the workers report (trial dirs,
    checkpoints, the study's states), never from a wall-clock guess.  Afterwards: every trial that finished
    training is recorded exactly once across the workers' trials.jsonl and is COMPLETE exactly once in the study;
    the token budget is exceeded by at most one trial per worker; no worker printed a traceback; each restarted
    worker went on from its interrupted trial (from its checkpoint when it had one)."""
    import random

    storage = f"sqlite:///{tmp_path}/study.db" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    name, rng = f"soak_{backend}_{os.getpid()}", random.Random(16)
    per_trial = SOAK_EPOCHS * 8 * 16 * 20  # smoke: 8 batches of 16 x bptt 20 per epoch (about: bptt varies)
    budget = SOAK_TRIALS * per_trial
    extra = (f"strategy.budget_tokens={budget}",)
    dirs = [tmp_path / f"w{i}" for i in range(SOAK_WORKERS)]
    outs = {i: [] for i in range(SOAK_WORKERS)}

    def start(i, resume=False):
        out = open(tmp_path / f"w{i}.{len(outs[i])}.out", "w")
        outs[i].append(out.name)
        if resume:
            return subprocess.Popen([sys.executable, os.path.join(ROOT, "search.py"), f"resume={dirs[i]}"],
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        return worker(dirs[i], storage, corpus, name, trials=1000, epochs=SOAK_EPOCHS, extra=extra, out=out)

    procs = [start(i) for i in range(SOAK_WORKERS)]
    study = wait_for(lambda: _load(name, storage), "the study")
    plan = ["kill", "kill", "stall", "stall"] + [rng.choice(["kill", "stall"]) for _ in range(2)]
    rng.shuffle(plan)
    kills, stalls, resumed = 0, 0, []
    for event in plan:
        alive = [i for i in range(SOAK_WORKERS) if procs[i].poll() is None]
        if not alive:
            break
        i = rng.choice(alive)
        others = lambda i=i: any(p.poll() is None for j, p in enumerate(procs) if j != i)  # noqa: E731
        if event == "stall":
            stalls += stall_inside_a_trial(procs[i], dirs[i], study, others_alive=others) is not None
            continue
        # kill inside a trial: after its first checkpoint, or as soon as its trial dir appears
        n0 = len(glob.glob(str(dirs[i] / "trials" / "*")))
        after_checkpoint = rng.random() < 0.5
        at = wait_for(lambda: "ended" if procs[i].poll() is not None else (
            training_trial(dirs[i], n0) if after_checkpoint else
            (len(glob.glob(str(dirs[i] / "trials" / "*"))) > n0 and "new")), "a moment to kill", poll=0.01)
        if at == "ended":
            continue
        procs[i].send_signal(signal.SIGKILL)
        procs[i].wait()  # dead: its run dir is free
        kills += 1
        last = sorted(glob.glob(str(dirs[i] / "trials" / "*")))[-1]
        done = os.path.isfile(os.path.join(last, "metrics.json"))
        checkpoint = os.path.isfile(os.path.join(last, "checkpoint.pt")) and not done
        if rng.random() < 0.5:  # restart once another worker has failed its trial (else at once, while RUNNING)
            wait_for(lambda: not study_trials_of(study, dirs[i], (optuna.trial.TrialState.RUNNING,)) or not others(),
                     "the killed worker's trial to be failed")
        resumed.append((i, len(outs[i]), last, checkpoint))
        procs[i] = start(i, resume=True)
    for p in procs:
        p.wait(timeout=600)
    texts = {i: [open(f).read() for f in outs[i]] for i in outs}
    for i, p in enumerate(procs):
        assert p.returncode == 0, texts[i][-1][-3000:]
    for i in texts:
        for text in texts[i]:
            assert "Traceback" not in text, text[-5000:]

    s = study  # (the handle the driver used all along)
    State = optuna.trial.TrialState
    recs = {i: [json.loads(line) for line in open(dirs[i] / "trials.jsonl")] for i in range(SOAK_WORKERS)}
    # each worker's records continue across its restarts: trial 1, 2, ... n
    for i in recs:
        assert [r["trial"] for r in recs[i]] == list(range(1, len(recs[i]) + 1)), recs[i]
    # every trial that finished training (metrics.json in its trial dir) is recorded once, with its result
    for i in recs:
        trained = {int(os.path.basename(os.path.dirname(m))): json.load(open(m))
                   for m in glob.glob(str(dirs[i] / "trials" / "*" / "metrics.json"))}
        mine = {r["trial"]: r for r in recs[i] if not r["repeated"]}
        assert sorted(trained) == sorted(mine), (i, sorted(trained), sorted(mine))
        for n, m in trained.items():
            assert mine[n]["value"] == m["best_valid_ppl"] and mine[n]["train_tokens"] == m["train_tokens"]
    # ... and COMPLETE once in the study: records and COMPLETE trials match one to one, with the same values
    every = [r for i in recs for r in recs[i]]
    complete = {t.number: t for t in s.trials if t.state == State.COMPLETE}
    assert sorted(r["study_trial"] for r in every) == sorted(complete)
    assert all(complete[r["study_trial"]].value == r["value"] for r in every)
    assert not [t for t in s.trials if t.state == State.RUNNING]
    # the token budget, every worker's: exceeded by at most one trial per worker; each result counted once
    tokens = sum(r["train_tokens"] for r in every)
    assert budget <= tokens <= budget + SOAK_WORKERS * max(r["train_tokens"] for r in every)
    assert tokens == sum(t.user_attrs.get("train_tokens", 0) for t in complete.values())
    # each restarted worker went on with the trial it was killed in, from its checkpoint when it had one
    for i, incarnation, trial_dir, checkpoint in resumed:
        text = texts[i][incarnation]
        assert "resuming trial" in text and f"run dir {trial_dir}" not in text.split("resuming trial")[0], text[-3000:]
        if checkpoint:
            assert f"resuming the interrupted trial in {trial_dir}" in text and f"resumed {trial_dir} at step" in text
        assert int(os.path.basename(trial_dir)) in {r["trial"] for r in recs[i]}
    replaced = sum("replaces" in t.user_attrs for t in complete.values())
    print(f"\nsoak {backend}: {len(complete)} trials completed ({len(every)} records, {replaced} kept after another "
          f"worker failed them, {sum(t.state == State.FAIL for t in s.trials)} failed), {tokens} of {budget} tokens; "
          f"{kills} kills, {stalls} stalls, {len(resumed)} restarts")
    assert kills >= 1 and stalls >= 1 and len(resumed) == kills
