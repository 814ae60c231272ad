"""r02: every launch-relative path of a run config is resolved once, at the start, and saved resolved, so a resume
launched from any directory reads exactly the files the run started with."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from nas.engine.paths import resolve_paths, resolve_storage
from nas.engine.resume import Interrupted, load_resume_checkpoint
from nas.engine.search import search
from nas.engine.train import train
from nas.errors import ConfigError
from test_resume import SEARCH, assert_identical, compose_cfg, final_state, interrupt_after, resume, untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_corpus(folder, seed):
    """train/valid/test.txt over the same 40 words (the same vocabulary size, so a model built on the wrong corpus
    would still load a checkpoint: only the results tell them apart)."""
    os.makedirs(folder, exist_ok=True)
    rng, words = random.Random(seed), [f"w{i}" for i in range(40)]
    for split, lines in (("train", 300), ("valid", 60), ("test", 60)):
        with open(os.path.join(folder, f"{split}.txt"), "w", encoding="utf-8") as f:
            for _ in range(lines):
                f.write(" " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 11))) + " \n")


@pytest.fixture()
def two_dirs(tmp_path):
    """``a/launch`` and ``b/launch``, each with ``../corpus`` beside it: the same relative path, two corpora."""
    for side, seed in (("a", 0), ("b", 1)):
        os.makedirs(tmp_path / side / "launch")
        write_corpus(tmp_path / side / "corpus", seed)
    return tmp_path / "a" / "launch", tmp_path / "b" / "launch"


def test_storage_urls_resolved_against_the_launch_dir():
    assert resolve_storage("sqlite:///study.db", "/l/d") == "sqlite:////l/d/study.db"
    assert resolve_storage("sqlite:///../s.db?timeout=30", "/l/d") == "sqlite:////l/s.db?timeout=30"
    assert resolve_storage("sqlite+pysqlite:///x/s.db", "/l") == "sqlite+pysqlite:////l/x/s.db"
    assert resolve_storage("journal:j.log", "/l/d") == "journal:/l/d/j.log"
    for kept in ("sqlite:////abs/s.db", "sqlite://", "sqlite:///:memory:", "journal:/abs/j.log",
                 "postgresql://nas@host:5432/db", "mysql://u:p@h/db"):
        assert resolve_storage(kept, "/l/d") == kept


def test_resolve_paths_touches_only_launch_relative_paths():
    cfg = OmegaConf.create({"dataset": {"root": "../data", "cache_dir": "~/c"}, "arch": "darts_v2",
                            "strategy": {"storage": "journal:x.log"}})
    changed = resolve_paths(cfg, "/l/d")
    assert cfg.dataset.root == "/l/data" and cfg.dataset.cache_dir == os.path.expanduser("~/c")
    assert cfg.arch == "darts_v2" and cfg.strategy.storage == "journal:/l/d/x.log"  # a published name stays
    assert set(changed) == {"dataset.root", "dataset.cache_dir", "strategy.storage"}
    cfg = OmegaConf.create({"dataset": {"root": None, "cache_dir": None}, "arch": "runs/s1/genotype.json",
                            "strategy": {"storage": None}})
    assert resolve_paths(cfg, "/l") == {"arch": ("runs/s1/genotype.json", "/l/runs/s1/genotype.json")}
    assert cfg.dataset.root is None and cfg.strategy.storage is None  # null: NAS_DATA / the run dir's study.db


@pytest.mark.parametrize("script", ["search", "train"])
def test_resumed_from_another_dir_reads_the_original_corpus(two_dirs, tmp_path, monkeypatch, script):
    """Started in a/launch with dataset.root=../corpus, stopped, resumed from b/launch, where ../corpus is another
    corpus: the run ends bit-identical to an uninterrupted one on a's corpus, and config.yaml holds the absolute
    path."""
    a, b = two_dirs
    fn = search if script == "search" else train
    overrides = (SEARCH if script == "search" else
                 ["experiment=smoke", "arch=darts_v2", "progress=false", "batch_size=4", "bptt=8",
                  "limit_train_batches=6", "checkpoint_every=4", "num_threads=1"]) + ["dataset.root=../corpus"]
    monkeypatch.chdir(a)
    whole = fn(compose_cfg(script, overrides), run_dir=str(tmp_path / "whole"))
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(Interrupted):
            fn(compose_cfg(script, overrides), run_dir=str(tmp_path / "cut"))
    saved = OmegaConf.load(tmp_path / "cut" / "config.yaml")
    assert saved.dataset.root == str(tmp_path / "a" / "corpus")
    monkeypatch.chdir(b)
    resumed = resume(script, str(tmp_path / "cut"), fn)
    assert untimed(resumed) == untimed(whole)
    assert_identical(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))


def test_old_run_with_a_relative_root_resolves_against_its_recorded_launch_dir(two_dirs, tmp_path, monkeypatch):
    """A config.yaml saved before paths were resolved (relative dataset.root): resumed against the launch dir Hydra
    recorded in .hydra/hydra.yaml; without that record, refused with a message naming the key."""
    a, b = two_dirs
    overrides = SEARCH + [f"dataset.root={tmp_path / 'a' / 'corpus'}"]
    whole = search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(Interrupted):
            search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    config = tmp_path / "cut" / "config.yaml"
    config.write_text(config.read_text().replace(f"root: {tmp_path / 'a' / 'corpus'}", "root: ../corpus"))
    monkeypatch.chdir(b)
    with pytest.raises(ConfigError, match=r"dataset.root=../corpus.*not recorded.*absolute paths into its config"):
        resume("search", str(tmp_path / "cut"), search)
    os.makedirs(tmp_path / "cut" / ".hydra")
    (tmp_path / "cut" / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {a}\n")
    resumed = resume("search", str(tmp_path / "cut"), search)
    assert untimed(resumed) == untimed(whole)


def test_relative_study_storage_is_saved_absolute(tmp_path, monkeypatch):
    """strategy.storage=sqlite:///<relative file>: the study file is created in the launch dir, and config.yaml
    names it absolutely (a resume from elsewhere opens the same study)."""
    from nas.engine.blackbox import TrialResult, search_black_box

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg("search", ["experiment=smoke", "strategy=random", "strategy.trials=2", "progress=false",
                                 "strategy.storage=sqlite:///studies/s.db", "dataset.root=corpus"])
    os.makedirs(tmp_path / "studies")
    search_black_box(cfg, str(tmp_path / "run"), evaluate=lambda g, d: TrialResult(1.0, 0.1, 10))
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.strategy.storage == f"sqlite:///{tmp_path / 'studies' / 's.db'}"
    assert saved.dataset.root == str(tmp_path / "corpus")
    assert os.path.isfile(tmp_path / "studies" / "s.db")


def cli(script, args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py")] + args, cwd=cwd,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def checkpoint_step(run_dir, kind):
    try:
        return load_resume_checkpoint(run_dir, kind)["state"]["step"]
    except Exception:  # not written yet, or being replaced
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("script,kind", [("train", "train_lm"), ("search", "search_lm")])
def test_r02_cli_resume_from_another_dir(two_dirs, tmp_path, script, kind):
    """The case as reported: launched from a/launch with dataset.root=../corpus and hydra.run.dir=run_r, SIGTERM
    once its checkpoint reports step 3 (of 60: the stop cannot come after the end), resumed from b/launch by the
    run dir's absolute path.  Before the fix the resume read b's corpus (same vocabulary: it would have gone on
    silently)."""
    a, b = two_dirs
    args = ["experiment=smoke", "dataset.root=../corpus", "batch_size=4", "eval_batch_size=4", "bptt=8",
            "limit_train_batches=20", "limit_eval_batches=2", "epochs=3", "progress=false", "num_threads=1",
            "checkpoint_every=3"] + (["arch=darts_v2"] if script == "train" else ["space.steps=3"])
    proc = cli(script, args + ["hydra.run.dir=run_r"], a)
    run_dir = str(a / "run_r")
    deadline = time.time() + 300  # a hang guard, not a timing assumption
    while checkpoint_step(run_dir, kind) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert OmegaConf.load(os.path.join(run_dir, "config.yaml")).dataset.root == str(tmp_path / "a" / "corpus")
    proc = cli(script, [f"resume={run_dir}", "progress=false"], b)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    # the same run, uninterrupted, on a's corpus (named absolutely, from a third directory)
    whole = str(tmp_path / "whole")
    proc = cli(script, [x if x != "dataset.root=../corpus" else f"dataset.root={tmp_path / 'a' / 'corpus'}"
                        for x in args] + [f"hydra.run.dir={whole}"], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert_identical(final_state(run_dir), final_state(whole))
    assert (untimed(json.load(open(os.path.join(run_dir, "metrics.json"))))
            == untimed(json.load(open(os.path.join(whole, "metrics.json")))))


def test_a_relative_nas_data_is_pinned_to_the_folder_the_run_read(two_dirs, tmp_path, monkeypatch):
    """dataset.root null with NAS_DATA=data (relative): the run saves the folder it read ($PWD/data/ptb), so a
    resume from b/launch, where data/ptb is another corpus, reads a's and ends bit-identical."""
    a, b = two_dirs
    for side in (a, b):
        os.makedirs(side / "data")
        os.symlink(side.parent / "corpus", side / "data" / "ptb")
    monkeypatch.setenv("NAS_DATA", "data")
    monkeypatch.chdir(a)
    whole = search(compose_cfg("search", SEARCH), run_dir=str(tmp_path / "whole"))
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(Interrupted):
            search(compose_cfg("search", SEARCH), run_dir=str(tmp_path / "cut"))
    assert OmegaConf.load(tmp_path / "cut" / "config.yaml").dataset.root == str(a / "data" / "ptb")
    monkeypatch.chdir(b)
    resumed = resume("search", str(tmp_path / "cut"), search)
    assert untimed(resumed) == untimed(whole)
    assert_identical(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
