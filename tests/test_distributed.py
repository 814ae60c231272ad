"""Data-parallel search and retraining under torchrun (nas.distributed), on CPU with the gloo backend.

The claim: ``torchrun --nproc_per_node=2`` computes what one process computes on the same global batch -- weights,
α, optimizer states and genotype -- and writes one set of output files.  The runs are in float64 (``dtype``): in
float32 training amplifies rounding differences (at the smoke settings one process on 1 and on 2 threads differs
by 1e-4 in the weights after 8 steps and by up to 0.9 after 16), which would hide a real mismatch.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEARCH = ["experiment=smoke", "limit_train_batches=4", "progress=false", "num_threads=1", "dtype=float64"]
TRAIN = ["arch=darts_v2", "experiment=smoke", "limit_train_batches=4", "limit_eval_batches=4", "epochs=2",
         "progress=false", "num_threads=1", "dtype=float64", "space.emsize=16", "space.nhid=16",
         "batch_size=16", "eval_batch_size=16", "test_batch_size=1", "bptt=20"]
pytestmark = pytest.mark.slow


def torchrun(script, args, cwd, nproc=2, timeout=600, wait=True):
    """``torchrun --standalone --nproc_per_node=nproc <script> args`` in ``cwd``; a CompletedProcess (or the Popen
    when ``wait`` is False)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def one_process(script, args, cwd, timeout=600):
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_close(a, b, path="checkpoint", atol=1e-6):
    """Nested checkpoint contents equal: float tensors to ``atol``, everything else exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        if a.is_floating_point():
            assert (a - b).abs().max().item() <= atol if a.numel() else True, (path, (a - b).abs().max().item())
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close(a[k], b[k], f"{path}/{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]", atol)
    elif isinstance(a, float):
        assert abs(a - b) <= atol * max(1.0, abs(a)), (path, a, b)
    else:
        assert a == b, path


def run_files(run_dir):
    """The run's files, relative; TensorBoard event files by count (their names hold a time and host)."""
    files = set()
    for path in glob.glob(os.path.join(run_dir, "**", "*"), recursive=True):
        rel = os.path.relpath(path, run_dir)
        if os.path.isfile(path) and not rel.startswith((".hydra", "resumes")):
            files.add("tb/<events>" if rel.startswith("tb" + os.sep) else rel)
    return files


def final_state(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    return {k: ckpt[k] for k in ("model", "strategy", "w_optimizer", "hidden", "hidden_valid", "position")}


@pytest.mark.parametrize("space, unrolled", [("darts_rnn", False), ("darts_rnn", True), ("hybrid", False)],
                         ids=["first_order", "second_order", "hybrid"])
def test_torchrun_search_equals_one_process(tmp_path, space, unrolled, corpus):
    """With dropout on (every mask of the global batch) and the search cell's BatchNorm (global statistics)."""
    args = SEARCH + [f"dataset.root={corpus}", f"space={space}", f"strategy.unrolled={str(unrolled).lower()}"]
    if unrolled:
        args += ["epochs=1"]
    ddp = torchrun("search.py", args, cwd=tmp_path)  # default run dir: rank 0's time stamp, shared
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    made = glob.glob(str(tmp_path / "outputs" / "search" / "*" / "*"))
    assert len(made) == 1, made  # both ranks used rank 0's run dir
    run_dir = made[0]
    single = one_process("search.py", args + [f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    assert_close(final_state(run_dir), final_state(tmp_path / "single"))
    genotype = json.load(open(os.path.join(run_dir, "genotype.json")))
    assert genotype == json.load(open(tmp_path / "single" / "genotype.json"))
    ddp_metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    one_metrics = json.load(open(tmp_path / "single" / "metrics.json"))
    assert ddp_metrics["train_tokens"] == one_metrics["train_tokens"]  # global tokens, not rank 0's shard
    assert (ddp_metrics["processes"], one_metrics["processes"]) == (2, 1)
    for a, b in zip(ddp_metrics["history"], one_metrics["history"]):
        assert a["genotype"] == b["genotype"]
        assert a["valid_ppl"] == pytest.approx(b["valid_ppl"], rel=1e-9)  # summed over both ranks' columns
        assert a["train_ppl"] == pytest.approx(b["train_ppl"], rel=1e-9)
        # the collapse diagnostics' eigenvalue: the global batch's (products averaged over the ranks), as one process's
        assert a["diagnostics"]["hessian_eigenvalue"] == pytest.approx(b["diagnostics"]["hessian_eigenvalue"], rel=1e-6)
    # both ranks derived the genotype rank 0 wrote (the engine also compares them at every epoch)
    log = ddp.stdout + ddp.stderr
    from nas.genotype import Genotype

    text = str(Genotype.from_dict(genotype))
    assert f"[rank 1] final genotype {text} (the same as rank 0's)" in log  # rank 1's console line, tagged
    assert "done in" in log and text in log
    # one set of output files, written by rank 0: what one process writes, and one Hydra record
    assert run_files(run_dir) == run_files(tmp_path / "single") | {"search.log"}
    assert len(glob.glob(os.path.join(run_dir, "tb", "events*"))) == 1
    assert sorted(os.listdir(os.path.join(run_dir, ".hydra"))) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


def test_torchrun_search_resumes(tmp_path, corpus):
    """SIGTERM to torchrun stops both ranks at the same step with a checkpoint; ``torchrun ... resume=`` finishes
    the run, equal to one uninterrupted process; the 2-rank checkpoint also resumes in one process."""
    args = SEARCH + [f"dataset.root={corpus}", "checkpoint_every=2", "limit_train_batches=6"]
    run_dir = tmp_path / "ddp"
    proc = torchrun("search.py", args + [f"hydra.run.dir={run_dir}"], cwd=tmp_path, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = run_dir / "checkpoint.pt"
        if ck.exists():
            try:
                if torch.load(ck, weights_only=False)["state"]["step"] >= 2:
                    break
            except Exception:  # being replaced right now
                pass
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "Resume with: python search.py resume=" in out, out[-3000:]
    step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert 2 <= step < 12
    assert not (run_dir / "metrics.json").exists()
    import shutil

    shutil.copytree(run_dir, tmp_path / "ddp_copy")

    resumed = torchrun("search.py", [f"resume={run_dir}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed {run_dir} at step {step}" in resumed.stdout + resumed.stderr
    log = open(run_dir / "search.log").read()  # rank 0's lines only, the resumed session's appended once
    assert log.count(f"resumed {run_dir} at step {step}") == 1 and "[rank 1]" not in log
    single = one_process("search.py", args + [f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert_close(final_state(run_dir), final_state(tmp_path / "single"))
    assert json.load(open(run_dir / "genotype.json")) == json.load(open(tmp_path / "single" / "genotype.json"))
    # the trials of the interrupted epoch are not doubled by the resume
    assert [json.loads(line)["epoch"] for line in open(run_dir / "trials.jsonl")] == [1, 2]

    # a 2-rank checkpoint holds the global batch's hidden states: one process can take over
    alone = one_process("search.py", [f"resume={tmp_path / 'ddp_copy'}"], cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert_close(final_state(tmp_path / "ddp_copy"), final_state(tmp_path / "single"))


def test_torchrun_train_equals_one_process(tmp_path, corpus):
    """Retraining under torchrun: NT-ASGD, best.pt and the test perplexity (test_batch_size 1 does not split over
    2 ranks: the test split is scored whole on each) equal one process."""
    args = TRAIN + [f"dataset.root={corpus}"]
    ddp = torchrun("train.py", args + [f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = one_process("train.py", args + [f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "best.pt", weights_only=False)
    b = torch.load(tmp_path / "single" / "best.pt", weights_only=False)
    assert_close(a["model"], b["model"])
    ma, mb = (json.load(open(tmp_path / d / "metrics.json")) for d in ("ddp", "single"))
    for key in ("best_valid_ppl", "test_ppl"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-9)
    for key in ("test_tokens", "valid_tokens", "train_tokens", "best_epoch", "exact_eval"):
        assert ma[key] == mb[key], key
    assert run_files(tmp_path / "ddp") == run_files(tmp_path / "single") | {"train.log"}


@pytest.mark.parametrize("script, args, message", [
    ("search.py", ["batch_size=15"], "batch_size=15 does not split over 2 torchrun processes"),
    ("search.py", ["strategy=random"], "run several plain `python search.py` workers on one strategy.storage"),
    ("train.py", ["batch_size=15"], "batch_size=15 does not split over 2 torchrun processes"),
    ("train.py", ["space=hybrid", "space.dropouta=0.1"], "space.dropouta > 0 under torchrun"),
], ids=["indivisible_batch", "black_box", "train_indivisible_batch", "train_attention_dropout"])
def test_torchrun_refuses(tmp_path, script, args, message, corpus):
    base = SEARCH if script == "search.py" else TRAIN
    if "space=hybrid" in args:  # a genotype of the hybrid space (darts_v2 with space=hybrid is refused before torchrun's
        # own checks: train.py takes the space from the genotype and refuses one that contradicts it)
        from nas.genotype import Edge, Genotype
        from nas.spaces.hybrid import HYBRID_OPS

        ops = tuple(HYBRID_OPS)  # the space's default op list
        Genotype(space="hybrid", ops=ops, nodes=((Edge(ops[1], 0),),), concat=(1,)).save(str(tmp_path / "hybrid.json"))
        base = [a if not a.startswith("arch=") else f"arch={tmp_path / 'hybrid.json'}" for a in base]
    out = torchrun(script, base + [f"dataset.root={corpus}"] + args + [f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    assert "[rank0]: Traceback" not in out.stdout + out.stderr  # a one-line error from each worker
    assert "[rank1]: Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run dir is used


def test_slurm_example_runs_requeues_and_resumes_under_stub_srun(tmp_path, corpus):
    """experiments/slurm/search_ddp.sbatch with ``srun`` and ``scontrol`` stubbed (no cluster here): the torchrun
    line (c10d rendezvous, 1 node x 2 processes) starts a search in RUN_DIR; SIGTERM to torchrun (what
    ``--signal=TERM@180`` sends before the time limit) stops it with a checkpoint and the script requeues its job;
    the requeued job resumes and finishes; a third start leaves the finished run alone."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/bin/bash\nwhile [ $# -gt 0 ] && [ "$1" != torchrun ]; do shift; done\n'
                               'exec "$@"\n')
    (stub / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = show ]; then echo localhost; '
                                   f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    for f in stub.iterdir():
        f.chmod(0o755)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{stub}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2", RUN_DIR=str(run_dir),
               EXPERIMENT="smoke", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "experiments", "slurm", "search_ddp.sbatch")
    args = [f"dataset.root={corpus}", "num_threads=1", "epochs=4", "limit_train_batches=3", "checkpoint_every=1",
            "limit_eval_batches=1"]
    job = subprocess.Popen(["bash", script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not _checkpoint_step(run_dir / "checkpoint.pt") >= 3:
        time.sleep(0.1)
    assert job.poll() is None, job.communicate()[0][-3000:]
    launcher = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(launcher) == 1  # torchrun (the srun stub execs it)
    os.kill(int(launcher[0]), signal.SIGTERM)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert "requeueing job 7" in out and open(tmp_path / "scontrol.log").read().split() == ["requeue", "7"]
    assert not (run_dir / "metrics.json").exists()
    step = _checkpoint_step(run_dir / "checkpoint.pt")

    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed {run_dir} at step {step}" in again.stdout + again.stderr
    assert json.load(open(run_dir / "metrics.json"))["steps"] == 12
    third = subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "holds a finished search" in third.stdout


def _checkpoint_step(path) -> int:
    try:
        return torch.load(path, weights_only=False)["state"]["step"]
    except Exception:  # not there yet, or being replaced right now
        return -1
