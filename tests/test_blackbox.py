"""Random search and Bayesian optimization on a toy objective with a known optimum (no network training),
the common trial record, shared studies, and the smoke runs of every strategy on real data."""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
from nas.engine.blackbox import TRIALS_FILE, TrialResult, search_black_box
from nas.errors import ConfigError
from nas.genotype import dag_decisions, genotype_count, genotype_decisions, genotype_from_decisions
from nas.spaces import build_space

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["space.steps=3", "progress=false"]  # darts_rnn, 3 nodes: 1*4 x 2*4 x 3*4 = 384 genotypes


def cfg_for(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("search", overrides=TOY + overrides)


def toy(cfg):
    """A known optimum: the number of decisions in which a genotype differs from a fixed target (0 at it)."""
    sp = build_space(cfg.space)
    target = genotype_decisions(sp.from_decisions({n: c[len(c) // 2] for n, c in sp.decisions()}))
    calls = []

    def evaluate(genotype, trial_dir):
        calls.append(genotype)
        d = genotype_decisions(genotype)
        return TrialResult(float(sum(d[k] != target[k] for k in target)), 0.01, 100)

    return evaluate, calls


def records(run_dir):
    with open(os.path.join(run_dir, TRIALS_FILE)) as f:
        return [json.loads(line) for line in f]


def first_hit(run_dir):
    return next((r["trial"] for r in records(run_dir) if r["value"] == 0.0), None)


def test_decisions_enumerate_every_genotype_once():
    import itertools

    ops = ["zero", "lstm", "gru"]
    dec = dag_decisions(3, ops, 2)
    seen = set()
    for combo in itertools.product(*[c for _, c in dec]):
        choice = dict(zip([n for n, _ in dec], combo))
        g = genotype_from_decisions(choice, "hybrid", ops, 3, 2, (3,))
        assert genotype_decisions(g) == choice
        seen.add(g.to_json())
    assert len(seen) == genotype_count(dec) == (1 * 2) * (2 * 2) * (3 * 2 * 2)


def test_random_search_finds_the_optimum_and_never_repeats(tmp_path):
    cfg = cfg_for(["strategy=random", "strategy.trials=1000"])
    evaluate, calls = toy(cfg)
    m = search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    keys = [g.to_json() for g in calls]
    assert len(keys) == len(set(keys)) == 384  # the whole space, each genotype once, then it stops
    assert m["trials"] == 384 and m["best_valid_ppl"] == 0.0
    recs = records(tmp_path)
    assert [r["trial"] for r in recs] == list(range(1, 385))
    assert {"strategy", "genotype", "metric", "value", "wall_seconds", "train_tokens", "cum_wall_seconds",
            "cum_train_tokens", "seed"} <= set(recs[0])
    assert recs[-1]["cum_train_tokens"] == 384 * 100 and recs[-1]["best_value"] == 0.0
    assert json.load(open(tmp_path / "genotype.json")) == m["genotype"]
    assert os.path.isfile(tmp_path / "genotype.png")


def test_a_search_whose_every_trial_failed_ends_with_a_one_line_error(tmp_path):
    """Every trial's value non-finite (all failed): SearchFailed, which the entry points report as one line (exit 1)
    like the project's other errors, not a RuntimeError traceback; trials.jsonl keeps the failed trials."""
    from nas.errors import SearchFailed

    cfg = cfg_for(["strategy=random", "strategy.trials=3"])
    with pytest.raises(SearchFailed, match="no trial of random succeeded"):
        search_black_box(cfg, str(tmp_path), evaluate=lambda genotype, trial_dir: TrialResult(float("inf"), 0.1, 10))
    assert len(records(tmp_path)) == 3 and not os.path.exists(tmp_path / "genotype.json")
    # each says why (a held-out figure that overflowed is a failed trial, as a diverged one)
    assert all("valid_ppl is not finite" in r["failed"] for r in records(tmp_path))

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from nas.cli import run_entry

    def failing(cfg):
        raise SearchFailed("no trial of random succeeded")

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        HydraConfig.instance().set_config(compose("search", overrides=[], return_hydra_config=True))
    try:
        with pytest.raises(SystemExit) as exit_:  # the entry point's handling: exit 1, the message logged as one line
            run_entry(failing, OmegaConf.create({"resume": None}))
    finally:
        HydraConfig.instance().cfg = None
    assert exit_.value.code == 1


def test_token_budget_stops_the_search(tmp_path):
    cfg = cfg_for(["strategy=random", "strategy.trials=50", "strategy.budget_tokens=1000"])
    m = search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    assert m["trials"] == 10 and m["train_tokens"] == 1000


def test_bayesian_optimization_needs_fewer_evaluations_than_random(tmp_path):
    budget, hits = 60, {"random": [], "bayesian": []}
    for seed in range(4):
        for strategy in hits:
            cfg = cfg_for([f"strategy={strategy}", f"strategy.trials={budget}", f"seed={seed}"])
            run = tmp_path / f"{strategy}{seed}"
            search_black_box(cfg, str(run), evaluate=toy(cfg)[0])
            hits[strategy].append(first_hit(run) or budget + 1)  # not found: counted as budget + 1
    # random search needs (384 + 1) / 2 = 192 evaluations on average; TPE finds it well within 60
    assert np.mean(hits["bayesian"]) < np.mean(hits["random"]), hits
    assert np.mean(hits["bayesian"]) < 40 and all(h <= budget for h in hits["bayesian"]), hits


@pytest.mark.slow
def test_gaussian_process_sampler_finds_the_optimum(tmp_path):
    cfg = cfg_for(["strategy=bayesian", "strategy.sampler=gp", "strategy.trials=40"])
    search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    assert first_hit(tmp_path) is not None and first_hit(tmp_path) <= 40


def interrupting(evaluate, after):
    """``evaluate`` that sends this process SIGINT after its ``after``-th trial (as Ctrl-C would)."""
    calls = []

    def ev(genotype, trial_dir):
        result = evaluate(genotype, trial_dir)
        calls.append(genotype)
        if len(calls) == after:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    return ev


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_interrupted_study_resumes_from_its_storage_as_if_never_interrupted(tmp_path, sampler):
    """The default storage is study.db in the run dir: ``resume=`` continues the same study, and the sampler
    proposes exactly what it would have without the interruption."""
    from nas.engine.resume import Interrupted

    cfg = cfg_for(["strategy=bayesian", "strategy.trials=8", f"strategy.sampler={sampler}",
                   "strategy.n_startup_trials=3"])
    search_black_box(cfg, str(tmp_path / "whole"), evaluate=toy(cfg)[0])
    with pytest.raises(Interrupted, match=r"after trial \d+; trials.jsonl is up to date. Resume with"):
        search_black_box(cfg, str(tmp_path / "cut"), evaluate=interrupting(toy(cfg)[0], 4))
    evaluate, calls = toy(cfg)
    search_black_box(cfg_for([f"resume={tmp_path / 'cut'}"]), evaluate=evaluate)
    import optuna

    study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/cut/study.db")
    assert len(study.trials) == 8 and len(records(tmp_path / "cut")) == 8
    assert len(calls) <= 4  # only the missing trials ran
    strip = [{k: r[k] for k in ("trial", "genotype", "value", "best_value")} for r in records(tmp_path / "cut")]
    assert strip == [{k: r[k] for k in ("trial", "genotype", "value", "best_value")}
                     for r in records(tmp_path / "whole")]


def run_workers(cfg, tmp_path, evaluate_for, n=2):
    """``n`` black-box searches on ``cfg``'s shared storage at once, in threads, each in ``tmp_path/w<i>`` with
    the evaluator ``evaluate_for(i)``; raises the first error any of them hit."""
    errors = []

    def worker(i):
        try:
            search_black_box(cfg, str(tmp_path / f"w{i}"), evaluate=evaluate_for(i))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


def test_two_workers_sharing_one_storage_evaluate_distinct_trials(tmp_path):
    storage = f"journal:{tmp_path}/study.log"
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=24", f"strategy.storage={storage}"])
    evaluated = []

    def evaluate_for(i):
        evaluate, calls = toy(cfg)
        evaluated.append(calls)
        return evaluate

    run_workers(cfg, tmp_path, evaluate_for)
    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="nas",
                              storage=optuna.storages.JournalStorage(JournalFileBackend(f"{tmp_path}/study.log")))
    # (a trial asked when the other worker had just taken the budget's last place is FAIL, over_budget: untrained)
    kept = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert all(t.state == optuna.trial.TrialState.FAIL and not t.params for t in study.trials if t not in kept)
    numbers = [t.number for t in kept]
    assert len(numbers) == len(set(numbers)) >= 24  # together they completed the budget, no trial twice
    mine = [len(records(tmp_path / f"w{i}")) for i in range(2)]
    assert all(n > 0 for n in mine) and sum(mine) == len(kept)  # both worked, nothing counted twice
    trained = [g.to_json() for calls in evaluated for g in calls]
    assert len(trained) == len(set(trained))  # no genotype trained twice: repeats reuse the finished result


def test_bad_strategy_settings_are_clear_errors(tmp_path):
    for override, message in (("strategy.trials=0", "trials"), ("strategy.sampler=cmaes", "sampler")):
        cfg = cfg_for(["strategy=bayesian", override])
        with pytest.raises(ConfigError, match=message):
            search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    for storage, hint in (("postgresql://nobody@127.0.0.1:1/none", "pip install 'psycopg"),
                          ("postgres://nobody@127.0.0.1:1/none", "spells the scheme postgresql://"),
                          ("postgresql+psycopg2://nobody@127.0.0.1:1/none", "psycopg2")):
        cfg = cfg_for(["strategy=bayesian", f"strategy.storage={storage}"])
        with pytest.raises(ConfigError, match="cannot open the Optuna study") as err:
            search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
        assert hint in str(err.value) and "\n" not in str(err.value)  # one line, whatever the driver said


def test_a_requeued_worker_of_a_shared_study_continues_its_run_dir(tmp_path):
    """A scheduler that requeues a worker runs the same command in the same run dir (Hydra's submitit launcher
    after a preemption): with a shared storage the unfinished worker run goes on; another config is refused."""
    storage = f"sqlite:///{tmp_path}/study.db"
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=3", f"strategy.storage={storage}"])
    run_dir = str(tmp_path / "w")
    search_black_box(cfg, run_dir, evaluate=toy(cfg)[0])
    os.remove(os.path.join(run_dir, "metrics.json"))  # as if stopped before the end
    metrics = search_black_box(cfg, run_dir, evaluate=toy(cfg)[0])
    assert metrics["trials"] == 3 and len(records(run_dir)) == 3  # its record goes on, nothing trained again
    other = cfg_for(["strategy=bayesian", "strategy.trials=4", f"strategy.storage={storage}"])
    os.remove(os.path.join(run_dir, "metrics.json"))
    with pytest.raises(ConfigError, match="already holds an unfinished run"):
        search_black_box(other, run_dir, evaluate=toy(other)[0])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["darts", "random", "random_ws", "bayesian", "evolution"])
def test_smoke_search_of_every_strategy_on_real_ptb(tmp_path, strategy):
    """``python search.py experiment=smoke strategy=<each>``: trials.jsonl and genotype.json, which train.py takes."""
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    run = tmp_path / "search"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "search.py"), "experiment=smoke", f"strategy={strategy}",
                        "progress=false", f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # a one-shot search logs its progress; a black-box search's trials log none of their own (it logs a line each)
    one_shot = strategy in ("darts", "random_ws")
    assert ("[nas.engine.progress]" in r.stderr) == one_shot, r.stderr[-3000:]
    recs = records(run)
    assert recs and all(r["strategy"] == strategy and r["value"] > 1 for r in recs)
    assert json.load(open(run / "genotype.json"))["space"] == "darts_rnn"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "experiment=smoke", f"arch={run}",
                        "progress=false", f"hydra.run.dir={tmp_path}/train"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[nas.engine.progress]" in r.stderr  # train.py on its own does (tests/test_progress.py)
    # r05: every scalar tag of both runs has strictly increasing steps (TensorBoard keeps one point per step), and is
    # one of its script's listed tags (the README's TensorBoard table, checked in tests/test_tb.py)
    from nas.engine.tb import SCALAR_TAGS, scalar_tag_allowed

    for run_dir, script in ((run, "search.py"), (tmp_path / "train", "train.py")):
        scalars = tb_scalars(run_dir)
        for tag, events in scalars.items():
            steps = [e.step for e in events]
            assert all(a < b for a, b in zip(steps, steps[1:])), (run_dir.name, tag, steps)
        unknown = {t for t in scalars if not scalar_tag_allowed(t, SCALAR_TAGS[script])}
        assert not unknown, (script, unknown)
    assert {"search/best_vs_tokens", "search/best_vs_seconds"} <= set(tb_scalars(run))
    train_metrics = json.load(open(tmp_path / "train" / "metrics.json"))
    (test_loss,) = tb_scalars(tmp_path / "train")["test/loss"]  # the README's test/loss tag, the scored loss
    assert abs(test_loss.value - train_metrics["test_loss"]) < 1e-5 * train_metrics["test_loss"]


def tb_scalars(run_dir) -> dict:
    """{tag: [ScalarEvent]} of a run dir's TensorBoard events, read as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: ea.Scalars(tag) for tag in ea.Tags()["scalars"]}


def test_best_vs_cost_steps_increase_even_when_a_record_costs_nothing(tmp_path):
    """r05: a reused result (0 tokens, 0 s) or several trials within one second must not repeat a step; a resumed
    log goes on past the steps it had written."""
    from nas.engine.blackbox import TrialLog
    from nas.genotype import Edge, Genotype

    class Recorder:
        def __init__(self):
            self.points = []

        def add_scalar(self, tag, value, step):
            self.points.append((tag, step))

        def flush(self):
            pass

    g = Genotype("darts_rnn", ("none", "tanh"), [[Edge("tanh", 0)]], [1])
    w = Recorder()
    log = TrialLog(str(tmp_path), "random", "valid_ppl", "minimize", 0, w)
    costs = [(0.4, 100), (0.3, 0), (0.0, 0), (2.5, 50)]  # seconds, tokens per record
    for k, (sec, tok) in enumerate(costs):
        log.add(g, 100.0 - k, sec, tok)
    steps = lambda tag, pts: [s for t, s in pts if t == tag]
    # tokens: 100, 100 -> 101, 100 -> 102, 150; whole seconds: 0, 0 -> 1, 0 -> 2, int(3.2) = 3
    assert steps("search/best_vs_tokens", w.points) == [100, 101, 102, 150]
    assert steps("search/best_vs_seconds", w.points) == [0, 1, 2, 3]
    w2 = Recorder()
    again = TrialLog(str(tmp_path), "random", "valid_ppl", "minimize", 0, w2)
    assert again.resume() == 4
    again.add(g, 50.0, 0.1, 0)
    assert steps("search/best_vs_tokens", w2.points) == [151] and steps("search/best_vs_seconds", w2.points) == [4]


def test_random_ws_trains_single_paths_and_selects_by_shared_weight_score():
    import torch

    from nas.genotype import path_weights
    from nas.strategies.random_ws import RandomWSConfig, RandomWSStrategy

    cfg = cfg_for(["strategy=random_ws"])
    sp = build_space(cfg.space)
    model = sp.build_supernet(30)
    strat = RandomWSStrategy(RandomWSConfig(candidates=30, score_batches=2, rescore_top=3), sp, model, seed=0)
    # every training path is a genotype's one-hot path: one op per kept edge, nothing elsewhere
    for _ in range(5):
        w = strat.edge_weights()
        assert w.shape == sp.alpha_shape and set(w.unique().tolist()) <= {0.0, 1.0}
        assert w.sum() == sp.cfg.steps and (w[:, sp.ops.index("none")] == 0).all()
    target = path_weights(strat.sample(), sp.ops)
    scored = []

    def score(weights, max_batches):  # a toy validation loss: distance to a target path (0 at the target)
        value = float((weights - target).abs().sum()) + (0.5 if max_batches is not None else 0.0)
        scored.append((max_batches, value))
        return value

    ranked = strat.select(score)
    quick = [v for n, v in scored if n == 2]
    assert len(quick) == 30 and len([n for n, _ in scored if n is None]) == 3  # 30 quick scores, 3 rescored
    assert ranked[0][1] == min(v for _, v in ranked) == min(quick) - 0.5  # the best quick one, rescored
    assert strat.export() == ranked[0][0] and torch.equal(strat.eval_weights(), path_weights(ranked[0][0], sp.ops))
    assert strat.step(None, None, 1.0) is None  # no architecture update


def test_workers_never_train_the_same_genotype_twice_even_at_the_same_time(tmp_path):
    """A 2-genotype space and 10 trials over 2 workers: repeats are certain, and often of a genotype the other
    worker is still training; each genotype is still trained once (a repeat waits for, or reuses, the result)."""
    import time

    storage = f"journal:{tmp_path}/study.log"
    cfg = cfg_for(["strategy=bayesian", "strategy.trials=10", f"strategy.storage={storage}", "space.steps=2",
                   "space.ops=[none,tanh]", "strategy.n_startup_trials=10"])
    assert genotype_count(build_space(cfg.space).decisions()) == 2  # node 2's input: 0 or 1; every op tanh
    trained = []

    def evaluate(genotype, trial_dir):
        trained.append(genotype.to_json())
        time.sleep(0.3)  # long enough for the other worker to propose the same genotype meanwhile
        return TrialResult(float(len(trained)), 0.3, 10)

    run_workers(cfg, tmp_path, lambda i: evaluate)
    assert len(trained) == len(set(trained)) <= genotype_count(build_space(cfg.space).decisions())
    recs = records(tmp_path / "w0") + records(tmp_path / "w1")
    assert len(recs) >= 10 and sum(r["repeated"] for r in recs) == len(recs) - len(trained)


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_resume_in_the_same_run_dir_continues_numbering_cost_and_best(tmp_path, strategy):
    import optuna

    from nas.engine.resume import Interrupted

    cfg = cfg_for([f"strategy={strategy}", "strategy.trials=9"])
    with pytest.raises(Interrupted):
        search_black_box(cfg, str(tmp_path), evaluate=interrupting(toy(cfg)[0], 5))
    if strategy == "bayesian":  # a trial left running by a killed process before it had its params
        optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/study.db").ask()
    with pytest.raises(ConfigError, match="unfinished run"):  # a new run there would mix two runs' trials
        search_black_box(cfg, str(tmp_path), evaluate=toy(cfg)[0])
    cfg = cfg_for([f"resume={tmp_path}"])

    evaluate, calls = toy(cfg)
    m = search_black_box(cfg, evaluate=evaluate)
    recs = records(tmp_path)
    assert [r["trial"] for r in recs] == list(range(1, 10)) and m["trials"] == 9
    assert [r["cum_train_tokens"] for r in recs] == [100 * n for n in range(1, 10)]
    assert m["train_tokens"] == 900 and m["best_valid_ppl"] == min(r["value"] for r in recs)
    trained = [json.dumps(r["genotype"], sort_keys=True) for r in recs if not r.get("repeated")]
    assert len(trained) == len(set(trained))  # nothing evaluated before the resume is trained again
    if strategy == "bayesian":
        study = optuna.load_study(study_name="nas", storage=f"sqlite:///{tmp_path}/study.db")
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.FAIL) == 1 and states.count(optuna.trial.TrialState.RUNNING) == 0


@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_ctrl_c_while_the_strategy_proposes_stops_before_training_and_resumes_exactly(tmp_path, monkeypatch,
                                                                                      strategy):
    """A SIGINT that lands during ``ask`` (a fresh-user trial: the next trial was set up and trained a step first)
    stops the search before that proposal trains; the resume proposes it again, as an uninterrupted run would."""
    from nas.engine.resume import Interrupted
    from nas.strategies import STRATEGIES

    cfg = cfg_for([f"strategy={strategy}", "strategy.trials=6"])
    search_black_box(cfg, str(tmp_path / "whole"), evaluate=toy(cfg)[0])
    cls = STRATEGIES.get(strategy)
    real, asked = cls.ask, []

    def ask(self, *a, **k):
        proposal = real(self, *a, **k)
        asked.append(proposal)
        if len(asked) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return proposal

    monkeypatch.setattr(cls, "ask", ask)
    evaluate, calls = toy(cfg)
    with pytest.raises(Interrupted, match="after trial 2"):
        search_black_box(cfg, str(tmp_path / "cut"), evaluate=evaluate)
    assert len(calls) == 2 and len(records(tmp_path / "cut")) == 2
    monkeypatch.setattr(cls, "ask", real)
    search_black_box(cfg_for([f"resume={tmp_path / 'cut'}"]), evaluate=toy(cfg)[0])
    keep = ("trial", "genotype", "value", "best_value")
    assert [{k: r[k] for k in keep} for r in records(tmp_path / "cut")] == \
        [{k: r[k] for k in keep} for r in records(tmp_path / "whole")]


def test_a_trials_log_line_rounds_its_figure_to_six_significant_digits():
    from nas.engine.blackbox import _figure

    assert [_figure(v) for v in (4723.2807236491235, 0.8345123, 12, None)] == ["4723.28", "0.834512", "12", "None"]
