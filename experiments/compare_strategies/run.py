"""Same-budget comparison of search strategies: search with each, retrain every result alike, tabulate and plot.

    python experiments/compare_strategies/run.py --preset cpu                 # PTB, DARTS cell space, 2-core CPU
    python experiments/compare_strategies/run.py --preset paper --device cuda  # the DARTS paper's size (GPU)
    python experiments/compare_strategies/run.py --preset smoke --out /tmp/cmp # the pipeline in minutes
    # two runs at a time, one core each (one process owns --out; it keeps two subprocesses busy):
    python experiments/compare_strategies/run.py --preset cpu3 --jobs 2 --num-threads 1

A preset (``<name>.yaml`` beside this file) lists the dataset, the seeds, the overrides every ``search.py`` run
gets, one override list per strategy (the search budget is set there: DARTS and random_ws spend it as supernet
epochs, random and bayesian as ``strategy.budget_tokens`` of per-trial training -- the same currency, training
tokens), and the overrides of the ``train.py`` run that retrains every final genotype.  Every run is a
subprocess with its own run directory under ``--out``; a run whose ``metrics.json`` exists is not run again, so
an interrupted comparison continues where it stopped.  One process owns ``--out`` at a time (a second is refused
with ``RunDirBusy``); ``--jobs N`` runs N (strategy, seed) pairs side by side within it.

Outputs in ``--out``: ``search/<strategy>/seed<s>/`` and ``train/<strategy>/seed<s>/`` (the runs),
``results.csv`` (one row per strategy and seed), ``summary.csv`` and ``results.md`` (per strategy: mean ± sd over
seeds, the 95% bootstrap CI of the mean retrained test metric, and its difference from ``--baseline`` (random
search) with Welch's t-test p-value; see :func:`summarize`), ``best_so_far.png`` (best validation metric so far
against training tokens spent, mean over seeds, one line per strategy), and ``tb_hparams/<strategy>_seed<s>/``
(one TensorBoard run per search with its hparams and final metrics: ``tensorboard --logdir <out>/tb_hparams``,
HPARAMS tab; see :func:`write_hparams`).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import shutil
import statistics
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from nas.engine.resume import run_dir_status
from nas.engine.rundir import RunDirBusy, own_run_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

#: set once the comparison is stopping (Ctrl-C, or a run failed): no new run starts
STOPPING = threading.Event()
_RUNNING: set = set()  # the subprocesses under way (``--jobs`` > 1: several)
_RUNNING_LOCK = threading.Lock()


def stop_runs() -> None:
    """Stop the comparison: start no new run, and send SIGINT to the runs under way (each writes its checkpoint and
    stops; the next call of this script resumes it).  Without this, a Ctrl-C with ``--jobs 2`` let the other worker
    thread start its next search and waited for it to end."""
    STOPPING.set()
    with _RUNNING_LOCK:
        for proc in _RUNNING:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)


PRESET_KEYS = ("dataset", "seeds", "search", "strategies", "train")


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_stop_handlers() -> None:
    """SIGINT and SIGTERM stop the comparison as Ctrl-C does (:func:`stop_runs`).  A job started in the background
    (``nohup ... &`` from a script, a CI job) inherits SIGINT ignored, and Python then installs no handler of its
    own: ``kill -INT`` did nothing to such a comparison."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)


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
    if STOPPING.is_set():
        sys.exit(f"stopping: {script} into {run_dir} not started (it runs when this script is run again)")
    print("  $ " + " ".join(cmd[1:]), flush=True)
    start = time.time()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM in this thread (--jobs 1): the run stops at its next step, with a
            if proc.poll() is None:  # checkpoint, before this script goes (it would otherwise run on, orphaned)
                proc.send_signal(signal.SIGINT)
                proc.wait()
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}) after {time.time() - start:.0f} s; log: {log_path}")
    print(f"  {time.time() - start:.0f} s: {run_dir}", flush=True)
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


def threads_per_job(jobs: int, cores: Optional[int] = None) -> Optional[int]:
    """The ``num_threads`` each of ``jobs`` runs at once gets when ``--num-threads`` is not given: the cores this
    process may use (``os.sched_getaffinity``) shared out, at least 1; None for one job (torch's own default).

    Without it, ``--jobs 2`` on 2 cores started two runs with torch's default of 2 threads each: four busy threads on
    two cores, where OpenMP's busy waiting makes each run several times slower (README, "Shared cores").
    """
    if jobs <= 1:
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def job_threads(num_threads: Optional[int], jobs: int) -> Optional[int]:
    """``--num-threads`` if given, else :func:`threads_per_job` (said on stdout when it applies)."""
    threads = num_threads or threads_per_job(jobs)
    if threads and not num_threads:
        print(f"--jobs {jobs}: num_threads={threads} for every run (the cores shared out; --num-threads sets it)",
              flush=True)
    return threads


def run_all(fn, items: list, jobs: int) -> list:
    """``[fn(item) for item in items]``, ``jobs`` at a time (a queue taken in order; each ``fn`` runs its own
    subprocesses).  A Ctrl-C or a failed run (its message is raised here) starts nothing new and stops the runs under
    way at their next step (:func:`stop_runs`; they resume when the script runs again)."""
    if jobs == 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            stop_runs()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu", help="cpu3 | cpu | paper | smoke, or a path to a preset .yaml")
    p.add_argument("--out", default=None, help="output folder (default: outputs/compare_strategies/<preset>)")
    p.add_argument("--seeds", type=int, nargs="*", help="override the preset's seeds")
    p.add_argument("--strategies", nargs="*", help="run only these strategies of the preset")
    p.add_argument("--device", default=None, help="device= for every run (default: the configs' auto)")
    p.add_argument("--num-threads", type=int, default=None,
                   help="num_threads= for every run (e.g. 1 when several comparisons share the cores)")
    p.add_argument("--jobs", type=int, default=1,
                   help="(strategy, seed) pairs run at once, each its own search then retraining (e.g. 2 with "
                        "--num-threads 1 on 2 cores)")
    p.add_argument("--baseline", default="random",
                   help="the strategy every other one is tested against (default: random)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    install_stop_handlers()
    preset = load_preset(args.preset)
    if args.baseline not in preset["strategies"]:
        p.error(f"--baseline {args.baseline!r} is not a strategy of the preset ({', '.join(preset['strategies'])})")
    unknown = [k for k in args.strategies or [] if k not in preset["strategies"]]
    if unknown:
        p.error(f"--strategies {' '.join(unknown)}: not in preset {args.preset!r} "
                f"({', '.join(preset['strategies'])})")
    name = os.path.splitext(os.path.basename(args.preset))[0]
    out = os.path.abspath(args.out or os.path.join("outputs", "compare_strategies", name))
    try:  # one comparison per output folder at a time (its runs would otherwise be started twice and mixed)
        own_run_dir(out, "output folder")
    except RunDirBusy as err:
        p.exit(1, f"RunDirBusy: {err}\n")
    seeds = args.seeds if args.seeds else preset["seeds"]
    strategies = {k: v for k, v in preset["strategies"].items() if not args.strategies or k in args.strategies}
    common = [f"dataset={preset['dataset']}"] + ([f"device={args.device}"] if args.device else [])
    threads = job_threads(args.num_threads, args.jobs)
    common += [f"num_threads={threads}"] if threads else []

    def one(strategy: str, extra: list, seed: int) -> dict:
        """Search with ``strategy`` and retrain its genotype, for one seed: its results.csv row."""
        print(f"{strategy}, seed {seed}", flush=True)
        sdir = os.path.join(out, "search", strategy, f"seed{seed}")
        s = run("search.py", common + preset["search"] + extra + [f"seed={seed}"], sdir,
                os.path.join(out, "logs", f"search_{strategy}_seed{seed}.log"))
        tdir = os.path.join(out, "train", strategy, f"seed{seed}")
        t = run("train.py", common + preset["train"] + [f"arch={sdir}", f"seed={seed}"], tdir,
                os.path.join(out, "logs", f"train_{strategy}_seed{seed}.log"))
        return row(strategy, seed, s, t)

    def row(strategy: str, seed: int, s: dict, t: dict) -> dict:
        """The results.csv row of a finished pair: its search's and retraining's metrics.json ``s`` and ``t``."""
        recs = trials(os.path.join(out, "search", strategy, f"seed{seed}"))
        return {"strategy": strategy, "seed": seed,
                "valid": t.get("best_valid_ppl", t.get("best_valid_accuracy")),
                "test": t.get("test_ppl", t.get("test_accuracy")),
                # the seed article's three evaluations of the retrained model (test split)
                "test_accuracy": t.get("test_accuracy"), "test_cross_entropy": t.get("test_cross_entropy"),
                "params": t.get("params"),
                "search_seconds": s["wall_seconds"], "search_tokens": recs[-1]["cum_train_tokens"],
                "evaluations": len(recs), "retrain_seconds": t["wall_seconds"],
                "genotype": json.dumps(s["genotype"]["nodes"])}

    pairs = [(strategy, extra, seed) for strategy, extra in strategies.items() for seed in seeds]
    rows = run_all(lambda pair: one(*pair), pairs, args.jobs)  # the (strategy, seed) pairs in the preset's order
    # the table is of every finished pair in --out: a run of a subset (--strategies / --seeds) adds its rows to the
    # earlier ones instead of replacing the table with its own
    done = {(r["strategy"], r["seed"]) for r in rows}
    for strategy in preset["strategies"]:
        for sdir in glob.glob(os.path.join(out, "search", strategy, "seed*")):
            seed, tdir = os.path.basename(sdir)[4:], os.path.join(out, "train", strategy, os.path.basename(sdir))
            if not seed.isdigit() or (strategy, int(seed)) in done:
                continue
            if all(os.path.isfile(os.path.join(d, "metrics.json")) for d in (sdir, tdir)):
                rows.append(row(strategy, int(seed), *(json.load(open(os.path.join(d, "metrics.json")))
                                                       for d in (sdir, tdir))))
    order = list(preset["strategies"])
    rows.sort(key=lambda r: (order.index(r["strategy"]), r["seed"]))
    all_strategies = {k: preset["strategies"][k] for k in order if any(r["strategy"] == k for r in rows)}
    all_seeds = {k: sorted(r["seed"] for r in rows if r["strategy"] == k) for k in all_strategies}
    if len(rows) > len(done):
        print(f"the table also holds {len(rows) - len(done)} finished runs of earlier calls in {out}", flush=True)
    write_tables(rows, out, metric="accuracy" if preset["dataset"] == "sst2" else "perplexity",
                 baseline=args.baseline)
    plot(out, all_strategies, all_seeds)
    write_hparams(rows, out, all_strategies)
    print(f"results: {out}/results.md, results.csv, summary.csv, best_so_far.png; "
          f"tensorboard --logdir {os.path.join(out, 'tb_hparams')} (HPARAMS tab)")


#: the statistics' settings, fixed so that a table is reproducible from its results.csv
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_METHOD = "percentile"
BOOTSTRAP_SEED = 0


def summarize(rows: list, baseline: str = "random") -> list:
    """Per strategy (in the rows' order): mean and sd over seeds of every figure, and the statistics of the
    retrained test metric (``row["test"]``: perplexity, or accuracy on SST-2).

    ``rows``: one dict per (strategy, seed) with the keys of results.csv.  Returns one dict per strategy with
    ``seeds``, ``<key>_mean`` / ``<key>_sd`` (sample sd, n - 1; 0 for one seed) for each figure, and:

    * ``test_ci_low`` / ``test_ci_high``: the 95% bootstrap confidence interval of the mean test metric
      (``scipy.stats.bootstrap``, percentile method, 9999 resamples, ``rng=0``; Efron & Tibshirani 1993, ch. 13).
      None with one seed (a resample of one value has no spread).  The percentile interval lies inside the
      seeds' range, so with 3-5 seeds it is narrower than the t interval and undercovers: read it as the spread
      the seeds show, not as a guaranteed 95%.
    * ``test_diff``: mean test metric minus the ``baseline``'s (in the metric's units; perplexity: negative is
      better than the baseline), ``test_p``, ``welch_t``, ``welch_df``: Welch's unequal-variance t-test of the
      two strategies' seeds (``scipy.stats.ttest_ind(equal_var=False)``, two-sided; Welch 1947).  None for the
      baseline itself, when the baseline is not among the rows, or when either side has fewer than 2 seeds; the
      p-value is NaN when both sides have no spread at all.
    """
    import numpy as np
    from scipy import stats

    keys = ("valid", "test", "test_accuracy", "test_cross_entropy", "params", "search_seconds", "search_tokens",
            "evaluations", "retrain_seconds")
    values = {}
    for r in rows:
        values.setdefault(r["strategy"], []).append(r)

    def finite(rs, key):
        return [float(r[key]) for r in rs if r.get(key) is not None and math.isfinite(float(r[key]))]

    base = finite(values.get(baseline, []), "test")
    out = []
    for strategy, rs in values.items():
        summary = {"strategy": strategy, "seeds": len(rs)}
        for key in keys:
            summary[f"{key}_mean"], summary[f"{key}_sd"] = mean_std(finite(rs, key))
        test = finite(rs, "test")
        summary["test_ci_low"] = summary["test_ci_high"] = None
        if len(test) > 1:
            ci = stats.bootstrap((np.asarray(test),), np.mean, confidence_level=CONFIDENCE,
                                 n_resamples=BOOTSTRAP_RESAMPLES, method=BOOTSTRAP_METHOD,
                                 rng=BOOTSTRAP_SEED).confidence_interval
            summary["test_ci_low"], summary["test_ci_high"] = float(ci.low), float(ci.high)
        summary["baseline"] = baseline
        summary["test_diff"] = summary["test_p"] = summary["welch_t"] = summary["welch_df"] = None
        if strategy != baseline and base:
            summary["test_diff"] = statistics.fmean(test) - statistics.fmean(base)
            if len(test) > 1 and len(base) > 1:
                with np.errstate(divide="ignore", invalid="ignore"):
                    res = stats.ttest_ind(test, base, equal_var=False)
                summary["test_p"], summary["welch_t"], summary["welch_df"] = (float(res.pvalue), float(res.statistic),
                                                                             float(res.df))
        out.append(summary)
    return out


def _ci_cell(s: dict) -> str:
    if s["test_ci_low"] is None:
        return f"— ({s['seeds']} seed: no CI)" if s["seeds"] == 1 else "—"
    return f"[{s['test_ci_low']:.2f}, {s['test_ci_high']:.2f}]"


def _test_cells(s: dict) -> tuple:
    """The markdown cells 'difference from the baseline' and 'p (Welch)'."""
    if s["strategy"] == s["baseline"]:
        return "—", "—"
    if s["test_diff"] is None:
        return f"— (no {s['baseline']})", "—"
    diff = f"{s['test_diff']:+.2f}"
    if s["test_p"] is None:
        return diff, "— (< 2 seeds)"
    if not math.isfinite(s["test_p"]):
        return diff, "— (no spread)"
    return diff, f"{s['test_p']:.3g}"


def write_tables(rows: list, out: str, metric: str, baseline: str = "random") -> None:
    """results.csv (``rows`` as they are), summary.csv (:func:`summarize`, full precision) and results.md (the
    summary rounded for reading) in ``out``.  ``metric``: ``perplexity`` or ``accuracy`` (the column names)."""
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summaries = summarize(rows, baseline)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summaries[0]))
        w.writeheader()
        w.writerows(summaries)
    # the test accuracy has its own column where the metric is not already accuracy (language models: next-token)
    accuracy = metric != "accuracy"
    lines = [f"| strategy | seeds | retrained valid {metric} | retrained test {metric} | "
             f"test {metric}: 95% CI of the mean | Δ test vs {baseline} | p vs {baseline} (Welch) | "
             + ("test accuracy | " if accuracy else "") + "test cross-entropy | params | search wall s | "
             "search tokens | evaluations |", "|---" * (12 + accuracy) + "|"]
    for s in summaries:
        diff, p = _test_cells(s)
        lines.append(f"| {s['strategy']} | {s['seeds']} | {s['valid_mean']:.2f} ± {s['valid_sd']:.2f} | "
                     f"{s['test_mean']:.2f} ± {s['test_sd']:.2f} | {_ci_cell(s)} | {diff} | {p} | "
                     + (f"{s['test_accuracy_mean']:.4f} ± {s['test_accuracy_sd']:.4f} | " if accuracy else "")
                     + f"{s['test_cross_entropy_mean']:.4f} ± {s['test_cross_entropy_sd']:.4f} | "
                     f"{s['params_mean']:,.0f} | {s['search_seconds_mean']:.0f} ± {s['search_seconds_sd']:.0f} | "
                     f"{s['search_tokens_mean']:,.0f} | {s['evaluations_mean']:.1f} |")
    n = sorted({s["seeds"] for s in summaries})
    lines += ["", f"Mean ± sd over seeds ({'/'.join(map(str, n))} per strategy). CI: 95% percentile bootstrap of "
              f"the mean test {metric} (scipy.stats.bootstrap, {BOOTSTRAP_RESAMPLES} resamples, rng="
              f"{BOOTSTRAP_SEED}); with few seeds it lies within the seeds' range and is too narrow. Δ: mean test "
              f"{metric} minus {baseline}'s; p: Welch's two-sided t-test of the seeds against {baseline}'s "
              "(scipy.stats.ttest_ind, equal_var=False). Full precision: summary.csv."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _search_config(out: str, strategy: str, seed) -> dict:
    """The resolved config of a search run (its run dir's config.yaml) as a dict; {} when it has none."""
    from omegaconf import OmegaConf

    path = os.path.join(out, "search", strategy, f"seed{seed}", "config.yaml")
    return OmegaConf.to_container(OmegaConf.load(path)) if os.path.isfile(path) else {}


def _select(cfg: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


#: the search settings every run's hparams show (from its resolved config), besides the preset's overrides
HPARAM_SETTINGS = ("strategy.name", "epochs", "space.nhid", "batch_size")
#: override keys that choose a config group (not a setting: their choice shows as e.g. ``strategy.name``)
CONFIG_GROUPS = ("strategy", "space", "dataset", "experiment", "tuning", "space_strategy")
#: results.csv key -> the metric's name in the HParams view
HPARAM_METRICS = {"valid": "retrained/valid", "test": "retrained/test", "test_accuracy": "retrained/test_accuracy",
                  "test_cross_entropy": "retrained/test_cross_entropy", "params": "retrained/params",
                  "search_seconds": "search/wall_seconds", "search_tokens": "search/train_tokens",
                  "evaluations": "search/evaluations", "retrain_seconds": "retrain/wall_seconds"}


def write_hparams(rows: list, out: str, strategies: dict) -> str:
    """One TensorBoard run per (strategy, seed) in ``<out>/tb_hparams/<strategy>_seed<seed>/``, written with
    ``SummaryWriter.add_hparams``: hparams ``strategy`` (the preset's name), ``seed``, the search settings of
    :data:`HPARAM_SETTINGS` and every key the preset's override lists set (``strategies``: name -> overrides),
    read from each search run's resolved ``config.yaml``; metrics :data:`HPARAM_METRICS`.  Returns the folder.

    TensorBoard takes the HParams table's columns from one run's experiment summary, so every run gets the same
    keys: a key a run's config lacks (darts has no ``strategy.budget_tokens``) is ``"—"``, and a key that is not a
    number (or not a bool) in every run is written as text in all of them; a metric missing from any run is left
    out.  The folder is rewritten from ``rows`` each time (it is derived data)."""
    from torch.utils.tensorboard import SummaryWriter

    root = os.path.join(out, "tb_hparams")
    shutil.rmtree(root, ignore_errors=True)
    keys = list(HPARAM_SETTINGS)
    for extra in strategies.values():
        for override in extra:
            key = override.split("=", 1)[0].lstrip("+~")
            if key not in CONFIG_GROUPS and key not in keys:  # strategy=<name> is strategy.name, already there
                keys.append(key)
    configs = {(r["strategy"], r["seed"]): _search_config(out, r["strategy"], r["seed"]) for r in rows}
    raw = {run: {k: _select(cfg, k) for k in keys} for run, cfg in configs.items()}
    kinds = {}
    for k in keys:
        vals = [h[k] for h in raw.values()]
        if all(isinstance(v, bool) for v in vals):
            kinds[k] = bool
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            kinds[k] = float
        else:
            kinds[k] = str
    metrics = [k for k in HPARAM_METRICS
               if all(r.get(k) is not None and math.isfinite(float(r[k])) for r in rows)]
    for r in rows:
        h = raw[(r["strategy"], r["seed"])]
        hparams = {"strategy": r["strategy"], "seed": int(r["seed"])}
        for k in keys:
            v = h[k]
            hparams[k] = v if kinds[k] is not str else ("—" if v is None else str(v))
        with SummaryWriter(os.path.join(root, f"{r['strategy']}_seed{r['seed']}")) as w:
            w.add_hparams(hparams, {HPARAM_METRICS[k]: float(r[k]) for k in metrics}, run_name=".")
    return root


def plot(out: str, strategies, seeds) -> None:
    """Best-so-far validation metric against training tokens spent: per strategy, the mean over seeds of each
    seed's step function, on the union of the seeds' cost points.  ``seeds``: a list (every strategy's), or a dict
    strategy -> its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = None
    counts = set()
    for strategy in strategies:
        curves = []
        mine = seeds[strategy] if isinstance(seeds, dict) else seeds
        counts.add(len(mine))
        for seed in mine:
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
    ax.set_ylabel(f"best {metric} so far (mean over {counts.pop()} seeds)" if len(counts) == 1
                  else f"best {metric} so far (mean over each strategy's seeds)")
    if metric == "valid_ppl":
        ax.set_yscale("log")
    ax.set_title("best-so-far validation metric vs search cost\n"
                 "(one-shot: the supernet's validation metric; black-box: each trial's retrained model's)",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "best_so_far.png"), dpi=120)
    plt.close(fig)


def main_stopping_cleanly(main_fn) -> None:
    """Run ``main_fn``; a Ctrl-C / SIGTERM (KeyboardInterrupt, once the runs under way have written their
    checkpoints) ends the script with one line and status 130 instead of a traceback."""
    try:
        main_fn()
    except KeyboardInterrupt:
        print("stopped: the runs under way wrote their checkpoints; the same command resumes them", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main_stopping_cleanly(main)
