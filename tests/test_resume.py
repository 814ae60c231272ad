"""Resume, stop signals, non-finite policy and bad input (nas.engine.resume).

The central claim: interrupt a run anywhere, resume it, and it ends bit-identical (CPU) to a run that was never
interrupted -- weights, α, optimizer states (ASGD's averages too), data position, random states, history.
"""
import copy
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
from nas.cli import UsageError, check_resume_overrides
from nas.engine.common import CheckpointError
from nas.errors import NonFiniteLossError
from nas.tasks.language_modeling import EpochMeter
from nas.engine.resume import CHECKPOINT, Interrupted, RollbackLimit, load_resume_checkpoint
from nas.engine.search import search
from nas.engine.train import train
from nas.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ["experiment=smoke", "batch_size=4", "eval_batch_size=4", "bptt=8", "limit_train_batches=5",
          "limit_eval_batches=3", "progress=false", "space.steps=3", "checkpoint_every=3", "num_threads=1"]
# state entries that measure time, not computation
TIMING = ("elapsed", "epoch_start", "train_seconds")


def compose_cfg(name, overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def interrupt_after(monkeypatch, steps, sig=signal.SIGINT):
    """Send ``sig`` to this process right after training step number ``steps`` (counted over the whole test)."""
    original, calls = EpochMeter.record, {"n": 0}

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(EpochMeter, "record", record)


def assert_identical(a, b, path="checkpoint"):
    """Bit-exact equality of nested checkpoint contents (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def final_state(run_dir):
    """The run's last checkpoint without its timing entries."""
    ckpt = torch.load(os.path.join(run_dir, CHECKPOINT), weights_only=False)
    for k in TIMING:
        ckpt["state"].pop(k, None)
    ckpt["state"] = untimed(ckpt["state"])
    ckpt.pop("config")
    return ckpt


def untimed(metrics):
    drop = ("wall_seconds", "tokens_per_second", "train_seconds", "test_seconds", "seconds", "cum_wall_seconds",
            "hessian_seconds", "search_seconds")
    if isinstance(metrics, dict):
        return {k: untimed(v) for k, v in metrics.items() if k not in drop}
    if isinstance(metrics, list):
        return [untimed(v) for v in metrics]
    return metrics


def trial_records(run_dir):
    with open(os.path.join(run_dir, "trials.jsonl")) as f:
        return [untimed(json.loads(line)) for line in f]


def resume(name, run_dir, fn, **kwargs):
    return fn(compose_cfg(name, [f"resume={run_dir}", "progress=false", "num_threads=1"]), **kwargs)


# -- N steps, interrupt, resume, M more == N + M uninterrupted --------------------------------------------------
@pytest.mark.parametrize("unrolled,stop_at", [(False, 7), (True, 4), (False, 5)])
def test_search_interrupted_and_resumed_equals_uninterrupted(tmp_path, corpus, monkeypatch, unrolled, stop_at):
    """DARTS first and second order; stopped mid-epoch between checkpoints (7, 4) and at an epoch end (5)."""
    overrides = SEARCH + [f"dataset.root={corpus}", f"strategy.unrolled={str(unrolled).lower()}"]
    whole = search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))

    interrupt_after(monkeypatch, stop_at)
    with pytest.raises(Interrupted, match="resume=") as info:
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    assert info.value.exit_code == 128 + signal.SIGINT
    assert final_state(tmp_path / "cut")["state"]["step"] == stop_at  # the step finished, then the checkpoint
    assert not os.path.isfile(tmp_path / "cut" / "metrics.json")
    monkeypatch.undo()
    resumed = resume("search", str(tmp_path / "cut"), search)

    # the collapse diagnostics are on by default (issue 20): their eigenvalues and shares are part of the equality
    assert all("hessian_eigenvalue" in h["diagnostics"] for h in whole["history"])
    assert untimed(resumed) == untimed(whole)
    assert_identical(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
    assert trial_records(tmp_path / "cut") == trial_records(tmp_path / "whole")  # no epoch recorded twice
    assert json.load(open(tmp_path / "cut" / "genotype.json")) == json.load(open(tmp_path / "whole" / "genotype.json"))


def test_train_resumed_after_the_switch_to_averaged_sgd_equals_uninterrupted(tmp_path, corpus, monkeypatch):
    """NT-ASGD switched after epoch 1; stopped in epoch 2 (ASGD's averages, eta, mu, step in the checkpoint)."""
    import nas.engine.train as train_mod

    monkeypatch.setattr(train_mod, "nonmono_trigger", lambda history, loss, nonmono: True)
    overrides = ["experiment=smoke", "arch=darts_v2", f"dataset.root={corpus}", "progress=false", "epochs=3",
                 "batch_size=4", "bptt=8", "limit_train_batches=6", "checkpoint_every=4", "num_threads=1"]
    whole = train(compose_cfg("train", overrides), run_dir=str(tmp_path / "whole"))
    assert whole["asgd_epoch"] == 1 and whole["history"][2]["averaged"]

    interrupt_after(monkeypatch, 9)  # epoch 2, step 3 of 6: after the switch, between checkpoints
    with pytest.raises(Interrupted):
        train(compose_cfg("train", overrides), run_dir=str(tmp_path / "cut"))
    ckpt = final_state(tmp_path / "cut")
    assert ckpt["averaging"] and any("ax" in s for s in ckpt["optimizer"]["state"].values())
    resumed = resume("train", str(tmp_path / "cut"), train)

    assert untimed(resumed) == untimed(whole)
    assert_identical(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
    best = [torch.load(tmp_path / d / "best.pt", weights_only=False)["model"] for d in ("cut", "whole")]
    assert_identical(best[0], best[1])


@pytest.mark.parametrize("strategy", ["random", "bayesian"])
def test_black_box_search_interrupted_in_a_trial_and_resumed_equals_uninterrupted(tmp_path, corpus, monkeypatch,
                                                                                  strategy, caplog):
    """Stopped inside trial 3's training: the resume finishes that trial from its checkpoint, then goes on."""
    overrides = SEARCH + [f"dataset.root={corpus}", f"strategy={strategy}", "strategy.trials=5",
                          "strategy.trial_epochs=2", "strategy.trial_limit_train_batches=3", "checkpoint_every=2"]
    if strategy == "bayesian":
        overrides.append("strategy.n_startup_trials=2")
    whole = search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))

    interrupt_after(monkeypatch, 6 * 2 + 3)  # 6 steps a trial: step 3 of trial 3
    with pytest.raises(Interrupted, match="in trial 3"):
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    assert len(trial_records(tmp_path / "cut")) == 2
    assert load_resume_checkpoint(str(tmp_path / "cut" / "trials" / "0003"), "train_lm")["state"]["step"] == 3
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        resumed = resume("search", str(tmp_path / "cut"), search)
    trial_dir = tmp_path / "cut" / "trials" / "0003"
    assert f"resuming the interrupted trial in {trial_dir}" in caplog.text
    assert f"resumed {trial_dir} at step 3" in caplog.text  # from its checkpoint, not from scratch

    assert untimed(resumed) == untimed(whole)
    assert trial_records(tmp_path / "cut") == trial_records(tmp_path / "whole")
    trained = sorted(os.listdir(tmp_path / "whole" / "trials"))  # (a repeated genotype is not trained again)
    assert sorted(os.listdir(tmp_path / "cut" / "trials")) == trained and "0003" in trained
    for d in trained:
        assert_identical(final_state(tmp_path / "cut" / "trials" / d), final_state(tmp_path / "whole" / "trials" / d), d)


def test_resumed_black_box_search_counts_the_wall_seconds_of_every_process(tmp_path, corpus, monkeypatch):
    """metrics.json wall_seconds of a black-box search stopped in trial 3 and resumed: the search's seconds over both
    processes, so at least every trial's own seconds (the last record's cum_wall_seconds, trial 3's part before the
    stop included) and at most the two processes' seconds timed around them.  The first process is slowed (0.3 s a
    step, 1.5 s for trial 3's two steps) so that it outweighs the second: neither the last process's seconds alone
    nor those plus the first process's up to trial 2 (trial 3's part before the stop left out) reach the lower
    bounds."""
    overrides = SEARCH + [f"dataset.root={corpus}", "strategy=random", "strategy.trials=4", "strategy.trial_epochs=1",
                          "strategy.trial_limit_train_batches=3", "checkpoint_every=2"]
    original, steps = EpochMeter.record, [0]

    def slow(self, *args, **kwargs):
        original(self, *args, **kwargs)
        steps[0] += 1
        time.sleep(1.5 if steps[0] > 6 else 0.3)

    monkeypatch.setattr(EpochMeter, "record", slow)
    interrupt_after(monkeypatch, 3 * 2 + 2)  # 3 steps a trial: step 2 of trial 3
    t0 = time.time()
    with pytest.raises(Interrupted, match="in trial 3"):
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    first = time.time() - t0
    monkeypatch.undo()
    t0 = time.time()
    resumed = resume("search", str(tmp_path / "cut"), search)
    second = time.time() - t0

    with open(tmp_path / "cut" / "trials.jsonl") as f:
        records = [json.loads(line) for line in f]
    trials_seconds = records[-1]["cum_wall_seconds"]
    assert len(records) == 4 and trials_seconds >= 6 * 0.3 + 2 * 1.5  # the slowed steps are in the trials' seconds
    assert second < trials_seconds  # the bound below can fail: the last process alone is shorter
    assert trials_seconds <= resumed["wall_seconds"] <= first + second
    # the first process's seconds up to trial 2's record, then trials 3 (both parts) and 4: a lower bound that the
    # resumed trial's part before the stop must be counted to meet (the first process's setup is in both sides)
    assert records[1]["search_seconds"] + records[2]["wall_seconds"] + records[3]["wall_seconds"] \
        <= resumed["wall_seconds"]
    assert all(a["search_seconds"] <= b["search_seconds"] for a, b in zip(records, records[1:]))
    assert records[-1]["search_seconds"] <= resumed["wall_seconds"]


def test_classifier_search_and_train_resume_bit_exact(tmp_path, monkeypatch):
    """The sentence-classification loops (shuffled, bucketed batches; an endless α stream) resume exactly too."""
    root = tmp_path / "sst"
    root.mkdir()
    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful", "great", "dull", "the", "a", "film", "plot"]
    for split, n in (("train", 160), ("dev", 24)):
        with open(root / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                f.write(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) + f"\t{rng.randint(0, 1)}\n")
    common = ["experiment=smoke", "space=hybrid", "dataset=sst2", f"dataset.root={root}", "batch_size=8",
              "eval_batch_size=8", "limit_train_batches=5", "progress=false", "checkpoint_every=2", "num_threads=1"]
    for name, fn, extra, stop_at in (("search", search, [], 7), ("train", train, ["arch=darts_v2"], 3)):
        if name == "train":
            extra = [f"arch={tmp_path / 'search_whole'}"]
        overrides = common + extra
        whole = fn(compose_cfg(name, overrides), run_dir=str(tmp_path / f"{name}_whole"))
        calls = {"n": 0}
        import nas.tasks.classification as classify

        original = classify.SentenceMeter.record

        def record(self, *args, _orig=original, **kwargs):
            _orig(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(classify.SentenceMeter, "record", record)
        with pytest.raises(Interrupted) as info:
            fn(compose_cfg(name, overrides), run_dir=str(tmp_path / f"{name}_cut"))
        assert info.value.exit_code == 128 + signal.SIGTERM
        monkeypatch.undo()
        resumed = resume(name, str(tmp_path / f"{name}_cut"), fn)
        assert untimed(resumed) == untimed(whole), name
        assert_identical(final_state(tmp_path / f"{name}_cut"), final_state(tmp_path / f"{name}_whole"), name)


# -- the non-finite policy -------------------------------------------------------------------------------------
def test_nan_stop_keeps_the_last_good_checkpoint_and_writes_nothing_non_finite(tmp_path, corpus):
    cfg = compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "lr=1e30", "clip=1e30", "checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError, match="step"):
        search(cfg, run_dir=str(tmp_path))
    ckpt = load_resume_checkpoint(str(tmp_path), "search_lm")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not os.path.isfile(tmp_path / "metrics.json")


def test_nan_rollback_reloads_the_last_checkpoint_halves_the_lr_and_goes_on(tmp_path, corpus, monkeypatch):
    import nas.tasks.language_modeling as search_mod  # the LM weight update the search loop calls

    original, calls = search_mod.weight_step, {"n": 0, "lrs": []}

    def flaky(model, optimizer, *args, **kwargs):  # the 5th weight step's loss is NaN, once
        calls["n"] += 1
        calls["lrs"].append(optimizer.param_groups[0]["lr"])
        if calls["n"] == 5:
            raise NonFiniteLossError("training loss became nan")
        return original(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(search_mod, "weight_step", flaky)
    metrics = search(compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "nan_policy=rollback"]),
                     run_dir=str(tmp_path))
    assert metrics["rollbacks"] == 1 and metrics["steps"] == 10  # steps 4-5 were redone from the step-3 checkpoint
    assert calls["n"] == 12
    # the redone step 4 is the first step 4 at half the learning rate (same segment length: same data position)
    assert calls["lrs"][5] == pytest.approx(calls["lrs"][3] / 2)
    assert final_state(tmp_path)["state"]["lr_scale"] == 0.5


def test_rollback_gives_up_after_the_limit(tmp_path, corpus):
    cfg = compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "lr=1e30", "clip=1e30", "nan_policy=rollback"])
    with pytest.raises(RollbackLimit, match="rollbacks"):
        search(cfg, run_dir=str(tmp_path))


RETRAIN = ["experiment=smoke", "arch=darts_v2", "progress=false", "batch_size=4", "bptt=8", "limit_train_batches=6",
           "checkpoint_every=4", "num_threads=1", "nan_policy=reload_best"]


def nan_at(monkeypatch, run_dir, calls_with_nan):
    """Make retraining's weight steps number ``calls_with_nan`` (counted from 1) raise NonFiniteLossError, and
    record what the reload must restore: ``seen["best"]``, best.pt as it was on disk at the first NaN, and
    ``seen["after"]``, the state the first step after it starts from (weights, optimizer, lr / (seq_len / bptt),
    the checkpoint written on disk)."""
    import nas.tasks.language_modeling as train_mod  # the LM weight update the retraining loop calls

    original, seen = train_mod.weight_step, {"n": 0}

    def flaky(model, optimizer, data, *args, **kwargs):
        seen["n"] += 1
        if seen.get("nan") == seen["n"] - 1 and "after" not in seen:
            seen["after"] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                             "optimizer": type(optimizer),
                             "state": copy.deepcopy(optimizer.state_dict()["state"]),
                             "group_lr": optimizer.param_groups[0]["lr"],
                             "lr": optimizer.param_groups[0]["lr"] * 8 / data.size(0),
                             "checkpoint": torch.load(os.path.join(run_dir, CHECKPOINT), weights_only=False)}
        if seen["n"] in calls_with_nan:
            if "nan" not in seen:
                best = os.path.join(run_dir, "best.pt")
                seen["nan"] = seen["n"]
                seen["best"] = torch.load(best, weights_only=False) if os.path.isfile(best) else None
            raise NonFiniteLossError("training loss became nan")
        return original(model, optimizer, data, *args, **kwargs)

    monkeypatch.setattr(train_mod, "weight_step", flaky)
    return seen


def test_nan_reload_best_goes_back_to_the_best_weights_and_optimizer_at_the_same_lr(tmp_path, corpus, monkeypatch):
    """DARTS rnn/train.py: a NaN in epoch 2 reloads best.pt (epoch 1, SGD phase) with its optimizer (the switch to
    ASGD made after epoch 1 is undone) and goes on with epoch 2 at the configured lr."""
    import nas.engine.train as train_mod

    monkeypatch.setattr(train_mod, "nonmono_trigger", lambda history, loss, nonmono: True)  # switch at each chance
    run = str(tmp_path / "run")
    seen = nan_at(monkeypatch, run, {9})  # epoch 2, step 3 of 6: after the switch to ASGD
    m = train(compose_cfg("train", RETRAIN + [f"dataset.root={corpus}", "epochs=3"]), run_dir=run)

    assert seen["best"]["epoch"] == 1 and seen["best"]["averaged"] is False  # the only validated epoch so far
    after = seen["after"]
    assert_identical(after["model"], seen["best"]["model"])  # the weights are best.pt's
    assert after["optimizer"] is torch.optim.SGD and after["state"] == {}  # back to SGD, as it was at epoch 1
    assert after["lr"] == pytest.approx(20.0, rel=1e-12)  # the configured lr (smoke: 20), not halved
    ck = after["checkpoint"]  # written right after the reload
    assert ck["position"] == {"epoch": 2, "batch": 0, "row": 0} and ck["hidden"] is None
    assert ck["state"]["rollbacks"] == 1 and ck["state"]["reloads_since_best"] == 1
    assert ck["state"]["asgd_epoch"] is None and ck["state"]["lr_scale"] == 1.0 and ck["averaging"] is False
    assert_identical(ck["model"], seen["best"]["model"])
    # epoch 2 was run again from its start, the switch came again after it; 2 steps of the NaN epoch counted
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3] and m["asgd_epoch"] == 2
    assert m["rollbacks"] == 1 and m["steps"] == 3 * 6 + 2


def test_nan_reload_best_restores_asgd_averages_and_resumes_bit_identically(tmp_path, corpus, monkeypatch):
    """ASGD from the start: best.pt holds the averaged weights and ASGD's state (ax, eta, mu, step); a NaN in
    epoch 3 puts both back and goes on with the epoch after the best one.  A run stopped 2 steps after the reload
    and resumed ends bit-identical to one that was not stopped."""
    overrides = RETRAIN + [f"dataset.root={corpus}", "epochs=4", "optimizer=asgd"]
    seen = nan_at(monkeypatch, str(tmp_path / "whole"), {15})  # epoch 3, step 3
    whole = train(compose_cfg("train", overrides), run_dir=str(tmp_path / "whole"))

    best, after = seen["best"], seen["after"]
    assert best["averaged"] is True and best["epoch"] in (1, 2)
    assert_identical(after["model"], best["model"])  # the averaged weights of the best epoch
    assert after["optimizer"] is torch.optim.ASGD
    # ASGD's state as saved with the best weights; eta is ASGD's copy of this step's lr (20 * seq_len / 8)
    assert all(float(s.pop("eta")) == pytest.approx(after["group_lr"]) for s in after["state"].values())
    saved = {k: {n: t for n, t in v.items() if n != "eta"} for k, v in best["optimizer"]["state"].items()}
    assert_identical(after["state"], saved)
    assert all("ax" in s for s in after["state"].values())
    assert after["lr"] == pytest.approx(20.0, rel=1e-12)
    assert after["checkpoint"]["position"]["epoch"] == best["epoch"] + 1
    assert whole["rollbacks"] == 1

    seen_cut = nan_at(monkeypatch, str(tmp_path / "cut"), {15})
    with monkeypatch.context() as m:
        interrupt_after(m, 16)  # 16 successful steps: 2 after the reload
        with pytest.raises(Interrupted):
            train(compose_cfg("train", overrides), run_dir=str(tmp_path / "cut"))
    assert seen_cut["nan"] == 15 and final_state(tmp_path / "cut")["state"]["rollbacks"] == 1
    resumed = resume("train", str(tmp_path / "cut"), train)
    assert untimed(resumed) == untimed(whole)
    assert_identical(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))


def test_nan_reload_best_before_any_best_and_after_the_limit(tmp_path, corpus, monkeypatch):
    seen = nan_at(monkeypatch, str(tmp_path / "a"), {3})  # epoch 1: nothing validated yet
    with pytest.raises(NonFiniteLossError, match="no best checkpoint yet"):
        train(compose_cfg("train", RETRAIN + [f"dataset.root={corpus}", "epochs=2"]), run_dir=str(tmp_path / "a"))
    assert load_resume_checkpoint(str(tmp_path / "a"), "train_lm")["state"]["step"] == 0  # the first one, kept
    assert seen["best"] is None and not os.path.isfile(tmp_path / "a" / "metrics.json")
    monkeypatch.undo()
    seen = nan_at(monkeypatch, str(tmp_path / "b"), set(range(7, 100)))  # every step after epoch 1
    with pytest.raises(RollbackLimit, match="8 times without a new best"):
        train(compose_cfg("train", RETRAIN + [f"dataset.root={corpus}", "epochs=3"]), run_dir=str(tmp_path / "b"))
    assert seen["n"] == 6 + 9  # epoch 1, then the first NaN and 8 reloads, each ending at once in a NaN
    assert load_resume_checkpoint(str(tmp_path / "b"), "train_lm")["state"]["rollbacks"] == 8


def test_nan_reload_best_is_refused_where_there_is_no_best_checkpoint(tmp_path, corpus, monkeypatch):
    with pytest.raises(ConfigError, match="search.py keeps no best checkpoint"):
        search(compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "nan_policy=reload_best"]),
               run_dir=str(tmp_path / "s"))
    assert not os.path.exists(tmp_path / "s")
    with pytest.raises(ConfigError, match="sentence classification takes nan_policy=stop or rollback"):
        train(compose_cfg("train", ["experiment=smoke", "arch=darts_v2", "dataset=sst2", "space=hybrid",
                                    "nan_policy=reload_best"]), run_dir=str(tmp_path / "c"))


# -- bad input: a clear error, nothing damaged -------------------------------------------------------------------
@pytest.fixture()
def interrupted_run(tmp_path, corpus, monkeypatch):
    """A search stopped after step 4 (checkpoints at steps 3 and 4)."""
    interrupt_after(monkeypatch, 4)
    with pytest.raises(Interrupted):
        search(compose_cfg("search", SEARCH + [f"dataset.root={corpus}"]), run_dir=str(tmp_path / "run"))
    monkeypatch.undo()
    return tmp_path / "run"


def snapshot(run_dir):
    return {p: open(p, "rb").read() for p in glob.glob(os.path.join(run_dir, "**"), recursive=True)
            if os.path.isfile(p) and "/tb/" not in p and not p.endswith(".log")}


def test_truncated_checkpoint_is_named_and_the_previous_one_offered(interrupted_run):
    path = interrupted_run / CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    before = snapshot(interrupted_run)
    with pytest.raises(CheckpointError, match=r"corrupt or truncated.*checkpoint.prev.pt \(step 3\) is intact"):
        resume("search", str(interrupted_run), search)
    assert snapshot(interrupted_run) == before


def _alphas_of_the_wrong_shape(ckpt):
    ckpt["strategy"]["alphas"] = torch.zeros(5, 5)


def _written_by_a_train_run(ckpt):
    ckpt["kind"] = "train_lm"


@pytest.mark.parametrize("tamper,message", [
    (_alphas_of_the_wrong_shape, r"α.*shape \(5, 5\).*\(6, 5\)"),
    (_written_by_a_train_run, "not a resume checkpoint of a search_lm run"),
])
def test_checkpoint_that_does_not_fit_the_run_is_refused(interrupted_run, tamper, message):
    ckpt = torch.load(interrupted_run / CHECKPOINT, weights_only=False)
    tamper(ckpt)
    torch.save(ckpt, interrupted_run / CHECKPOINT)
    before = snapshot(interrupted_run)
    with pytest.raises(CheckpointError, match=message):
        resume("search", str(interrupted_run), search)
    assert snapshot(interrupted_run) == before


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(interrupted_run, monkeypatch):
    import nas.engine.resume as resume_mod

    before = (interrupted_run / CHECKPOINT).read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # half the bytes reach the disk, then it is full
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        resume("search", str(interrupted_run), search)
    monkeypatch.undo()
    assert (interrupted_run / CHECKPOINT).read_bytes() == before
    assert not glob.glob(str(interrupted_run / ".tmp-*"))
    assert load_resume_checkpoint(str(interrupted_run), "search_lm")["state"]["step"] == 4


def test_a_run_dir_holding_a_run_is_refused_and_left_alone(interrupted_run, corpus, tmp_path):
    cfg = compose_cfg("search", SEARCH + [f"dataset.root={corpus}"])
    before = snapshot(interrupted_run)
    with pytest.raises(ConfigError, match=r"unfinished run; continue it with `python search.py resume="):
        search(cfg, run_dir=str(interrupted_run))
    assert snapshot(interrupted_run) == before
    resume("search", str(interrupted_run), search)
    finished = snapshot(interrupted_run)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        search(cfg, run_dir=str(interrupted_run))
    with pytest.raises(ConfigError, match="has finished"):
        resume("search", str(interrupted_run), search)
    assert snapshot(interrupted_run) == finished
    with pytest.raises(ConfigError, match="no such run dir"):
        resume("search", str(tmp_path / "nowhere"), search)


def test_resume_takes_only_runtime_overrides():
    check_resume_overrides(["resume=out/x", "num_threads=1", "progress=false", "device=cpu"])
    with pytest.raises(UsageError, match=r"drop \['epochs=3'\]"):
        check_resume_overrides(["resume=out/x", "epochs=3"])
    check_resume_overrides(["epochs=3"])  # not resuming: anything goes


def test_same_seed_bit_identical_and_deterministic_mode(tmp_path, corpus):
    overrides = SEARCH + [f"dataset.root={corpus}", "strategy.unrolled=true"]
    search(compose_cfg("search", overrides), run_dir=str(tmp_path / "a"))
    try:
        search(compose_cfg("search", overrides + ["deterministic=true"]), run_dir=str(tmp_path / "b"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert_identical(final_state(tmp_path / "a"), final_state(tmp_path / "b"))


# -- real signals to a real process ------------------------------------------------------------------------------
CLI = ["experiment=smoke", "batch_size=4", "eval_batch_size=4", "bptt=8", "limit_train_batches=40",
       "limit_eval_batches=3", "progress=false", "space.steps=3", "epochs=3", "num_threads=1", "checkpoint_every=3"]


def launch(args, env):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "search.py")] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, run_dir, step, timeout=300):
    """Until the process's own checkpoint reports ``step`` (``timeout``: a hang guard, not a timing assumption)."""
    deadline = time.time() + timeout
    while checkpoint_step(run_dir) < step:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path, corpus):
    """SIGTERM once the run's checkpoint reports step 3 of 120 (r07: not after a wall-clock delay, which a busy
    machine stretches or shrinks)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    run_dir = str(tmp_path / "run")
    proc = launch(CLI + [f"dataset.root={corpus}", f"hydra.run.dir={run_dir}"], env)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert f"Resume with: python search.py resume={run_dir}" in out
    step = load_resume_checkpoint(run_dir, "search_lm")["state"]["step"]
    assert 3 <= step < 120
    proc = launch([f"resume={run_dir}", "progress=false"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert json.load(open(os.path.join(run_dir, "metrics.json")))["steps"] == 120
    assert f"resumed {run_dir} at step {step}" in open(os.path.join(run_dir, "search.log")).read()


def checkpoint_step(run_dir):
    try:
        return load_resume_checkpoint(run_dir, "search_lm")["state"]["step"]
    except CheckpointError:
        return -1


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_like_an_uninterrupted_run(tmp_path, corpus):
    """Three SIGKILLs, each at a random moment after the (resumed) process has made progress; a loadable
    checkpoint after every kill; the end is bit-identical to an uninterrupted run.

    The kill moments are drawn as training steps (the run has 120), reached when the process's own checkpoint
    reports them, plus a sub-step delay of at most 50 ms; the last target is step 99, so at least 20 steps and three
    evaluations remain after any kill, whatever the machine's load (r07: a wall-clock delay measured on another
    run once landed after the end on a busy machine)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = CLI + [f"dataset.root={corpus}"]
    whole = str(tmp_path / "whole")
    proc = launch(args + [f"hydra.run.dir={whole}"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    cut, rng, steps = str(tmp_path / "cut"), random.Random(0), [0]
    targets = sorted(rng.sample(range(3, 100), 3))
    proc = launch(args + [f"hydra.run.dir={cut}"], env)
    for target in targets:
        deadline = time.time() + 300
        # this process has checkpointed progress of its own, up to the drawn step
        while checkpoint_step(cut) < max(target, steps[-1] + 1):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.05))
        assert proc.poll() is None, "the run ended before it was killed"
        proc.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
        proc.communicate()
        steps.append(checkpoint_step(cut))  # a loadable checkpoint after every kill
        assert steps[-1] > steps[-2]
        proc = launch([f"resume={cut}", "progress=false"], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert steps[-1] < 120
    assert_identical(final_state(cut), final_state(whole))
    assert json.load(open(os.path.join(cut, "genotype.json"))) == json.load(open(os.path.join(whole, "genotype.json")))
    assert trial_records(cut) == trial_records(whole)


def test_a_resume_on_another_thread_count_than_the_checkpoints_says_it_will_not_match(interrupted_run, caplog):
    """The floats depend on the thread count (num_threads: null takes the cores free at each start): a resume that
    runs on another count than the checkpoint was written on says so (a fresh user's resume went from 2 threads to
    1 without a word)."""
    import logging

    assert torch.load(interrupted_run / CHECKPOINT, weights_only=False)["threads"] == 1  # SEARCH: num_threads=1
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING):
            search(compose_cfg("search", [f"resume={interrupted_run}", "progress=false", "num_threads=2"]))
        assert "written by a process on 1 CPU thread(s) and this one runs on 2" in caplog.text
        assert "resume with num_threads=1 to match" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_the_resume_hint_names_a_thread_count_chosen_from_the_free_cores(monkeypatch):
    import nas.engine.common as common
    from nas.engine.resume import interrupted

    monkeypatch.setattr(common, "_WATCH", None)  # num_threads= or OMP_NUM_THREADS given: the user's own count
    assert "num_threads" not in str(interrupted("/r", "search.py", "after step 3"))
    monkeypatch.setattr(common, "_WATCH", common.FreeCoreWatch(2, 2, every=30.0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        message = str(interrupted("/r", "search.py", "after step 3"))
    finally:
        torch.set_num_threads(before)
    assert message.endswith("Resume with: python search.py resume=/r (it ran on 1 CPU thread(s), chosen from the free "
                            "cores: add num_threads=1 for a continuation bit-identical to an uninterrupted run)")


def test_resuming_another_scripts_run_names_the_script(interrupted_run):
    with pytest.raises(ConfigError, match=r"is a run of search.py: resume it with `python search.py resume="):
        resume("train", str(interrupted_run), train)


def test_a_nan_stopped_run_resumes_with_rollback(tmp_path, corpus, monkeypatch):
    """nan_policy may be given anew on resume: a run stopped by a NaN goes on at a lower learning rate."""
    import nas.tasks.language_modeling as search_mod  # the LM weight update the search loop calls

    original, calls = search_mod.weight_step, {"n": 0}

    def flaky(*args, **kwargs):  # step 5 overflows at the full learning rate (the first run, and its resume)
        calls["n"] += 1
        if calls["n"] in (5, 6):
            raise NonFiniteLossError("training loss became inf")
        return original(*args, **kwargs)

    monkeypatch.setattr(search_mod, "weight_step", flaky)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        search(compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "checkpoint_every=1"]), run_dir=str(tmp_path))
    metrics = search(compose_cfg("search", [f"resume={tmp_path}", "nan_policy=rollback", "num_threads=1"]))
    assert metrics["rollbacks"] == 1 and metrics["steps"] == 10
    assert final_state(tmp_path)["state"]["lr_scale"] == 0.5


@pytest.mark.slow
def test_cli_refuses_a_used_run_dir_before_hydra_writes_into_it(interrupted_run):
    hydra_files = {p: open(p, "rb").read() for p in glob.glob(str(interrupted_run / ".hydra" / "*"))}
    before = snapshot(interrupted_run)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "experiment=smoke", "arch=darts_v2",
                           f"hydra.run.dir={interrupted_run}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "already holds an unfinished run" in proc.stderr
    assert snapshot(interrupted_run) == before and not os.path.isfile(interrupted_run / "train.log")
    assert {p: open(p, "rb").read() for p in glob.glob(str(interrupted_run / ".hydra" / "*"))} == hydra_files
