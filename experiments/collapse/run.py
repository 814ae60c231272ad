"""Watch a DARTS search collapse (or not): the collapse diagnostics over the epochs, and what DARTS-ES would return.

    python experiments/collapse/run.py --preset cpu                   # PTB, 2-core CPU (see cpu.yaml for the time)
    python experiments/collapse/run.py --preset smoke --out /tmp/col  # the pipeline in about a minute

Per seed of the preset, one ``search.py`` run with the collapse diagnostics every epoch (``nas/diagnostics.py``;
README: "Collapse diagnostics and DARTS-ES") and early stopping *off*, so that the search runs to the end; DARTS-ES's rule (``EarlyStopConfig``, the
preset's ``early_stop`` settings) is then applied to the recorded eigenvalues after each epoch, as the search would
have applied it, to show where it would have stopped and which epoch's genotype it would have returned (the
reference code's "simulate" mode, ``--early_stop 2``).

A preset (``<name>.yaml`` beside this file) gives ``seeds``, ``search`` (search.py overrides) and ``early_stop``
(window, delta, factor, start_epoch).  Runs go to ``--out``/``seed<s>/``; a finished run (its ``metrics.json``) is
not run again and an interrupted one is resumed, so the same command continues an interrupted experiment.

Outputs in ``--out``: ``results.md`` (per seed and epoch: validation perplexity, the Hessian's largest eigenvalue,
its cost in seconds and as a share of the epoch, the identity share of the genotype and of softmax(α), the mean
edge entropy, the genotype; DARTS-ES's decision), ``results.csv`` (the same rows) and ``collapse.png`` (eigenvalue
and identity shares over the epochs, the ES stop marked).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os

from nas.atomic import atomic_write_text
from nas.diagnostics import EarlyStopConfig, early_stop_decision
from nas.engine.rundir import RunDirBusy, own_run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _compare_strategies():
    """experiments/compare_strategies/run.py as a module: its subprocess runner (skip / resume / run) is reused."""
    spec = importlib.util.spec_from_file_location("compare_strategies_run",
                                                  os.path.join(ROOT, "experiments", "compare_strategies", "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def es_replay(history: list, es: EarlyStopConfig, epochs: int):
    """DARTS-ES's decision as the search would have taken it: after each epoch with an eigenvalue, before the last.
    Returns the decision dict (with ``stopped_after_epoch``) or None."""
    evs = []
    for h in history:
        d = h.get("diagnostics") or {}
        if "hessian_eigenvalue" not in d:
            continue
        evs.append((h["epoch"], d["hessian_eigenvalue"]))
        if h["epoch"] < epochs:
            decision = early_stop_decision(evs, es)
            if decision is not None:
                return {**decision, "stopped_after_epoch": h["epoch"]}
    return None


def genotype_text(g: dict) -> str:
    return "; ".join(f"{i}<-" + ",".join(f"{e['op']}({e['input']})" for e in node)
                     for i, node in enumerate(g["nodes"], 1))


def epoch_rows(seed, run_dir: str, metrics: dict) -> list:
    """One row per epoch of a finished search: its figures and diagnostics, the epoch's seconds from trials.jsonl."""
    seconds = {}
    with open(os.path.join(run_dir, "trials.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            seconds[r["epoch"]] = r.get("wall_seconds")  # the epoch's own seconds (its Hessian included)
    rows = []
    for h in metrics["history"]:
        d = h.get("diagnostics") or {}
        sec, hs = seconds.get(h["epoch"]), d.get("hessian_seconds")
        rows.append({"seed": seed, "epoch": h["epoch"], "valid_ppl": h.get("valid_ppl"),
                     "hessian_eigenvalue": d.get("hessian_eigenvalue"), "hessian_matvecs": d.get("hessian_matvecs"),
                     "hessian_seconds": hs, "epoch_seconds": sec,
                     "hessian_share": None if not (hs and sec) else hs / sec,
                     "identity_genotype": d.get("parameter_free_genotype"), "identity_mass": d.get("parameter_free_mass"),
                     "edge_entropy_mean": d.get("edge_entropy_mean"), "min_lead": d.get("min_lead"),
                     "genotype": genotype_text(h["genotype"])})
    return rows


def _fmt(x, spec):
    return "—" if x is None else format(x, spec)


def write_outputs(out: str, preset_name: str, rows: list, decisions: dict, metrics: dict) -> None:
    """results.md, results.csv and collapse.png from the epoch rows and the ES decisions (by seed)."""
    fields = list(rows[0])
    with open(os.path.join(out, "results.csv.tmp"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(os.path.join(out, "results.csv.tmp"), os.path.join(out, "results.csv"))
    lines = [f"# Collapse diagnostics, preset `{preset_name}`", ""]
    for seed, m in metrics.items():
        d = decisions[seed]
        decided = m.get("decidedness")
        verdict = ("" if decided is None else f" Decided: {'yes' if decided['decided'] else 'no'} (weakest lead "
                   f"{decided['min_lead']:.3f}, rule {decided['margin']}).")
        lines += [f"## seed {seed}", "",
                  f"Search: {m['epochs']} epochs in {m['wall_seconds']:.0f} s; final genotype "
                  f"`{genotype_text(m['genotype'])}`.{verdict}", ""]
        if d is None:
            lines += ["DARTS-ES would not have stopped this search.", ""]
        else:
            lines += [f"DARTS-ES would have stopped after epoch {d['stopped_after_epoch']} (local means "
                      f"{d['previous']:.4g} -> {d['current']:.4g}, ratio {d['ratio']:.2f}) and returned epoch "
                      f"{d['genotype_epoch']}'s genotype.", ""]
        lines += ["| epoch | valid ppl | eigenvalue | products | Hessian s | epoch s | Hessian share | identity in genotype "
                  "| identity mass | mean edge entropy | weakest lead | genotype |", "|" + "---|" * 12]
        for r in (r for r in rows if r["seed"] == seed):
            lines.append(f"| {r['epoch']} | {_fmt(r['valid_ppl'], '.2f')} | {_fmt(r['hessian_eigenvalue'], '.4g')} | "
                         f"{_fmt(r['hessian_matvecs'], 'd')} | {_fmt(r['hessian_seconds'], '.1f')} | "
                         f"{_fmt(r['epoch_seconds'], '.0f')} | {_fmt(r['hessian_share'], '.1%')} | "
                         f"{_fmt(r['identity_genotype'], '.0%')} | {_fmt(r['identity_mass'], '.3f')} | "
                         f"{_fmt(r['edge_entropy_mean'], '.4f')} | {_fmt(r['min_lead'], '.2g')} | `{r['genotype']}` |")
        lines.append("")
    atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
    plot(out, rows, decisions)


def plot(out: str, rows: list, decisions: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
    for seed in decisions:
        mine = [r for r in rows if r["seed"] == seed]
        ev = [(r["epoch"], r["hessian_eigenvalue"]) for r in mine if r["hessian_eigenvalue"] is not None]
        line, = top.plot(*zip(*ev), marker="o", label=f"seed {seed}")
        bottom.plot([r["epoch"] for r in mine], [r["identity_mass"] for r in mine], color=line.get_color(),
                    label=f"seed {seed}: share of softmax(α)")
        bottom.plot([r["epoch"] for r in mine], [r["identity_genotype"] for r in mine], color=line.get_color(),
                    ls="--", label=f"seed {seed}: share of the genotype's ops")
        d = decisions[seed]
        if d is not None:
            for ax in (top, bottom):
                ax.axvline(d["stopped_after_epoch"], color=line.get_color(), ls=":", lw=1)
            top.annotate(f" ES: stop, epoch {d['genotype_epoch']}'s genotype", (d["stopped_after_epoch"], 0.97),
                         xycoords=("data", "axes fraction"), va="top", fontsize=8, color=line.get_color())
    top.set_ylabel("largest eigenvalue of ∇²_α L_val")
    top.legend(fontsize=8)
    bottom.set_ylabel("identity")
    bottom.set_xlabel("epoch")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.set_ylim(0, 1)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "collapse.png.tmp.png"), dpi=110)
    os.replace(os.path.join(out, "collapse.png.tmp.png"), os.path.join(out, "collapse.png"))
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--out", default=None, help="default: outputs/collapse/<preset>")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="the seeds to run (default: the preset's)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="num_threads= for every run (default: torch's; with --jobs N, the cores shared out)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (e.g. 2 on 2 cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    cs = _compare_strategies()
    preset = cs.load_preset(args.preset, folder=HERE, keys=("seeds", "search", "early_stop"))
    out = os.path.abspath(args.out or os.path.join("outputs", "collapse", args.preset))
    os.makedirs(out, exist_ok=True)
    try:  # one experiment per output folder at a time
        own_run_dir(out, "output folder")
    except RunDirBusy as err:
        parser.exit(1, f"RunDirBusy: {err}\n")
    es = EarlyStopConfig(enabled=True, **preset["early_stop"])
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    n_threads = cs.job_threads(args.num_threads, args.jobs)
    threads = [] if n_threads is None else [f"num_threads={n_threads}"]

    def one(seed: int) -> dict:
        print(f"seed {seed}", flush=True)
        return cs.run("search.py", list(preset["search"]) + [f"seed={seed}", "diagnostics.every=1",
                                                             "diagnostics.early_stop.enabled=false"] + threads,
                      os.path.join(out, f"seed{seed}"), os.path.join(out, "logs", f"seed{seed}.log"))

    cs.install_stop_handlers()
    finished = cs.run_all(one, seeds, args.jobs)  # the seeds, --jobs side by side
    rows, decisions, metrics = [], {}, {}
    for seed, m in zip(seeds, finished):
        metrics[seed] = m
        rows += epoch_rows(seed, os.path.join(out, f"seed{seed}"), m)
        decisions[seed] = es_replay(m["history"], es, m["epochs"])
    write_outputs(out, args.preset, rows, decisions, metrics)
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    _compare_strategies().main_stopping_cleanly(main)
