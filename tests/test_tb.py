"""TensorBoard (r05): one step per point in every scalar tag -- after a rollback, a reload of the best checkpoint
and a resume -- and the README's tag table is the code's list of tags."""
import os
import re
import signal

import pytest

from nas.errors import NonFiniteLossError
from nas.engine.resume import Interrupted
from nas.engine.search import search
from nas.engine.tb import OTHER_TAGS, SCALAR_TAGS, scalar_tag_allowed
from nas.engine.train import train
from test_resume import RETRAIN, SEARCH, compose_cfg, interrupt_after, nan_at, resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scalars(run_dir) -> dict:
    """{tag: [(step, value)]} as TensorBoard reads the run's events (purges included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def assert_one_point_per_step(points: dict, script: str) -> None:
    for tag, pts in points.items():
        steps = [s for s, _ in pts]
        assert all(a < b for a, b in zip(steps, steps[1:])), (tag, steps)
    unknown = {t for t in points if not scalar_tag_allowed(t, SCALAR_TAGS[script])}
    assert not unknown, unknown


def readme_tags() -> dict:
    """{script: {tag}} and the set of non-scalar tags, from the README's "## TensorBoard" table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("\n## TensorBoard\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, "no table rows in the README's TensorBoard section"
    by_script, other = {"search.py": set(), "train.py": set()}, set()
    for row in rows:
        tag_cell, script_cell = [c.strip() for c in row.strip("|").split("|")][:2]
        tags = set(re.findall(r"`([^`]+)`", tag_cell.split("(")[0]))  # not the stored names in parentheses
        scripts = set(re.findall(r"`([a-z]+\.py)`", script_cell))
        assert scripts and scripts <= set(by_script), row
        for s in scripts:
            by_script[s] |= tags
        if "(image" in tag_cell or "(text" in tag_cell:
            other |= tags
    return by_script, other


def test_readme_table_lists_exactly_the_tags_each_script_writes():
    by_script, other = readme_tags()
    for script in ("search.py", "train.py"):
        code = set(SCALAR_TAGS[script]) | set(OTHER_TAGS[script])
        assert by_script[script] - code == set(), (script, "in the README only", by_script[script] - code)
        assert code - by_script[script] == set(), (script, "in the code only", code - by_script[script])
    assert other == set(OTHER_TAGS["search.py"]) | set(OTHER_TAGS["train.py"])


def test_search_rollback_writes_each_step_once_with_the_redone_values(tmp_path, corpus, monkeypatch):
    """The 5th weight step's loss is NaN: back to the step-3 checkpoint at half the lr, steps 4 and 5 redone.  The
    events of the abandoned step 4 are not in TensorBoard; those of the redone step 4 (half the lr) are."""
    import nas.tasks.language_modeling as search_mod  # the LM weight update the search loop calls

    original, calls = search_mod.weight_step, []

    def flaky(model, optimizer, *args, **kwargs):
        lr = optimizer.param_groups[0]["lr"]
        if len(calls) == 4:
            calls.append((None, lr))
            raise NonFiniteLossError("training loss became nan")
        raw, hidden = original(model, optimizer, *args, **kwargs)
        calls.append((raw, lr))
        return raw, hidden

    monkeypatch.setattr(search_mod, "weight_step", flaky)
    run = tmp_path / "run"
    m = search(compose_cfg("search", SEARCH + [f"dataset.root={corpus}", "nan_policy=rollback", "log_every=1"]),
               run_dir=str(run))
    assert m["rollbacks"] == 1 and m["steps"] == 10 and len(calls) == 12
    points = scalars(run)
    assert_one_point_per_step(points, "search.py")
    # calls 1-4 were steps 1-4, call 5 the NaN, calls 6-12 steps 4-10
    assert [s for s, _ in points["train/loss"]] == list(range(1, 11))
    lr, loss = dict(points["lr/weights"]), dict(points["train/loss"])
    assert calls[5][1] == pytest.approx(calls[3][1] / 2)  # the same segment, at half the lr
    assert lr[4] == pytest.approx(calls[5][1], rel=1e-6) and lr[3] == pytest.approx(calls[2][1], rel=1e-6)
    assert [loss[k] for k in range(4, 11)] == pytest.approx([raw for raw, _ in calls[5:]], rel=1e-6)
    assert points["faults/rollback_lr_scale"] == [(1, 0.5)]
    assert [s for s, _ in points["valid/ppl"]] == [5, 10]  # the epoch ends, on the step axis


def test_train_reload_best_writes_each_step_once_and_the_epochs_again_at_later_steps(tmp_path, corpus, monkeypatch):
    """A NaN at step 9 (epoch 2) reloads best.pt (epoch 1) and runs epoch 2 again: the step counter goes on, so
    epoch 2's second validation is a later point, and no step is written twice."""
    run = str(tmp_path / "run")
    nan_at(monkeypatch, run, {9})
    m = train(compose_cfg("train", RETRAIN + [f"dataset.root={corpus}", "epochs=3", "log_every=1"]), run_dir=run)
    assert m["rollbacks"] == 1 and m["steps"] == 20
    points = scalars(run)
    assert_one_point_per_step(points, "train.py")
    # steps 1-6 epoch 1; 7-8 epoch 2 until the NaN; 9-14 epoch 2 again; 15-20 epoch 3
    assert [s for s, _ in points["train/loss"]] == list(range(1, 21))
    assert [s for s, _ in points["valid/ppl"]] == [6, 14, 20]
    assert [v for _, v in points["valid/ppl"]] == pytest.approx([h["valid_ppl"] for h in m["history"]], rel=1e-6)
    assert points["faults/reload_best_epoch"] == [(1, 2.0)]
    assert points["test/ppl"] == [(20, pytest.approx(m["test_ppl"], rel=1e-6))]


def test_reload_best_again_and_again_writes_one_point_per_reload(tmp_path, corpus, monkeypatch):
    """Every step after epoch 1 is NaN: 8 reloads at the same training step, then RollbackLimit."""
    from nas.engine.resume import RollbackLimit

    run = str(tmp_path / "run")
    nan_at(monkeypatch, run, set(range(7, 100)))
    with pytest.raises(RollbackLimit):
        train(compose_cfg("train", RETRAIN + [f"dataset.root={corpus}", "epochs=3", "log_every=1"]), run_dir=run)
    points = scalars(run)
    assert_one_point_per_step(points, "train.py")
    assert points["faults/reload_best_epoch"] == [(k, 2.0) for k in range(1, 9)]


def test_resumed_search_has_the_tensorboard_of_an_uninterrupted_one(tmp_path, corpus, monkeypatch):
    """Stopped at step 12 of 15 and resumed: every scalar tag has the same points as a run never stopped -- the
    cost-axis tags too (a purge at the checkpoint's step once removed search/best_vs_tokens, whose steps are token
    counts).  search/best_vs_seconds and diagnostics/hessian_seconds are wall time: only their steps are compared."""
    overrides = SEARCH + [f"dataset.root={corpus}", "epochs=3", "log_every=1"]
    search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))
    interrupt_after(monkeypatch, 12, signal.SIGTERM)
    with pytest.raises(Interrupted):
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    monkeypatch.undo()
    resume("search", str(tmp_path / "cut"), search)
    whole, cut = scalars(tmp_path / "whole"), scalars(tmp_path / "cut")
    assert_one_point_per_step(cut, "search.py")
    assert set(cut) == set(whole)
    for tag in whole:
        if tag == "search/best_vs_seconds":
            assert len(cut[tag]) == len(whole[tag]) == 3
        elif tag == "diagnostics/hessian_seconds":
            assert [p for p, _ in cut[tag]] == [p for p, _ in whole[tag]] and len(cut[tag]) == 3
        else:
            assert cut[tag] == whole[tag], tag
    assert [s for s, _ in cut["search/best_vs_tokens"]] == [s for s, _ in whole["search/best_vs_tokens"]]
    assert len(cut["search/best_vs_tokens"]) == 3
