"""Same-budget comparison of search strategies: search with each, retrain every result alike, tabulate and plot.

    python experiments/compare_strategies/run.py --preset cpu                 # PTB, DARTS cell space, 2-core CPU
    python experiments/compare_strategies/run.py --preset paper --device cuda  # the DARTS paper's size (GPU)
    python experiments/compare_strategies/run.py --preset smoke --out /tmp/cmp # the pipeline in minutes
    # two processes, one core each, sharing one output folder (a last run without --seeds tabulates all):
    python experiments/compare_strategies/run.py --preset cpu --seeds 0 --num-threads 1 &
    python experiments/compare_strategies/run.py --preset cpu --seeds 1 --num-threads 1

A preset (``<name>.yaml`` beside this file) lists the dataset, the seeds, the overrides every ``search.py`` run
gets, one override list per strategy (the search budget is set there: DARTS and random_ws spend it as supernet
epochs, random and bayesian as ``strategy.budget_tokens`` of per-trial training -- the same currency, training
tokens), and the overrides of the ``train.py`` run that retrains every final genotype.  Every run is a
subprocess with its own run directory under ``--out``; a run whose ``metrics.json`` exists is not run again, so
an interrupted comparison continues where it stopped.

Outputs in ``--out``: ``search/<strategy>/seed<s>/`` and ``train/<strategy>/seed<s>/`` (the runs),
``results.csv`` (one row per strategy and seed), ``results.md`` (mean ± std per strategy), ``best_so_far.png``
(best validation metric so far against training tokens spent, mean over seeds, one line per strategy).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

from nas.engine.resume import run_dir_status
from nas.engine.rundir import RunDirBusy, own_run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


PRESET_KEYS = ("dataset", "seeds", "search", "strategies", "train")


def load_preset(name: str, folder: str = HERE, keys=PRESET_KEYS) -> dict:
    """The preset ``name`` (a ``.yaml`` in ``folder``, or a path to one) as a dict.

    Exits with a one-line message when it is missing or lacks one of ``keys``."""
    from omegaconf import OmegaConf

    path = name if name.endswith(".yaml") else os.path.join(folder, f"{name}.yaml")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
        sys.exit(f"no preset {name!r}; presets: {', '.join(presets)} (or a path to a .yaml)")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [k for k in keys if k not in preset]
    if missing:
        sys.exit(f"preset {path} lacks {missing}")
    return preset


def run(script: str, overrides: list, run_dir: str, log_path: str) -> dict:
    """Run ``script`` (search.py / train.py) into ``run_dir`` unless it already finished (an interrupted run is
    resumed); return its metrics."""
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(metrics):
        print(f"  done before: {run_dir}", flush=True)
        return json.load(open(metrics))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if run_dir_status(run_dir) == "unfinished":  # interrupted before: go on from its checkpoint / trials
        runtime = [o for o in overrides if o.split("=", 1)[0] in ("num_threads", "device")]
        cmd = [sys.executable, os.path.join(ROOT, script), f"resume={run_dir}", "progress=false"] + runtime
    else:
        cmd = [sys.executable, os.path.join(ROOT, script)] + overrides + ["progress=false",
                                                                          f"hydra.run.dir={run_dir}"]
    print("  $ " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}) after {time.time() - start:.0f} s; log: {log_path}")
    print(f"  {time.time() - start:.0f} s", flush=True)
    return json.load(open(metrics))


def trials(run_dir: str) -> list:
    path = os.path.join(run_dir, "trials.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="cpu | paper | smoke, or a path to a preset .yaml")
    p.add_argument("--out", default=None, help="output folder (default: outputs/compare_strategies/<preset>)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the preset's seeds")
    p.add_argument("--strategies", nargs="*", help="run only these strategies of the preset")
    p.add_argument("--device", default=None, help="device= for every run (default: the configs' auto)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="num_threads= for every run (e.g. 1 when several comparisons share the cores)")
    args = p.parse_args(argv)
    preset = load_preset(args.preset)
    name = os.path.splitext(os.path.basename(args.preset))[0]
    out = os.path.abspath(args.out or os.path.join("outputs", "compare_strategies", name))
    try:  # one comparison per output folder at a time (its runs would otherwise be started twice and mixed)
        own_run_dir(out, "output folder")
    except RunDirBusy as err:
        p.exit(1, f"RunDirBusy: {err}\n")
    seeds = args.seeds if args.seeds else preset["seeds"]
    strategies = {k: v for k, v in preset["strategies"].items() if not args.strategies or k in args.strategies}
    common = [f"dataset={preset['dataset']}"] + ([f"device={args.device}"] if args.device else [])
    common += [f"num_threads={args.num_threads}"] if args.num_threads else []
    rows = []
    for strategy, extra in strategies.items():
        for seed in seeds:
            print(f"{strategy}, seed {seed}", flush=True)
            sdir = os.path.join(out, "search", strategy, f"seed{seed}")
            s = run("search.py", common + preset["search"] + extra + [f"seed={seed}"], sdir,
                    os.path.join(out, "logs", f"search_{strategy}_seed{seed}.log"))
            tdir = os.path.join(out, "train", strategy, f"seed{seed}")
            t = run("train.py", common + preset["train"] + [f"arch={sdir}", f"seed={seed}"], tdir,
                    os.path.join(out, "logs", f"train_{strategy}_seed{seed}.log"))
            recs = trials(sdir)
            rows.append({"strategy": strategy, "seed": seed,
                         "valid": t.get("best_valid_ppl", t.get("best_valid_accuracy")),
                         "test": t.get("test_ppl", t.get("test_accuracy")),
                         # the seed article's three evaluations of the retrained model (test split)
                         "test_accuracy": t.get("test_accuracy"), "test_cross_entropy": t.get("test_cross_entropy"),
                         "params": t.get("params"),
                         "search_seconds": s["wall_seconds"], "search_tokens": recs[-1]["cum_train_tokens"],
                         "evaluations": len(recs), "retrain_seconds": t["wall_seconds"],
                         "genotype": json.dumps(s["genotype"]["nodes"])})
    write_tables(rows, out, metric="accuracy" if preset["dataset"] == "sst2" else "perplexity")
    plot(out, strategies, seeds)
    print(f"results: {out}/results.md, results.csv, best_so_far.png")


def write_tables(rows: list, out: str, metric: str) -> None:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    # the test accuracy has its own column where the metric is not already accuracy (language models: next-token)
    accuracy = metric != "accuracy"
    lines = [f"| strategy | seeds | retrained valid {metric} | retrained test {metric} | "
             + ("test accuracy | " if accuracy else "") + "test cross-entropy | params | search wall s | "
             "search tokens | evaluations |", "|---" * (9 + accuracy) + "|"]
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        rs = [r for r in rows if r["strategy"] == strategy]
        cells = {k: mean_std([r[k] for r in rs]) for k in ("valid", "test", "test_accuracy", "test_cross_entropy",
                                                           "params", "search_seconds", "search_tokens",
                                                           "evaluations")}
        lines.append(f"| {strategy} | {len(rs)} | {cells['valid'][0]:.2f} ± {cells['valid'][1]:.2f} | "
                     f"{cells['test'][0]:.2f} ± {cells['test'][1]:.2f} | "
                     + (f"{cells['test_accuracy'][0]:.4f} ± {cells['test_accuracy'][1]:.4f} | " if accuracy else "")
                     + f"{cells['test_cross_entropy'][0]:.4f} ± {cells['test_cross_entropy'][1]:.4f} | "
                     f"{cells['params'][0]:,.0f} | {cells['search_seconds'][0]:.0f} ± {cells['search_seconds'][1]:.0f} | "
                     f"{cells['search_tokens'][0]:,.0f} | {cells['evaluations'][0]:.1f} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out: str, strategies, seeds) -> None:
    """Best-so-far validation metric against training tokens spent: per strategy, the mean over seeds of each
    seed's step function, on the union of the seeds' cost points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = None
    for strategy in strategies:
        curves = []
        for seed in seeds:
            recs = trials(os.path.join(out, "search", strategy, f"seed{seed}"))
            metric = recs[0]["metric"]
            curves.append([(r["cum_train_tokens"], r["best_value"]) for r in recs if r["best_value"] is not None])
        xs = sorted({x for c in curves for x, _ in c})
        ys = []
        for x in xs:
            vals = [next((y for cx, y in reversed(c) if cx <= x), None) for c in curves]
            vals = [v for v in vals if v is not None]
            ys.append(statistics.fmean(vals) if len(vals) == len(curves) else float("nan"))
        ax.step(xs, ys, where="post", label=strategy, marker=".")
    ax.set_xlabel("training tokens spent by the search")
    ax.set_ylabel(f"best {metric} so far (mean over {len(seeds)} seeds)")
    if metric == "valid_ppl":
        ax.set_yscale("log")
    ax.set_title("best-so-far validation metric vs search cost\n"
                 "(one-shot: the supernet's validation metric; black-box: each trial's retrained model's)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "best_so_far.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
