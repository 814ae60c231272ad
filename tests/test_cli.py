"""The command line as a user meets it: one owner per run dir (cases r01), refused runs that leave nothing (u01.2),
messages for typos and presets (u01.3-4), the project's own --help (u01.5).

The two-process tests do not depend on the machine's load: the first process is stopped (SIGSTOP) once it reports,
in its lock file, that it owns the dir, and is let go only after the second one has been answered.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nas.config  # noqa: F401  (stores the config schemas)
from nas.cli import PRESETS, _dotted_keys, _prepare_argv
from nas.config import check_ranges
from nas.engine.rundir import LOCK_FILE, RunDirBusy, holds, own_run_dir, release_run_dir, run_dir_scope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ["experiment=smoke", "batch_size=4", "eval_batch_size=4", "bptt=8", "limit_train_batches=5",
          "limit_eval_batches=3", "progress=false", "space.steps=3", "num_threads=1", "epochs=2"]
TRAIN = ["experiment=smoke", "arch=darts_v2", "batch_size=4", "eval_batch_size=4", "bptt=8", "limit_train_batches=5",
         "limit_eval_batches=3", "progress=false", "num_threads=1", "epochs=2", "space.emsize=16", "space.nhid=16"]
HANG_GUARD = 300  # seconds: only a hung process reaches it


def start(script, args, cwd, **env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(script, args, cwd, **env_extra):
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd,
                          env=dict(os.environ, **env_extra), capture_output=True, text=True, timeout=HANG_GUARD)


def wait_until_owner(proc, run_dir):
    """Block until ``proc`` has written its pid into the run dir's lock file (it owns the dir)."""
    deadline = time.monotonic() + HANG_GUARD
    path = os.path.join(run_dir, LOCK_FILE)
    while time.monotonic() < deadline:
        if os.path.isfile(path) and open(path).read().startswith(f"pid {proc.pid} "):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("the first process never took the run dir")


def tree(d):
    """Every file under ``d`` with its size and modification time (what a refused process must not change)."""
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            st = os.stat(os.path.join(base, f))
            out[os.path.relpath(os.path.join(base, f), d)] = (st.st_size, st.st_mtime_ns)
    return out


def one_line_error(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("script,args", [("search.py", SEARCH), ("train.py", TRAIN)])
def test_a_second_run_in_an_owned_run_dir_is_refused_and_changes_nothing(tmp_path, corpus, script, args):
    """r01: the second process exits 1 with one line naming the dir and the owner, before writing anything; every
    file in the dir then comes from the first run."""
    run_dir = str(tmp_path / "same")
    common = args + [f"dataset.root={corpus}", "hydra.run.dir=same"]
    first = start(script, common + ["seed=1"], tmp_path)
    wait_until_owner(first, run_dir)
    first.send_signal(signal.SIGSTOP)
    try:
        before = tree(run_dir)
        second = cli(script, common + ["seed=2"], tmp_path)
        after = tree(run_dir)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    line = one_line_error(second.stderr)
    assert line.startswith("RunDirBusy: run dir ") and run_dir in line and f"pid {first.pid}" in line
    assert after == before  # not one byte written by the refused process
    _, err = first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 0, err[-3000:]
    assert OmegaConf.load(os.path.join(run_dir, "config.yaml")).seed == 1
    assert OmegaConf.load(os.path.join(run_dir, ".hydra", "config.yaml")).seed == 1
    assert len(os.listdir(os.path.join(run_dir, "tb"))) == 1
    if script == "search.py":
        assert len(open(os.path.join(run_dir, "trials.jsonl")).read().splitlines()) == 2  # one per epoch


def test_two_runs_started_at_once_in_one_dir_have_exactly_one_owner(tmp_path, corpus):
    """r01 as written: both started together; whichever comes second is refused (in use, or already holding the
    first one's run if that one ended first), and the dir holds the winner's run alone."""
    common = SEARCH + [f"dataset.root={corpus}", "hydra.run.dir=same"]
    procs = {seed: start("search.py", common + [f"seed={seed}"], tmp_path) for seed in (1, 2)}
    outs = {seed: p.communicate(timeout=HANG_GUARD) for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values()) == [0, 1], outs
    winner = min(codes, key=codes.get)
    loser = 3 - winner
    assert str(tmp_path / "same") in one_line_error(outs[loser][1])
    assert OmegaConf.load(tmp_path / "same" / "config.yaml").seed == winner
    assert len(open(tmp_path / "same" / "trials.jsonl").read().splitlines()) == 2
    assert len(os.listdir(tmp_path / "same" / "tb")) == 1


def test_two_resumes_of_one_run_have_one_owner(tmp_path, corpus):
    """r01 for resume=: while one resume runs, a second resume and a fresh run in that dir are refused."""
    run_dir = str(tmp_path / "run")
    stopped = start("search.py", SEARCH + [f"dataset.root={corpus}", f"hydra.run.dir={run_dir}", "epochs=3",
                                           "checkpoint_every=1"], tmp_path)
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        assert stopped.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    stopped.send_signal(signal.SIGTERM)
    stopped.communicate(timeout=HANG_GUARD)
    assert stopped.returncode == 143

    first = start("search.py", [f"resume={run_dir}"], tmp_path)
    wait_until_owner(first, run_dir)
    first.send_signal(signal.SIGSTOP)
    try:
        before = tree(run_dir)
        second = cli("search.py", [f"resume={run_dir}"], tmp_path)
        fresh = cli("search.py", SEARCH + [f"dataset.root={corpus}", f"hydra.run.dir={run_dir}"], tmp_path)
        after = tree(run_dir)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and fresh.returncode == 1
    line = one_line_error(second.stderr)
    assert line.startswith(f"RunDirBusy: resume={run_dir}: the run dir") and f"pid {first.pid}" in line
    assert run_dir in one_line_error(fresh.stderr)
    assert after == before
    _, err = first.communicate(timeout=HANG_GUARD)
    assert first.returncode == 0, err[-3000:]
    assert os.path.isfile(os.path.join(run_dir, "metrics.json"))
    assert len(os.listdir(os.path.join(run_dir, "resumes"))) == 1  # the first resume's Hydra files only


def test_run_dir_ownership_is_counted_per_process_and_released_by_scope(tmp_path):
    """own_run_dir is re-entrant in one process; the dir is free for another process only when every use is given
    back (a scope gives back its own uses), and at once when the owner is killed."""
    d = str(tmp_path / "d")
    probe = [sys.executable, "-c", "import sys; from nas.engine.rundir import own_run_dir, RunDirBusy\n"
             "try:\n    own_run_dir(sys.argv[1])\nexcept RunDirBusy:\n    sys.exit(3)", d]

    def other_process_gets_it():
        return subprocess.run(probe, cwd=ROOT, timeout=HANG_GUARD).returncode == 0

    own_run_dir(d)
    with run_dir_scope():
        own_run_dir(d)
        assert holds(d)
    assert holds(d) and not other_process_gets_it()
    release_run_dir(d)
    assert not holds(d) and other_process_gets_it()

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nas.engine.rundir import own_run_dir\n"
                               "own_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", d],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid} "):
        own_run_dir(d)
    holder.kill()
    holder.wait()
    own_run_dir(d)  # the kernel released the killed owner's lock: no stale lock to clear by hand
    release_run_dir(d)


def test_a_comparison_refuses_an_output_folder_in_use(tmp_path):
    """compare_strategies (and the DARTS protocol, same code) own their --out folder for their whole run."""
    sys.path.insert(0, os.path.join(ROOT, "experiments", "compare_strategies"))
    try:
        import run as compare
    finally:
        sys.path.pop(0)
    out = str(tmp_path / "cmp")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nas.engine.rundir import own_run_dir\n"
                               "own_run_dir(sys.argv[1]); print('held', flush=True); time.sleep(600)", out],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_:
            compare.main(["--preset", "smoke", "--out", out])
        assert exit_.value.code == 1
        assert os.listdir(out) == [LOCK_FILE]  # nothing started
    finally:
        holder.kill()
        holder.wait()


# --- refused runs leave nothing (u01.2) ---------------------------------------------------------------------


REFUSED_BEFORE_HYDRA = [  # refused by prepare_argv: Hydra never starts, so a given run dir cannot be touched
    ("search.py", ["+foo=1"], "UsageError"),
    ("search.py", ["strategy.unroled=true"], "UsageError"),
    ("search.py", ["experiment=darts_ptb_retrain"], "UsageError"),
    ("train.py", ["experiment=darts_ptb", "arch=darts_v2"], "UsageError"),
    ("search.py", ["resume=MISSING"], "ConfigError"),
]
REFUSED_IN_THE_RUN = [  # refused inside the run, after Hydra wrote .hydra/ and the log: taken away again
    ("train.py", ["experiment=smoke", "arch=CORRUPT"], "GenotypeError"),
    ("search.py", ["experiment=smoke", "dataset.root=MISSING"], "DataError"),
    ("search.py", ["experiment=smoke", "device=cuda:7"], "ConfigError"),
    ("search.py", ["experiment=smoke", "clip=-1"], "ConfigError"),
    ("train.py", ["experiment=smoke", "arch=darts_v2", "lr=-1"], "ConfigError"),
]


@pytest.mark.parametrize("script,args,error,run_dir", [c + ("default",) for c in REFUSED_BEFORE_HYDRA] +
                         [c + (where,) for c in REFUSED_IN_THE_RUN for where in ("default", "given")])
def test_a_refused_run_leaves_nothing_behind(tmp_path, script, args, error, run_dir):
    """u01.2: no outputs/ dir, no .hydra/, no log, no lock file; a hydra.run.dir that existed stays as it was."""
    import torch

    if "device=cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    cwd, given = tmp_path / "cwd", tmp_path / "given"
    cwd.mkdir(), given.mkdir()
    (given / "notes.txt").write_text("mine\n")
    (tmp_path / "corrupt.json").write_text("{not json")
    args = [a.replace("CORRUPT", str(tmp_path / "corrupt.json")).replace("MISSING", str(tmp_path / "nothing"))
            for a in args] + (["hydra.run.dir=" + str(given)] if run_dir == "given" else [])
    r = cli(script, args, cwd, NAS_DATA=str(tmp_path / "nothing"))
    assert r.returncode == 1 and f"{error}: " in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert os.listdir(cwd) == []
    assert sorted(os.listdir(given)) == ["notes.txt"]
    assert not os.path.exists(tmp_path / "nothing")


# --- messages (u01.3-5) --------------------------------------------------------------------------------------


def test_a_misspelt_published_arch_is_named_as_typed_with_the_close_name(tmp_path):
    """train.py arch=darts_v3: the launch-relative path resolution must not turn the bare name into a path that
    hides the suggestion (a fresh user's trial saw "arch='/cwd/darts_v3' is neither ..." and no hint)."""
    r = cli("train.py", ["experiment=smoke", "arch=darts_v3"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "arch='darts_v3' is neither a published genotype nor an existing file" in r.stderr
    assert "did you mean arch=darts_v2? Use arch=<name>" in r.stderr


def refusal(script, args, tmp_path, monkeypatch, capsys):
    """The one line ``_prepare_argv`` prints for a refused command line (in this process: nothing is run)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        _prepare_argv([os.path.join(ROOT, script)] + args, script)
    assert exit_.value.code == 1
    assert os.listdir(tmp_path) == []
    return one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("script,override,suggestion", [
    ("search.py", "strategy.unroled=true", "did you mean strategy.unrolled?"),
    ("search.py", "stratgy=darts", "did you mean strategy?"),
    ("search.py", "strategy=dart", "did you mean strategy=darts?"),
    ("search.py", "space.emsze=32", "did you mean space.emsize?"),
    ("search.py", "hydra.run.dri=x", "did you mean hydra.run.dir?"),
    ("train.py", "optimzer=sgd", "did you mean optimizer?"),
    ("train.py", "dataset.rot=x", "did you mean dataset.root?"),
    ("search.py", "experiment=smok", "did you mean experiment=smoke?"),
])
def test_a_typo_gets_the_closest_valid_key_never_a_plus_hint(tmp_path, monkeypatch, capsys, script, override,
                                                              suggestion):
    line = refusal(script, [override], tmp_path, monkeypatch, capsys)
    assert suggestion in line and "+" not in line


@pytest.mark.parametrize("args,says", [
    (["strategy.objectives=[metric,params]"], "strategy.objectives: strategy=darts has no such key; it belongs to "
                                              "strategy=bayesian, evolution, random"),
    (["strategy=random", "strategy.param_penalty=1"], "it belongs to strategy=darts, gdas"),
    (["strategy=bayesian", "strategy.population=4"], "it belongs to strategy=evolution"),
    (["space=hybrid", "space.steps=3"], "space=hybrid has no such key; it belongs to space=darts_rnn"),
])
def test_a_key_of_another_strategy_or_space_names_its_owners(tmp_path, monkeypatch, capsys, args, says):
    """Not the nearest spelling of an unrelated key (``strategy.objectives`` under darts got "did you mean
    strategy.arch_betas?"; a fresh-user trial of issue 19)."""
    assert says in refusal("search.py", args, tmp_path, monkeypatch, capsys)


def test_a_bad_value_and_bad_syntax_are_one_line(tmp_path, monkeypatch, capsys):
    assert "could not be converted to Float" in refusal("search.py", ["lr=abc"], tmp_path, monkeypatch, capsys)
    assert "cannot parse the override 'space.ops=[tanh'" in refusal("search.py", ["space.ops=[tanh"], tmp_path,
                                                                      monkeypatch, capsys)


def test_every_preset_belongs_to_the_scripts_it_names(tmp_path, monkeypatch, capsys):
    """u01.4: PRESETS lists every file of conf/experiment; each composes with its scripts; given to the other
    script it is refused with the script it is for and this script's presets."""
    files = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "conf", "experiment"))}
    assert set(PRESETS) == files
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        for name, scripts in PRESETS.items():
            for script in scripts:
                check_ranges(compose(os.path.splitext(script)[0], [f"experiment={name}"]))  # and in range
    for name, scripts in PRESETS.items():
        for script in {"search.py", "train.py"} - set(scripts):
            line = refusal(script, [f"experiment={name}"], tmp_path, monkeypatch, capsys)
            mine = sorted(n for n, s in PRESETS.items() if script in s)
            assert line == (f"UsageError: experiment={name} is a {scripts[0]} preset: run `python {scripts[0]} "
                            f"experiment={name} ...`; {script} presets are: {', '.join(mine)}")


@pytest.mark.parametrize("script", ["search.py", "train.py"])
def test_help_is_the_projects_own_and_names_only_what_exists(tmp_path, script):
    """u01.5: --help explains the script, lists the groups a user chooses with every option (and no internal
    group), the main keys (each one a real key), and examples."""
    r = cli(script, ["--help"], tmp_path)
    assert r.returncode == 0 and os.listdir(tmp_path) == []
    text = r.stdout
    assert text.startswith(f"{script}: ") and f"Usage: python {script}" in text and "Examples:" in text
    assert "schema" not in text and "tuning" not in text and "Powered by Hydra" not in text
    groups = text.split("Groups (group=option):")[1].split("\n\n")[0]
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^  (\w+) +(.*(?:\n {14}.*)*)", groups, re.M)}
    expected = {"dataset", "space", "experiment"} | ({"strategy"} if script == "search.py" else set())
    assert set(listed) == expected
    for group in expected - {"experiment"}:
        for option in os.listdir(os.path.join(ROOT, "conf", group)):
            assert re.search(rf"\b{os.path.splitext(option)[0]}\b", listed[group]), (group, option)
    for name, scripts in PRESETS.items():
        assert (re.search(rf"\b{name}\b", listed["experiment"]) is not None) == (script in scripts), name
    if script == "search.py":  # the launchers a sweep of workers needs: Hydra's basic one and conf/hydra/launcher/
        launchers = re.search(r"^  hydra/launcher +(.*(?:\n {14}.*)*)", groups, re.M).group(1)
        for option in ["basic"] + [os.path.splitext(f)[0] for f in os.listdir(os.path.join(ROOT, "conf", "hydra",
                                                                                             "launcher"))]:
            assert re.search(rf"\b{option}\b", launchers), option

    section = text.split("Main keys")[1].split("Examples:")[0].split("\n", 1)[1]
    keys = set()
    for token in re.split(r"[\s,]+", re.sub(r"\([^)]*\)", "", section)):
        key = token.split("=")[0]
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key):
            keys.add(key)
    assert len(keys) >= 15
    name = os.path.splitext(script)[0]
    variants = [["space=darts_rnn"], ["space=hybrid"], ["space=stacked_rnn"]]
    if script == "search.py":
        variants = [v + [f"strategy={s}"] for v in variants for s in ("darts", "bayesian", "random", "gdas", "evolution")]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfgs = [compose(name, v, return_hydra_config=True) for v in variants]
    existing = set().union(*(_dotted_keys(OmegaConf.to_container(c, resolve=False)) for c in cfgs))
    assert keys <= existing, keys - existing


def test_a_resume_of_the_other_scripts_run_names_the_script_and_leaves_that_run_alone(tmp_path, monkeypatch, capsys):
    """train.py resume=<a search run>: one line naming search.py, refused before taking the dir (its lock note and
    files unchanged, no resumes/ dir)."""
    run = tmp_path / "search_run"
    run.mkdir()
    (run / "config.yaml").write_text("strategy:\n  name: darts\nseed: 0\n")
    (run / "checkpoint.pt").write_bytes(b"unfinished")
    (run / LOCK_FILE).write_text("pid 1 on host: search.py (since then)\n")
    before = tree(run)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    line = refusal("train.py", [f"resume={run}"], cwd, monkeypatch, capsys)
    assert line == f"ConfigError: resume={run} is a run of search.py: resume it with `python search.py resume={run}`"
    assert tree(run) == before


@pytest.mark.parametrize("override,named", [
    ("clip=-1", "clip=-1.0 (must be > 0)"), ("lr=0", "lr=0.0 (must be > 0)"), ("epochs=0", "epochs=0 (must be >= 1)"),
    ("space.dropout=1.5", "space.dropout=1.5 (must be >= 0 and < 1)"), ("space.dropoute=1", "space.dropoute=1.0"),
    ("strategy.arch_lr=-1", "strategy.arch_lr=-1.0 (must be > 0)"), ("batch_size=0", "batch_size=0 (must be >= 1)"),
    ("strategy.arch_betas=[0.9,1.0]", "strategy.arch_betas=[0.9, 1.0]"), ("limit_train_batches=0", "limit_train_batches=0"),
    # not finite: passed every lower bound before (a fresh-user trial of issue 19's options)
    ("lr=inf", "lr=inf (must be finite and > 0)"), ("strategy.param_penalty=nan", "strategy.param_penalty=nan"),
    ("strategy=gdas strategy.tau_max=inf", "strategy.tau_max=inf (must be finite and > 0)"),
    ("strategy=evolution strategy.population=0", "strategy.population=0 (must be >= 1)"),
    ("strategy=random strategy.reduction_factor=1", "strategy.reduction_factor=1 (must be >= 2)"),
])
def test_out_of_range_settings_are_refused_naming_the_key_and_range(override, named):
    from nas.config import check_ranges
    from nas.errors import ConfigError

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        ok = compose("search", ["experiment=smoke"])
        bad = compose("search", ["experiment=smoke", *override.split()])
    check_ranges(ok)  # the presets' values are in range
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_ranges(bad)


def _genotype_file(tmp_path, space, task, dataset, name="g.json"):
    """A genotype of ``space`` (its config's ops, one edge per node) recording ``task`` / ``dataset`` (None: an old
    file without them)."""
    from nas.genotype import Edge, Genotype

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        ops = list(compose("train", ["arch=darts_v2", f"space={space}"]).space.ops)
    real = [o for o in ops if o not in ("none", "zero")]
    genotype = Genotype(space=space, ops=tuple(ops), nodes=((Edge(real[0], 0),), (Edge(real[-1], 1),)), concat=(2,),
                        task=task, dataset=dataset)
    path = tmp_path / name
    genotype.save(str(path))
    return str(path)


def test_train_takes_space_and_dataset_from_the_genotype_unless_given(tmp_path, monkeypatch, capsys):
    """u01.1: a hybrid SST-2 genotype retrains as an SST-2 classifier without space= / dataset=; a PTB genotype keeps
    a given dataset of its task (WikiText-2); an old genotype file (no task, no dataset) gives only its space."""
    from nas.engine.rundir import release_run_dir

    sst = _genotype_file(tmp_path, "hybrid", "classification", "sst2", "sst.json")
    ptb = _genotype_file(tmp_path, "darts_rnn", "language_modeling", "ptb", "ptb.json")
    old = _genotype_file(tmp_path, "hybrid", None, None, "old.json")
    monkeypatch.chdir(tmp_path)
    for arch, given, taken in ((sst, [], ["space=hybrid", "dataset=sst2"]),
                               (ptb, ["dataset=wikitext2"], []),
                               (ptb, [], []),
                               (sst, ["experiment=smoke", "space=hybrid", "dataset=sst2"], []),
                               (old, [], ["space=hybrid"])):
        run_dir = str(tmp_path / f"run{len(os.listdir(tmp_path))}")
        argv = _prepare_argv([os.path.join(ROOT, "train.py"), f"arch={arch}", *given, f"hydra.run.dir={run_dir}"],
                             "train.py")
        release_run_dir(run_dir)
        chosen = [a for a in argv[1:] if a.startswith(("space=", "dataset="))]
        assert chosen == [g for g in given if g.startswith(("space=", "dataset="))] + taken, (arch, given, argv)
        err = capsys.readouterr().err
        assert (f"train.py: {' '.join(taken)} taken from the genotype" in err) == bool(taken), err


def test_an_explicit_space_or_dataset_of_another_task_than_the_genotypes_is_one_line(tmp_path, monkeypatch, capsys):
    sst = _genotype_file(tmp_path / "..", "hybrid", "classification", "sst2", "sst_cli.json")
    line = refusal("train.py", [f"arch={sst}", "dataset=ptb"], tmp_path, monkeypatch, capsys)
    assert line == (f"UsageError: arch={sst} is a genotype of space hybrid, searched for classification on sst2; "
                    "dataset=ptb is for task language_modeling: drop dataset= (train.py takes dataset=sst2 from the "
                    "genotype) or give a dataset of task classification")
    imdb = _genotype_file(tmp_path / "..", "hybrid", "classification", "imdb", "imdb_cli.json")  # no conf/dataset yaml
    line = refusal("train.py", [f"arch={imdb}"], tmp_path, monkeypatch, capsys)
    assert line == (f"UsageError: arch={imdb} is a genotype of space hybrid, searched for classification on imdb; "
                    "there is no conf/dataset/imdb.yaml to take it from: give a dataset of task classification "
                    "(dataset options: ptb, sst2, wikitext2)")
    line = refusal("train.py", [f"arch={sst}", "space=darts_rnn"], tmp_path, monkeypatch, capsys)
    assert line == (f"UsageError: arch={sst} is a genotype of space hybrid, searched for classification on sst2; "
                    "space=darts_rnn contradicts it: drop space= (train.py takes the space from the genotype)")
