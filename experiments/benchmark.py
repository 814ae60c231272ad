"""Search and retrain throughput benchmark: seconds per step, training tokens/s, peak memory, FLOPs, MFU.

    python experiments/benchmark.py                      # every case + the scaling sweep, JSON on stdout
    python experiments/benchmark.py --cases search_small_first search_small_second --no-sweep
    python experiments/benchmark.py --device cuda        # the same figures on a GPU
    python experiments/benchmark.py --shared 3 --cases search_small_first   # alone vs beside one busy process

One search step = one α update on a validation segment + one weight update on a training segment
(DARTS, Algorithm 1), both of batch B and length bptt = 35, on real PTB ($NAS_DATA).  A retrain step = one
weight update of the frozen genotype.  Timing: ``--warmup`` steps, then ``--steps`` timed steps.  Each case
runs in a fresh subprocess so that its peak memory (CPU: peak RSS; CUDA: max allocated) is its own.
FLOPs are counted analytically (matrix products of cell and decoder, forward + 2x backward, every pass of a
step); the matrix-multiply peak is measured in the same process (2048x2048 products, fp32, or bf16 with
``--matmul-dtype bfloat16``), and model FLOP utilization (MFU) = achieved FLOP/s / that peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BPTT = 35
# name -> (kind, hidden, batch, steps(nodes), unrolled)
CASES = {
    "search_small_first": ("search", 64, 64, 8, False),
    "search_small_second": ("search", 64, 64, 8, True),
    "search_paper_first": ("search", 300, 256, 8, False),
    "search_paper_second": ("search", 300, 256, 8, True),
    "retrain_darts_v2_128": ("retrain", 128, 64, 8, False),  # train.py's CPU default size
    "retrain_darts_v2_850": ("retrain", 850, 64, 8, False),  # the paper's retraining size
}
# one axis at a time around the small config (hidden 64, batch 64, 8 nodes), which appears once
SWEEP = ([("search", h, 64, 8, False) for h in (64, 128, 300)]
         + [("search", 64, 64, 4, False)]
         + [("search", 64, b, 8, False) for b in (32, 256)])


def analytic_flops(kind: str, hidden: int, batch: int, nodes: int, unrolled: bool, vocab: int) -> float:
    """Matrix-product FLOPs of one step: 2·m·n·k per product.

    Per token and forward pass: input and hidden projections of the initial state 2·(E+H)·2H, the node
    projections 2·H·2H per edge (supernet: N(N+1)/2 edges, each predecessor projected by each later node;
    frozen: N), and the tied decoder 2·H·V.  Backward costs 2x forward when it needs the weight gradients
    and 1x when it needs only the α gradient (input gradients only).  A first-order search step has a
    weight pass (3F) and an α pass (2F); a second-order one has the virtual step (3F), the validation pass
    at w' (3F: α and w' gradients), two finite-difference α passes (2 x 2F) and the weight pass (3F).
    """
    edges = nodes * (nodes + 1) // 2 if kind == "search" else nodes
    per_token = 2 * (2 * hidden) * (2 * hidden) + edges * 2 * hidden * 2 * hidden + 2 * hidden * vocab
    forwards = (13 if unrolled else 5) if kind == "search" else 3
    return float(per_token * batch * BPTT * forwards)


def pass_seconds(setup, batch, reps: int = 3) -> dict:
    """Seconds of the three kinds of forward + backward pass a search step is made of (best of ``reps``).

    ``weight``: gradients of w (the weight step, the virtual step); ``alpha``: gradient of α only (the
    first-order α step, the finite-difference passes); ``full``: gradients of α and w (validation at w').
    A first-order step is weight + alpha; an exact second-order step is 2 weight + full + 2 alpha, so
    second / first >= 2 + full / (weight + alpha): the unrolled step cannot cost less than twice the
    first-order one without changing what it computes.
    """
    import torch
    from torch.func import functional_call

    from nas.mixed import edge_weights

    model, strategy = setup.model, setup.strategy
    params = dict(model.named_parameters())
    detached = {n: p.detach() for n, p in params.items()}
    weights = list(params.values())

    def run(p, alphas, inputs):
        out = functional_call(model, p, (batch.data, batch.hidden), {"weights": alphas, "targets": batch.targets})
        torch.autograd.grad(out.loss, inputs)

    kinds = {
        "weight": lambda: run(params, strategy.edge_weights(), weights),
        "alpha": lambda: run(detached, edge_weights(strategy.alphas), [strategy.alphas]),
        "full": lambda: run(params, edge_weights(strategy.alphas), [strategy.alphas] + weights),
    }
    result = {}
    for name, fn in kinds.items():
        fn()  # warm-up (and compile, if enabled)
        best = float("inf")
        for _ in range(reps):
            _sync(setup.device)
            t = time.perf_counter()
            fn()
            _sync(setup.device)
            best = min(best, time.perf_counter() - t)
        result[name] = round(best, 4)
    return result


def matmul_peak(device, n: int = 2048, reps: int = 10, dtype=None) -> float:
    """Measured FLOP/s of an n x n matrix product on ``device`` in ``dtype`` (None: fp32), best of ``reps``."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(kind, hidden, batch, nodes, unrolled, device_name, steps, warmup, compile_=False,
             matmul_dtype=None) -> dict:
    """Time one configuration in this process; returns its figures as a dict."""
    import nas.config  # noqa: F401  (stores the config schemas)
    import torch
    from hydra import compose, initialize_config_dir

    from nas.data import get_batch
    from nas.engine.common import compile_model, seed_everything
    from nas.tasks.language_modeling import weight_step
    from nas.engine.search import build_search, search_step
    from nas.precision import parse_matmul_dtype, set_matmul_dtype
    from nas.published import load_published
    from nas.strategies.darts import Batch

    overrides = [f"device={device_name}", f"batch_size={batch}", f"bptt={BPTT}", f"space.emsize={hidden}",
                 f"space.nhid={hidden}", f"space.steps={nodes}", f"strategy.unrolled={str(unrolled).lower()}",
                 f"compile={str(compile_).lower()}", "progress=false", f"matmul_dtype={matmul_dtype or 'null'}"]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("search", overrides=overrides)
    seed_everything(0)
    setup = build_search(cfg)
    device, data = setup.device, setup.data
    if kind == "retrain":
        model = setup.space.freeze(load_published("darts_v2"), data.ntoken).to(device)
        set_matmul_dtype(model, matmul_dtype)
        compile_model(model, compile_)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=8e-7)
    model = setup.model if kind == "search" else model
    model.train()
    hidden_t = model.init_hidden(batch)
    hidden_v = model.init_hidden(batch)
    rows = data.train.size(0) - 1

    x, y = get_batch(data.train, 0, BPTT)

    def step(k):
        nonlocal hidden_t, hidden_v
        i = (k * BPTT) % (rows - BPTT)
        x, y = get_batch(data.train, i, BPTT)
        if kind == "retrain":
            _, hidden_t = weight_step(model, optimizer, x, y, hidden_t, cfg.clip, 0.0, 1e-3)
            return
        xv, yv = get_batch(data.search, i % (data.search.size(0) - 1 - BPTT), BPTT)
        _, hidden_t, hidden_v = search_step(setup, cfg, Batch(x, y, hidden_t), Batch(xv, yv, hidden_v))

    start = time.perf_counter()
    for k in range(warmup):
        step(k)
    _sync(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak_memory = _peak_memory_bytes(device)  # before the per-pass timings, whose full pass a step may not have
    flops = analytic_flops(kind, hidden, batch, nodes, unrolled, data.ntoken)
    peak = matmul_peak(device, dtype=parse_matmul_dtype(matmul_dtype))  # the products' own dtype
    extra = {}
    if kind == "search":
        passes = pass_seconds(setup, Batch(x, y, model.init_hidden(batch)))
        extra = {"pass_seconds": passes,
                 "second_over_first_floor": round(2 + passes["full"] / (passes["weight"] + passes["alpha"]), 3)}
    return {
        "kind": kind, "order": ("second" if unrolled else "first") if kind == "search" else None,
        "emsize": hidden, "nhid": hidden, "batch": batch, "bptt": BPTT, "nodes": nodes,
        "device": str(device), "threads": torch.get_num_threads(), "compile": compile_, "matmul_dtype": matmul_dtype,
        "warmup_seconds": round(warmup_seconds, 2), "timed_steps": steps,
        "seconds_per_step": round(seconds, 4),
        "train_tokens_per_second": round(batch * BPTT / seconds, 1),
        "peak_memory_gb": round(peak_memory / 1e9, 3),
        "flops_per_step": flops,
        "achieved_gflops": round(flops / seconds / 1e9, 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "mfu": round(flops / seconds / peak, 4),
        **extra,
    }


#: the other process of the shared-cores measurement (--busy-kind): ``loop``, one core kept busy by a Python loop;
#: ``torch``, another torch job with torch's default threads (small products and elementwise ops, as a search runs)
BUSY = {"loop": "while True: pass",
        "torch": "import torch\na, w = torch.randn(64, 128), torch.randn(128, 256)\nwhile True: (a @ w).tanh_().sum()"}


def _in_subprocess(spec, args, busy: int = 0) -> dict:
    """One case in a fresh process; ``busy``: that many busy-looping processes run beside it, started before it and
    killed after it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec), "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--compile"] if args.compile else [])
    if args.matmul_dtype:
        cmd += ["--matmul-dtype", args.matmul_dtype]
    others = [subprocess.Popen([sys.executable, "-c", BUSY[args.busy_kind]]) for _ in range(busy)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        for o in others:
            o.kill()
            o.wait()
    if r.returncode != 0:
        return {"spec": spec, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the cell time step (config compile=true)")
    p.add_argument("--matmul-dtype", choices=["bfloat16"],
                   help="the training passes' matrix products in this dtype (config matmul_dtype; nas.precision)")
    p.add_argument("--sweep-steps", type=int, default=5)
    p.add_argument("--out", help="also write the JSON to this file")
    p.add_argument("--shared", type=int, default=0, metavar="R",
                   help="instead: time each case alone and beside one busy process, alternating, R times each; "
                        "report the medians and their ratio (shared cores: issue 21, item 4)")
    p.add_argument("--busy-kind", choices=list(BUSY), default="loop",
                   help="--shared's other process: a Python loop, or a torch job with torch's default threads")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(*json.loads(args.one), args.device, args.steps, args.warmup, args.compile,
                                  args.matmul_dtype)))
        return
    if args.matmul_dtype:  # refused hardware fails here, once, not in every case's process
        import nas.config  # noqa: F401  (stores the config schemas)
        from nas.engine.common import resolve_device
        from nas.errors import ConfigError
        from nas.precision import check_matmul_dtype

        try:
            check_matmul_dtype(args.matmul_dtype, resolve_device(args.device))
        except ConfigError as err:
            raise SystemExit(f"--matmul-dtype {args.matmul_dtype}: {err}".replace("set matmul_dtype=null",
                                                                                  "leave out --matmul-dtype"))
    if args.shared:
        result = {"shared_cores": shared_cores(args)}
        _write(result, args.out)
        return
    result = {"cases": {}, "sweep": []}
    for name in args.cases:
        result["cases"][name] = _in_subprocess(list(CASES[name]), args)
        print(f"{name}: {json.dumps(result['cases'][name])}", file=sys.stderr)
    if not args.no_sweep:
        sweep_args = argparse.Namespace(**{**vars(args), "steps": args.sweep_steps, "warmup": 2})
        for spec in SWEEP:
            result["sweep"].append(_in_subprocess(list(spec), sweep_args))
            print(f"sweep {spec}: {json.dumps(result['sweep'][-1])}", file=sys.stderr)
    _write(result, args.out)
    failed = [n for n, r in result["cases"].items() if "error" in r] + [str(r["spec"]) for r in result["sweep"]
                                                                        if "error" in r]
    if failed:  # the JSON above has each error; the exit status says it too
        raise SystemExit(f"{len(failed)} case(s) failed: {', '.join(failed)}")


def _write(result: dict, out) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


def shared_cores(args) -> dict:
    """Each case's seconds per step alone and beside one busy process (``args.busy_kind``: see BUSY), measured
    alternately ``args.shared`` times each in fresh processes: the runs, their medians and busy / alone."""
    import statistics

    out = {"cores": os.cpu_count(), "busy_process": args.busy_kind, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "num_threads_env": os.environ.get("OMP_NUM_THREADS"), "cases": {}}
    for name in args.cases:
        runs, threads = {"alone": [], "busy": []}, {"alone": [], "busy": []}
        for _ in range(args.shared):
            for mode in ("alone", "busy"):
                r = _in_subprocess(list(CASES[name]), args, busy=int(mode == "busy"))
                if "error" in r:
                    raise SystemExit(f"{name} ({mode}): {r['error']}")
                runs[mode].append(r["seconds_per_step"])
                threads[mode].append(r["threads"])  # beside the busy process, the run takes the free cores only
                print(f"{name} {mode}: {r['seconds_per_step']} s/step, {r['threads']} threads", file=sys.stderr)
        med = {m: statistics.median(v) for m, v in runs.items()}
        out["cases"][name] = {"threads": threads, "seconds_per_step": runs,
                              "median_alone": med["alone"], "median_busy": med["busy"],
                              "busy_over_alone": round(med["busy"] / med["alone"], 2)}
    return out


if __name__ == "__main__":
    main()
