"""The DARTS recurrent-cell protocol as one command: search with several seeds, retrain each cell briefly, select
the best by validation perplexity, retrain it in full, report its test perplexity.

    python experiments/darts_protocol/run.py --preset cpu                    # PTB, 2-core CPU (12 min)
    python experiments/darts_protocol/run.py --preset paper --device cuda    # the paper's protocol (GPU, days)
    python experiments/darts_protocol/run.py --preset smoke --out /tmp/prot  # every stage in about a minute

Stages (Liu et al. 2019, "DARTS", sec. 3.2 "Architecture evaluation", Fig. 3 caption, A.2.2):

1. ``search``: ``search.py`` once per seed (the paper: 4 seeds of the second-order search).
2. ``short_retrain``: ``train.py`` retrains each seed's genotype from scratch for a short time (the paper: 300
   epochs on PTB) with the seed of its search.
3. selection: the seed whose short retraining has the lowest best validation perplexity (ties: the earlier
   seed in the preset's list).  The test split is never read for it (train.py scores it anyway; the protocol
   ignores that figure).
4. ``full_retrain``: ``train.py`` retrains the selected genotype from scratch in full (the paper: until
   convergence, A.2.2) with the preset's ``final_seed``, a fresh initialization; its test perplexity is the result.

A preset (``<name>.yaml`` beside this file) gives ``seeds``, ``final_seed`` and the override lists ``search``,
``short_retrain`` and ``full_retrain``.  Every run is a subprocess with its own run directory under ``--out``
(``search/seed<s>/``, ``short_retrain/seed<s>/``, ``full_retrain/``); a run whose ``metrics.json`` exists is
skipped, an interrupted one is continued with ``resume=``, so running the same command again resumes the protocol.

Outputs in ``--out``: ``results.md`` (per seed: genotype, search and short-retrain validation perplexity, wall
times; the selected seed; the full retraining's validation and test perplexity; wall time per stage and in all),
``results.csv`` (one row per run), ``timings.json`` (each run's process wall seconds, summed over invocations).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import sys
import time

from nas.atomic import atomic_write_text
from nas.engine.rundir import RunDirBusy, own_run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STAGES = ("search", "short_retrain", "full_retrain")


def _compare_strategies():
    """experiments/compare_strategies/run.py as a module: its subprocess runner (skip / resume / run) is reused."""
    spec = importlib.util.spec_from_file_location("compare_strategies_run",
                                                  os.path.join(ROOT, "experiments", "compare_strategies", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_preset(name: str) -> dict:
    """The preset ``name`` (a name of a ``.yaml`` beside this file, or a path to one) as a dict.

    Exits with a one-line message when it is missing, lacks a key, or has fewer than one seed or repeated seeds.
    """
    preset = _compare_strategies().load_preset(name, HERE, ("seeds", "final_seed") + STAGES)
    seeds = preset["seeds"]
    if not seeds or len(set(seeds)) != len(seeds):
        sys.exit(f"preset {name}: seeds must be a non-empty list without repeats, got {seeds}")
    return preset


def select(valid_ppls: dict):
    """The seed to retrain in full: the one with the lowest short-retraining validation perplexity.

    Args:
        valid_ppls: seed -> best validation perplexity of its short retraining, in the preset's seed order.
    Returns:
        the selected seed; on equal perplexities the first in ``valid_ppls``'s order.  NaN counts as worse than
        any number (a diverged run is never selected over a finite one).
    Raises:
        ValueError: when ``valid_ppls`` is empty or no perplexity is finite (every short retraining diverged).
    Source: DARTS (Liu et al. 2019) sec. 3.2: "pick the best cell based on its validation performance obtained by
    training from scratch for a short period".
    """
    finite = {s: v for s, v in valid_ppls.items() if v is not None and math.isfinite(v)}
    if not finite:
        raise ValueError(f"no short retraining has a finite validation perplexity ({valid_ppls}): nothing to select")
    best = min(finite.values())
    return next(s for s, v in finite.items() if v == best)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="cpu | paper | smoke, or a path to a preset .yaml")
    p.add_argument("--out", default=None, help="output folder (default: outputs/darts_protocol/<preset>)")
    p.add_argument("--device", default=None, help="device= for every run (default: the configs' auto)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="num_threads= for every run (e.g. 1 when other work shares the cores)")
    args = p.parse_args(argv)
    preset = load_preset(args.preset)
    name = os.path.splitext(os.path.basename(args.preset))[0]
    out = os.path.abspath(args.out or os.path.join("outputs", "darts_protocol", name))
    try:  # one comparison per output folder at a time (its runs would otherwise be started twice and mixed)
        own_run_dir(out, "output folder")
    except RunDirBusy as err:
        p.exit(1, f"RunDirBusy: {err}\n")
    common = ([f"device={args.device}"] if args.device else []) + (
        [f"num_threads={args.num_threads}"] if args.num_threads else [])
    cs = _compare_strategies()
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}

    def stage(script, overrides, key, seed):
        """Run (or skip / resume) one stage's run; returns its metrics and adds its process time to timings."""
        run_dir = os.path.join(out, key)
        print(f"{key}", flush=True)
        finished = os.path.isfile(os.path.join(run_dir, "metrics.json"))
        start = time.time()
        metrics = cs.run(script, common + overrides + [f"seed={seed}"], run_dir,
                         os.path.join(out, "logs", key.replace("/", "_") + ".log"))
        if not finished:
            timings[key] = timings.get(key, 0.0) + time.time() - start
            os.makedirs(out, exist_ok=True)
            atomic_write_text(timings_path, json.dumps(timings, indent=1))
        return metrics

    runs = {}
    for seed in preset["seeds"]:
        runs[f"search/seed{seed}"] = stage("search.py", preset["search"], f"search/seed{seed}", seed)
        runs[f"short_retrain/seed{seed}"] = stage(
            "train.py", preset["short_retrain"] + [f"arch={os.path.join(out, 'search', f'seed{seed}')}"],
            f"short_retrain/seed{seed}", seed)
    try:
        chosen = select({s: runs[f"short_retrain/seed{s}"]["best_valid_ppl"] for s in preset["seeds"]})
    except ValueError as err:
        sys.exit(f"selection: {err}")
    print(f"selected: seed {chosen}", flush=True)
    # the selection is recorded before the full retraining starts, so that a resumed protocol never continues a
    # full retraining of one cell under the name of another
    marker = os.path.join(out, "full_retrain_of_seed")
    if os.path.isfile(marker) and open(marker).read().strip() != str(chosen):
        sys.exit(f"{out}/full_retrain is of seed {open(marker).read().strip()}'s cell, but the short retrainings "
                 f"now select seed {chosen}: use another --out")
    with open(marker, "w") as f:
        f.write(f"{chosen}\n")
    runs["full_retrain"] = stage(
        "train.py", preset["full_retrain"] + [f"arch={os.path.join(out, 'search', f'seed{chosen}')}"],
        "full_retrain", preset["final_seed"])
    rows = table_rows(runs, preset, chosen, timings, out)
    write_tables(rows, out, name, preset)
    print(f"results: {out}/results.md, results.csv")


def genotype_text(metrics: dict) -> str:
    from nas.genotype import Genotype

    return str(Genotype.from_dict(metrics["genotype"]))


def table_rows(runs: dict, preset: dict, chosen, timings: dict, out: str) -> list:
    """One row per run (long format): stage, seed, run dir, genotype, validation / test perplexity, wall times."""
    rows = []
    for key, m in runs.items():
        stage = key.split("/")[0]
        seed = preset["final_seed"] if stage == "full_retrain" else int(key.rsplit("seed", 1)[1])
        cell_seed = chosen if stage == "full_retrain" else seed
        search = runs[f"search/seed{cell_seed}"]
        rows.append({
            "stage": stage, "seed": seed, "cell_of_seed": cell_seed, "selected": cell_seed == chosen,
            "valid_ppl": m["final_valid_ppl"] if stage == "search" else m["best_valid_ppl"],
            "test_ppl": m["test_ppl"] if stage == "full_retrain" else None,
            "run_seconds": m["wall_seconds"], "process_seconds": timings.get(key),
            "run_dir": os.path.relpath(os.path.join(out, key), out), "genotype": genotype_text(search)})
    return rows


def _fmt(x, spec) -> str:
    return "" if x is None else format(x, spec)


def write_tables(rows: list, out: str, name: str, preset: dict) -> None:
    """``results.csv`` (the rows) and ``results.md`` (per seed; selected; final; wall time per stage)."""
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {(r["stage"], r["cell_of_seed"]): r for r in rows}
    final = next(r for r in rows if r["stage"] == "full_retrain")
    lines = [f"# DARTS protocol, preset `{name}`", "",
             "| seed | genotype | search valid ppl (supernet) | short-retrain valid ppl | selected | "
             "search s | short-retrain s |", "|---|---|---|---|---|---|---|"]
    for seed in preset["seeds"]:
        s, t = by[("search", seed)], by[("short_retrain", seed)]
        lines.append(f"| {seed} | `{s['genotype']}` | {s['valid_ppl']:.2f} | {t['valid_ppl']:.2f} | "
                     f"{'**yes**' if t['selected'] else ''} | {_fmt(s['process_seconds'], '.0f')} | "
                     f"{_fmt(t['process_seconds'], '.0f')} |")
    lines += ["", f"Selected: seed {final['cell_of_seed']} (lowest short-retrain validation perplexity). "
              f"Full retraining (seed {final['seed']}):", "",
              "| cell of seed | valid ppl | test ppl | full-retrain s |", "|---|---|---|---|",
              f"| {final['cell_of_seed']} | {final['valid_ppl']:.2f} | {final['test_ppl']:.2f} | "
              f"{_fmt(final['process_seconds'], '.0f')} |", "",
              "| stage | runs | process wall s | in-run wall s |", "|---|---|---|---|"]
    total_p = total_r = 0.0
    for stage in STAGES:
        rs = [r for r in rows if r["stage"] == stage]
        p = sum(r["process_seconds"] or 0.0 for r in rs)
        r_ = sum(r["run_seconds"] for r in rs)
        total_p, total_r = total_p + p, total_r + r_
        lines.append(f"| {stage} | {len(rs)} | {p:.0f} | {r_:.0f} |")
    lines += [f"| total | {len(rows)} | {total_p:.0f} ({total_p / 60:.1f} min) | {total_r:.0f} |", "",
              "Process wall s: each run's subprocess from start to exit (Python start, data loading, compiling, "
              "test scoring), summed over invocations; in-run wall s: the run's own clock (`wall_seconds` of its "
              "metrics.json). The search valid ppl is the supernet's on the validation split, which also "
              "trained alpha: not comparable with the retrained models' figures."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
