"""What one worker of a shared Optuna study does when another worker has changed the study under it (issue 16,
case r03), in one process and in seconds: the calls into the study that another worker's actions invalidate.
The process-level versions (SIGSTOP, SIGKILL, PostgreSQL) are in tests/test_workers.py."""
import json
import logging
import os

import optuna
import pytest

from nas.engine.blackbox import TrialResult, search_black_box
from nas.engine.resume import Interrupted
from nas.genotype import genotype_count
from nas.spaces import build_space
from nas.strategies import STRATEGIES
from test_blackbox import cfg_for, records, run_workers, toy

State = optuna.trial.TrialState


def strategy_on(tmp_path, name="bayesian", extra=()):
    """A strategy of a shared SQLite study with heartbeats, and a second handle on that study ("another worker")."""
    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = cfg_for([f"strategy={name}", f"strategy.storage={storage}", "strategy.heartbeat_interval=1",
                   "strategy.grace_period=2", *extra])
    strat = STRATEGIES.get(name)(cfg.strategy, build_space(cfg.space), run_dir=str(tmp_path / "w"))
    return strat, optuna.load_study(study_name="nas", storage=storage)


def test_a_result_for_a_trial_another_worker_failed_is_kept_as_a_new_trial_once(tmp_path, caplog):
    strat, other = strategy_on(tmp_path)
    p = strat.ask()
    other.tell(p.handle.number, state=State.FAIL)  # what fail_stale_trials does to a paused worker's trial
    with caplog.at_level(logging.WARNING):
        number = strat.tell(p.handle, 7.5, 300)
    trials = other.get_trials()
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE] and number == trials[1].number == 1
    new = trials[1]
    # the same decisions, distributions and worker; the result and its cost; which trial it stands for
    assert new.params == trials[0].params and new.distributions == trials[0].distributions
    assert new.value == 7.5 and new.user_attrs["train_tokens"] == 300 and new.user_attrs["replaces"] == 0
    assert new.user_attrs["worker"] == trials[0].user_attrs["worker"]
    assert strat.space.from_decisions(new.params) == p.genotype
    lines = [r for r in caplog.records if "marked failed by another worker" in r.getMessage()]
    assert len(lines) == 1 and "recorded as new trial 1" in lines[0].getMessage()
    # told again (a retry after a crash): nothing added; the tokens are the study's once
    assert strat.tell(p.handle, 7.5, 300) == 1 and len(other.get_trials()) == 2
    assert strat.spent_tokens() == 300


def test_a_failure_or_a_second_tell_on_a_finished_trial_raises_nothing_and_adds_nothing(tmp_path):
    strat, other = strategy_on(tmp_path)
    p = strat.ask()
    other.tell(p.handle.number, state=State.FAIL)
    assert strat.tell(p.handle, None, 0) == 0  # it failed here too: it stays failed
    q = strat.ask()
    assert strat.tell(q.handle, 3.0, 100) == q.handle.number
    assert strat.tell(q.handle, 3.0, 100) == q.handle.number  # already COMPLETE (told before a kill): kept as is
    assert [t.state for t in other.get_trials()] == [State.FAIL, State.COMPLETE]
    assert strat.spent_tokens() == 100


def test_a_proposal_failed_by_another_worker_while_being_made_is_replaced(tmp_path, caplog):
    strat, other = strategy_on(tmp_path)
    ask = strat.study.ask

    def ask_then_paused(*args, **kwargs):  # this worker pauses right after asking; another worker fails the trial
        trial = ask(*args, **kwargs)
        if trial.number == 0:
            other.tell(0, state=State.FAIL)
        return trial

    strat.study.ask = ask_then_paused
    with caplog.at_level(logging.WARNING):
        p = strat.ask()
    assert p.handle.number == 1 and other.get_trials()[1].state == State.RUNNING
    assert sum("while this one was proposing it" in r.getMessage() for r in caplog.records) == 1
    strat.tell(p.handle, 1.0, 10)


@pytest.mark.parametrize("name", ["bayesian", "random", "evolution"])
def test_two_workers_that_both_find_the_last_place_free_train_one_trial_not_two(tmp_path, caplog, name):
    """``stopped()`` then ``ask()`` are two calls: two workers can both find the budget's last place free (CI saw
    7 COMPLETE trials in a study of 6).  The earlier-numbered trial keeps it; the other worker's ``ask()`` gives
    BUDGET_FULL, its trial FAIL (``over_budget``), and its next ``stopped()`` ends once the first is told."""
    from nas.strategies.blackbox import BUDGET_FULL

    a, study = strategy_on(tmp_path, name, ["strategy.trials=2"])
    b = STRATEGIES.get(name)(a.cfg, a.space, seed=1, run_dir=str(tmp_path / "b"))
    first = a.ask()
    a.tell(first.handle, 1.0, 10)
    assert not a.stopped(1) and not b.stopped(0)  # one place left, and each of them sees it free
    p = a.ask()
    with caplog.at_level(logging.INFO):
        q = b.ask()
    assert p is not BUDGET_FULL and q is BUDGET_FULL
    trials = study.get_trials()
    assert [t.state for t in trials] == [State.COMPLETE, State.RUNNING, State.FAIL]
    assert trials[2].user_attrs == {"over_budget": True} and trials[2].params == {}
    assert sum("beyond the budget of 2 trials" in r.getMessage() for r in caplog.records) == 1
    a.tell(p.handle, 2.0, 10)
    assert a.stopped(2) and b.stopped(0)
    assert [t.state for t in study.get_trials()].count(State.COMPLETE) == 2


def test_a_search_whose_last_place_another_worker_took_meanwhile_ends_without_training_it(tmp_path, monkeypatch):
    """The engine side: a worker whose ``ask()`` finds the budget full (another worker asked the last trial between
    this one's ``stopped()`` and ``ask()``) trains nothing more; it waits for that trial and ends, the study holding
    ``trials`` COMPLETE trials."""
    import threading

    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=2", f"strategy.storage={storage}",
                   "strategy.heartbeat_interval=1"])
    ask, other, timers = optuna.study.Study.ask, {}, []

    def ask_after_another_worker(study, *args, **kwargs):
        if "study" not in other and len(study.get_trials(deepcopy=False)) == 1:  # this worker's 2nd proposal
            other["study"] = optuna.load_study(study_name="nas", storage=storage)
            theirs = ask(other["study"])  # the other worker takes the last place at this moment
            timers.append(threading.Timer(1.0, lambda: other["study"].tell(theirs, 9.0)))
            timers[-1].start()
        return ask(study, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", ask_after_another_worker)
    evaluate, calls = toy(cfg)
    search_black_box(cfg, str(tmp_path / "w"), evaluate=evaluate)
    timers[0].join()
    assert len(calls) == 1 and len(records(tmp_path / "w")) == 1
    study = optuna.load_study(study_name="nas", storage=storage)
    assert [t.state for t in study.trials] == [State.COMPLETE, State.COMPLETE, State.FAIL]
    assert study.trials[2].user_attrs.get("over_budget") is True


def test_a_worker_that_joins_a_study_whose_budget_is_used_up_says_so(tmp_path, caplog):
    """A second worker started after the first one met the study's budget trains nothing and says why (a fresh
    user saw only "done in 0.3 s: 0 trials"); each trial's line names its study trial, its figure rounded."""
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=2", f"strategy.storage=sqlite:///{tmp_path}/study.db"])
    with caplog.at_level(logging.INFO):
        search_black_box(cfg, str(tmp_path / "a"), evaluate=toy(cfg)[0])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    assert [line.split(":")[0] for line in lines] == ["trial 1 (study trial 0)", "trial 2 (study trial 1)"]
    assert "filled already" not in caplog.text
    caplog.clear()
    evaluate, calls = toy(cfg)
    with caplog.at_level(logging.INFO):
        search_black_box(cfg, str(tmp_path / "b"), evaluate=evaluate)
    assert not calls
    assert "study 'nas' had its budget of 2 trials filled already (other workers' trials): this worker trained " \
           "nothing" in caplog.text


def test_a_worker_whose_sampler_differs_from_the_studys_first_one_is_warned(tmp_path, caplog):
    strat, _ = strategy_on(tmp_path, "bayesian")
    assert strat.study.user_attrs["sampler"] == strat.sampler_name == "tpe"
    with caplog.at_level(logging.WARNING):
        strategy_on(tmp_path, "bayesian")
        assert not caplog.records
        strategy_on(tmp_path, "random")
    assert [r.getMessage() for r in caplog.records] == [
        "study 'nas' was started by a worker proposing with tpe; this one proposes with random, so the study mixes "
        "both samplers' proposals (intended? else give this worker the other's strategy)"]


def test_random_search_over_workers_never_repeats_a_genotype_and_stops_when_the_space_is_used_up(tmp_path, caplog):
    """Alone, random search never draws a genotype twice and ends when the space is exhausted; three workers on
    one study do the same together: an 8-genotype space and a budget of 20 trials give 8 trainings, each
    genotype once, no repeated record, and every worker ends with the space exhausted."""
    cfg = cfg_for(["strategy=random", "strategy.trials=20", f"strategy.storage=journal:{tmp_path}/study.log",
                   "space.steps=2", "space.ops=[none,tanh,relu]"])
    size = genotype_count(build_space(cfg.space).decisions())
    assert size == 8  # node 1: 2 ops; node 2: 2 inputs x 2 ops
    trained = []

    def evaluate_for(i):
        evaluate = toy(cfg)[0]

        def ev(genotype, trial_dir):
            trained.append(genotype.to_json())
            return evaluate(genotype, trial_dir)
        return ev

    with caplog.at_level(logging.INFO):
        run_workers(cfg, tmp_path, evaluate_for, n=3)
    assert sorted(trained) == sorted(set(trained)) and len(trained) == size
    # (a worker the others left nothing to train has no trials.jsonl)
    recs = [r for i in range(3) if os.path.isfile(tmp_path / f"w{i}" / "trials.jsonl")
            for r in records(tmp_path / f"w{i}")]
    assert len(recs) == size and not any(r["repeated"] for r in recs)
    assert sum("the space is exhausted" in r.getMessage() for r in caplog.records) == 3


def test_the_token_budget_of_a_shared_study_is_every_workers_tokens(tmp_path):
    """``budget_tokens`` in a shared study counts the study's results (as ``trials`` does), each once: two
    workers of 100-token trials stop together at 1000 tokens, at most one trial each beyond it (each worker
    counting only its own would train 2000)."""
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=100", "strategy.budget_tokens=1000",
                   f"strategy.storage=sqlite:///{tmp_path}/study.db"])
    run_workers(cfg, tmp_path, lambda i: toy(cfg)[0])
    tokens = sum(r["train_tokens"] for i in range(2) for r in records(tmp_path / f"w{i}"))
    assert 1000 <= tokens <= 1000 + 2 * 100
    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/study.db")
    assert sum(t.user_attrs["train_tokens"] for t in study.trials) == tokens


def interrupted_in_trial(evaluate, at):
    """``evaluate`` that writes the trial dir's candidate (as train_trial does) and, at call ``at``, stops there
    as SIGTERM does (the study's trial stays RUNNING)."""
    calls = []

    def ev(genotype, trial_dir):
        os.makedirs(trial_dir, exist_ok=True)
        genotype.save(os.path.join(trial_dir, "candidate.json"))
        calls.append(genotype)
        if len(calls) == at:
            raise Interrupted("stopped", 143)
        return evaluate(genotype, trial_dir)
    return ev, calls


def test_a_restarted_worker_takes_its_interrupted_trial_back_first(tmp_path):
    storage = f"journal:{tmp_path}/study.log"  # no heartbeats: the trial stays RUNNING until the worker is back
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=5", f"strategy.storage={storage}"])
    run_dir = str(tmp_path / "w")
    ev, calls = interrupted_in_trial(toy(cfg)[0], at=3)
    with pytest.raises(Interrupted):
        search_black_box(cfg, run_dir, evaluate=ev)
    ev2, calls2 = interrupted_in_trial(toy(cfg)[0], at=0)
    search_black_box(cfg, run_dir, evaluate=ev2)
    assert calls2[0] == calls[2]  # the interrupted genotype first, in its own trial dir
    recs = records(run_dir)
    assert [r["trial"] for r in recs] == [1, 2, 3, 4, 5] and recs[2]["study_trial"] == 2
    study = optuna.load_study(study_name="nas", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(f"{tmp_path}/study.log")))
    assert [t.state for t in study.trials] == [State.COMPLETE] * 5  # the same trial 2 finished, nothing left


def test_a_result_told_before_the_kill_but_not_recorded_is_recorded_once_on_restart(tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=3", f"strategy.storage={storage}"])
    run_dir = str(tmp_path / "w")
    ev, _ = interrupted_in_trial(toy(cfg)[0], at=0)
    search_black_box(cfg, run_dir, evaluate=ev)
    path = os.path.join(run_dir, "trials.jsonl")
    lines = open(path).readlines()
    open(path, "w").writelines(lines[:2])  # killed between the study's tell and the record's append
    os.remove(os.path.join(run_dir, "metrics.json"))
    ev2, calls2 = interrupted_in_trial(toy(cfg)[0], at=0)
    search_black_box(cfg, run_dir, evaluate=ev2)
    recs = records(run_dir)
    assert [r["study_trial"] for r in recs] == [0, 1, 2] and json.loads(lines[2])["genotype"] == recs[2]["genotype"]
    assert len(calls2) == 1  # that trial only (read back from its trial dir), then the budget was met
    study = optuna.load_study(study_name="nas", storage=storage)
    assert [t.state for t in study.trials] == [State.COMPLETE] * 3  # told once, not added again
