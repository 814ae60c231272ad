"""Every registered task (``nas.tasks.TASKS``) through the engine's three loops: one-shot search, retraining and a
black-box strategy, plus an interrupted-and-resumed search.

The tests are parametrized over the registry, so a new task is picked up with no edit here: ``tests/toy_task.py``
(a task written outside ``nas/``, registered by ``tests/conftest.py``) runs beside the built-in ones.  Each task's
``example(folder)`` writes its tiny data and gives the overrides that run on it.
"""
import json
import math
import os
import signal

import pytest
import torch
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
import toy_task
from nas.engine.resume import Interrupted, Keeper
from nas.engine.search import build_search, search
from nas.engine.train import load_trained, train
from nas.genotype import Genotype
from nas.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH = 2, 4
SMALL = ["experiment=smoke", "batch_size=8", "eval_batch_size=8", "limit_eval_batches=3", "bptt=8",
         f"epochs={EPOCHS}", f"limit_train_batches={STEPS_PER_EPOCH}", "num_threads=1", "progress=false",
         "checkpoint_every=3"]
DARTS = ["strategy=darts", "strategy.unrolled=false"]
#: metrics entries that measure time, not computation
TIMING = ("wall_seconds", "tokens_per_second", "train_seconds", "test_seconds", "seconds", "cum_wall_seconds",
          "hessian_seconds")


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def untimed(x):
    if isinstance(x, dict):
        return {k: untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [untimed(v) for v in x]
    return x


def best_of(values, task):
    return (min if task.direction == "minimize" else max)(values)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module", params=TASKS.names())
def searched(request, tmp_path_factory):
    """``(task, overrides, search run dir, metrics)``: a first-order DARTS search of the task's example data."""
    task = TASKS.get(request.param)()
    data = tmp_path_factory.mktemp(f"{request.param}_data")
    overrides = SMALL + task.example(str(data))
    run_dir = str(tmp_path_factory.mktemp(f"{request.param}_search") / "run")
    metrics = search(compose_cfg("search", overrides + DARTS), run_dir=run_dir)
    return task, overrides, run_dir, metrics


def test_search_runs_every_task(searched):
    task, overrides, run_dir, m = searched
    metric = task.metric
    assert read_json(os.path.join(run_dir, "metrics.json")) == m
    assert m["task"] == task.name
    assert m["steps"] == EPOCHS * STEPS_PER_EPOCH  # the task's batches keep limit_train_batches
    values = [h[f"valid_{metric}"] for h in m["history"]]
    assert [h["epoch"] for h in m["history"]] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(v) for v in values)
    assert m[f"best_valid_{metric}"] == best_of(values, task) and m[f"final_valid_{metric}"] == values[-1]
    # the three evaluations of every run: the last epoch's held-out accuracy and cross-entropy, the supernet's size
    last = m["history"][-1]
    assert (m["valid_accuracy"], m["valid_cross_entropy"]) == (last["valid_accuracy"], last["valid_loss"])
    assert 0 <= m["valid_accuracy"] <= 1 and m["params"] == sum(p.numel() for p in build_search(
        compose_cfg("search", overrides + DARTS), task=task).model.parameters())
    records = [json.loads(line) for line in open(os.path.join(run_dir, "trials.jsonl"), encoding="utf-8")]
    assert [(r["accuracy"], r["cross_entropy"], r["params"]) for r in records] == [
        (h["valid_accuracy"], h["valid_loss"], m["params"]) for h in m["history"]]
    genotype = Genotype.load(os.path.join(run_dir, "genotype.json"))
    cfg = compose_cfg("search", overrides + DARTS)
    assert genotype.task == task.name and genotype.dataset == cfg.dataset.name
    assert genotype.to_dict() == m["genotype"]
    for epoch in range(1, EPOCHS + 1):
        assert Genotype.load(os.path.join(run_dir, "genotypes", f"epoch_{epoch:03d}.json")).task == task.name
    # the last epoch's figure is the supernet of the last checkpoint scored again
    setup = build_search(cfg, task=task)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    setup.model.load_state_dict(ckpt["model"])
    setup.strategy.load_state_dict(ckpt["strategy"])
    again = task.evaluate(setup.model, setup.data, "valid", cfg, setup.strategy.eval_weights(), cfg.limit_eval_batches)
    assert task.value(again) == values[-1] and again.accuracy == m["valid_accuracy"]


def test_retraining_runs_every_task(searched, tmp_path):
    task, overrides, search_dir, searched_metrics = searched
    metric = task.metric
    cfg = compose_cfg("train", overrides + [f"arch={search_dir}"])
    m = train(cfg, run_dir=str(tmp_path / "train"))
    assert read_json(tmp_path / "train" / "metrics.json") == m
    assert m["task"] == task.name and m["genotype"] == searched_metrics["genotype"]
    values = [h[f"valid_{metric}"] for h in m["history"]]
    assert len(values) == EPOCHS and m["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert m[f"best_valid_{metric}"] == values[m["best_epoch"] - 1] == best_of(values, task)
    # the kept epoch is the first with the largest selection key of the task (ties on the metric: the lower loss)
    keys = [task.selection_key({metric: h[f"valid_{metric}"], "loss": h["valid_loss"]}) for h in m["history"]]
    assert m["best_epoch"] == 1 + keys.index(max(keys))
    assert math.isfinite(m[f"test_{metric}"]) and math.isfinite(m["test_loss"])
    # the test figure is the one of best.pt, rebuilt from the file alone
    trained = load_trained(str(tmp_path / "train"))
    data = task.prepare(cfg, torch.device("cpu"), alpha_split=None, retrain=True)
    test = task.test(trained.model, data, cfg)
    assert task.value(test) == m[f"test_{metric}"]
    # the three evaluations: held-out ones of the kept epoch, the test split's of best.pt, the model's size
    kept = m["history"][m["best_epoch"] - 1]
    assert (m["valid_accuracy"], m["valid_cross_entropy"]) == (kept["valid_accuracy"], kept["valid_loss"])
    assert (m["test_accuracy"], m["test_cross_entropy"]) == (test.accuracy, test.loss) == (
        m["test_accuracy"], m["test_loss"])
    assert 0 <= m["test_accuracy"] <= 1
    assert m["params"] == sum(p.numel() for p in trained.model.parameters())


@pytest.mark.parametrize("name", TASKS.names())
def test_black_box_search_runs_every_task(name, tmp_path):
    task = TASKS.get(name)()
    (tmp_path / "data").mkdir()
    overrides = SMALL + task.example(str(tmp_path / "data"))
    cfg = compose_cfg("search", overrides + ["strategy=random", "strategy.trials=2", "strategy.trial_epochs=1"])
    m = search(cfg, run_dir=str(tmp_path / "bb"))
    with open(tmp_path / "bb" / "trials.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert m["task"] == name and m["trials"] == 2 and len(records) == 2
    assert m["metric"] == records[0]["metric"] == f"valid_{task.metric}"
    for n, r in enumerate(records, start=1):
        trial = read_json(tmp_path / "bb" / "trials" / f"{n:04d}" / "metrics.json")
        assert trial["task"] == name and len(trial["history"]) == 1 and trial[f"test_{task.metric}"] is None
        assert r["value"] == trial[f"best_valid_{task.metric}"] and math.isfinite(r["value"])
        assert (r["accuracy"], r["cross_entropy"], r["params"]) == (
            trial["valid_accuracy"], trial["valid_cross_entropy"], trial["params"])
        # every candidate records where it was searched, so train.py arch=<trial> retrains it on the same task
        candidate = Genotype.load(os.path.join(tmp_path / "bb", "trials", f"{n:04d}", "candidate.json"))
        assert candidate.task == r["genotype"]["task"] == name
    assert m[f"best_valid_{task.metric}"] == best_of([r["value"] for r in records], task)
    best = next(r for r in records if r["value"] == m[f"best_valid_{task.metric}"])
    assert (m["valid_accuracy"], m["valid_cross_entropy"], m["params"]) == (
        best["accuracy"], best["cross_entropy"], best["params"])
    assert Genotype.load(os.path.join(tmp_path / "bb", "genotype.json")).task == name


@pytest.mark.parametrize("name,stop_at", [(toy_task.NAME, 2), (toy_task.NAME, 6)] +
                         [pytest.param(n, 6, marks=pytest.mark.slow) for n in TASKS.names() if n != toy_task.NAME])
def test_interrupted_search_resumes_to_the_same_result(name, stop_at, tmp_path, monkeypatch):
    """SIGINT after step ``stop_at`` (2: before the first periodic checkpoint; 6: in epoch 2, after the checkpoint
    of step 3 and the epoch end), resume: the run ends as one that was never interrupted.  The task's position
    (``snapshot`` / ``restore``) is what puts its batches and α batches back."""
    task = TASKS.get(name)()
    (tmp_path / "data").mkdir()
    overrides = SMALL + task.example(str(tmp_path / "data")) + DARTS
    whole = search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))

    original = Keeper.step_done

    def step_done(self, where=""):  # the engine's hook after every step, whatever the task
        if self.state["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, where)

    monkeypatch.setattr(Keeper, "step_done", step_done)
    with pytest.raises(Interrupted, match="resume="):
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    assert not os.path.isfile(tmp_path / "cut" / "metrics.json")
    monkeypatch.undo()
    resumed = search(compose_cfg("search", [f"resume={tmp_path / 'cut'}", "progress=false", "num_threads=1"]))

    assert untimed(resumed) == untimed(whole)
    assert read_json(tmp_path / "cut" / "genotype.json") == read_json(tmp_path / "whole" / "genotype.json")


def test_toy_task_learns(tmp_path):
    """Retrained for 2 epochs, a one-edge identity genotype predicts the majority bit of the test sequences far
    better than the majority-class constant does (the error an untrained model is near)."""
    task = toy_task.ToyMajorityTask()
    (tmp_path / "data").mkdir()
    overrides = task.example(str(tmp_path / "data"))
    with open(tmp_path / "data" / "test.txt", encoding="utf-8") as f:
        labels = [int(line.split()[1]) for line in f]
    constant_error = min(labels.count(0), labels.count(1)) / len(labels)
    assert constant_error > 0.3
    ops = list(compose_cfg("train", ["space=hybrid"]).space.ops)
    Genotype.from_dict({"space": "hybrid", "ops": ops, "k": 1, "concat": [3],
                        "nodes": [[{"op": "identity", "input": i}] for i in range(3)]}).save(str(tmp_path / "g.json"))
    cfg = compose_cfg("train", ["experiment=smoke", "batch_size=8", "eval_batch_size=64", "epochs=2",
                                "limit_train_batches=null", "limit_eval_batches=null", "num_threads=1",
                                "progress=false", "space.nodes=4", "space.k=1"] + overrides + [f"arch={tmp_path / 'g.json'}"])
    m = train(cfg, run_dir=str(tmp_path / "train"))
    assert m["steps"] == 2 * toy_task.EXAMPLE_SIZES["train"] // 8
    assert m["test_error"] <= 0.1
