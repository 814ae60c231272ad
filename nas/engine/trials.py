"""The trial record every strategy writes: ``trials.jsonl`` and the best-so-far against cost in TensorBoard.

``trials.jsonl`` (one JSON object per line, appended and flushed after each candidate, by every strategy):
``{"strategy", "trial", "genotype", "metric", "value", "wall_seconds", "train_tokens", "cum_wall_seconds",
"cum_train_tokens", "seed", "best_value", "accuracy", "cross_entropy", "params"}`` -- the last three are the
evaluations the trial measured (held-out accuracy, cross-entropy in nats, parameter count, of the epoch its value
comes from; null where not measured); ``train_tokens`` counts the task's cost unit (language models:
training target tokens; sentence classification: the words of the training sentences), the one cost currency of
all strategies.

A black-box search's records also carry ``search_seconds``: the search's wall seconds when the record was written,
over every process of a resumed search (the strategy's own time and the trials'); its ``metrics.json``
``wall_seconds`` goes on from the last one.

A trial a multi-fidelity search's pruner stopped (``strategy.pruner``) carries ``"pruned": <epoch>``: its ``value`` is
its value after that epoch and its ``train_tokens`` what it trained on (counted in ``cum_train_tokens`` like any
trial's), but a pruned value is not a finished result, so it is never the best (``best_value``, the best genotype
and ``results.md``'s ``*`` skip it), as Optuna's ``study.best_trial`` takes COMPLETE trials only.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

from nas.atomic import atomic_write_text
from nas.genotype import Genotype
from nas.strategies.blackbox import OBJECTIVES

TRIALS_FILE = "trials.jsonl"
#: the black-box searches' table of their trials (Markdown), written at the end
RESULTS_FILE = "results.md"
#: the evaluations each record carries (the objectives a black-box search may be scored by)
FIGURES = tuple(OBJECTIVES)


def better(a: Optional[float], b: Optional[float], direction: str) -> bool:
    """True when value ``a`` beats ``b`` (None never beats anything; anything beats None)."""
    if a is None or not math.isfinite(a):
        return False
    if b is None:
        return True
    return a < b if direction == "minimize" else a > b


class TrialLog:
    """Appends the common per-candidate record to ``trials.jsonl`` and logs best-so-far against cost to
    TensorBoard (``search/best_vs_tokens`` with step = cumulative training tokens, ``search/best_vs_seconds``
    with step = cumulative wall seconds rounded down, ``search/value`` per trial).  TensorBoard keeps one point per
    step, so a record whose cost did not move a step on (a reused result costs nothing; several quick trials in
    one second) is drawn one step after the previous point: every tag's steps increase strictly."""

    def __init__(self, run_dir: str, strategy: str, metric: str, direction: str, seed: int, writer=None):
        self.path = os.path.join(run_dir, TRIALS_FILE)
        self.strategy, self.metric, self.direction, self.seed = strategy, metric, direction, seed
        self.writer = writer
        self.n, self.cum_wall, self.cum_tokens, self.best, self.best_genotype = 0, 0.0, 0, None, None
        #: the search's wall seconds up to the last record (its ``search_seconds``; a record without one: the
        #: trials' own seconds, ``cum_wall_seconds``), which a resumed search goes on from
        self.search_seconds = 0.0
        self.records: list = []
        self.best_figures: Optional[dict] = None  # the best trial's FIGURES
        self.study_trials: set = set()  # the shared study's trial numbers recorded here
        self._steps = {"tokens": -1, "seconds": -1}  # the last step of search/best_vs_tokens and _vs_seconds

    def resume(self, keep: Optional[Callable[[dict], bool]] = None) -> int:
        """Continue an existing ``trials.jsonl`` of this run dir (a resumed run): trial numbers, cumulative
        cost and the best so far carry on.  ``keep(record)``: drop the records it rejects (written after the
        checkpoint being resumed from; the file is rewritten atomically).  Returns the number of records kept.
        A torn last line (the process was killed while appending it) is dropped."""
        if not os.path.isfile(self.path):
            return 0
        records = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.endswith("\n"):  # damage inside the file, not a torn last line
                        raise
        kept = [r for r in records if keep is None or keep(r)]
        if len(kept) != len(records) or (records and not open(self.path, "rb").read().endswith(b"\n")):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        records = kept
        for r in records:
            self.n, self.cum_wall, self.cum_tokens = r["trial"], r["cum_wall_seconds"], r["cum_train_tokens"]
            self.search_seconds = r.get("search_seconds", r["cum_wall_seconds"])
            genotype = Genotype.from_dict(r["genotype"])
            self.records.append(r)
            if r.get("study_trial") is not None:
                self.study_trials.add(r["study_trial"])
            if r.get("pruned") is None and better(r["value"], self.best, self.direction):
                self.best, self.best_genotype = r["value"], genotype
                self.best_figures = {k: r.get(k) for k in FIGURES}
            if self.best is not None:
                self._cost_steps()
        return len(records)

    def _cost_steps(self) -> tuple:
        """The steps of the next best-vs-cost points: the cumulative tokens and whole seconds, at least one past the
        last ones written (TensorBoard shows one point per step)."""
        tokens = self._steps["tokens"] = max(self.cum_tokens, self._steps["tokens"] + 1)
        seconds = self._steps["seconds"] = max(int(self.cum_wall), self._steps["seconds"] + 1)
        return tokens, seconds

    def add(self, genotype: Genotype, value: Optional[float], wall_seconds: float, train_tokens: int,
            figures: Optional[dict] = None, **extra) -> dict:
        """Append one trial's record (``figures``: its :data:`FIGURES`, None: not measured; ``extra``: further keys,
        e.g. ``pruned=<epoch>``, which keeps it from being the best) and log best-so-far."""
        self.n += 1
        self.cum_wall += wall_seconds
        self.cum_tokens += int(train_tokens)
        figures = {k: (figures or {}).get(k) for k in FIGURES}
        if extra.get("pruned") is None and better(value, self.best, self.direction):
            self.best, self.best_genotype, self.best_figures = value, genotype, figures
        record = {"strategy": self.strategy, "trial": self.n, "genotype": genotype.to_dict(), "metric": self.metric,
                  "value": value, "wall_seconds": wall_seconds, "train_tokens": int(train_tokens),
                  "cum_wall_seconds": self.cum_wall, "cum_train_tokens": self.cum_tokens, "seed": self.seed,
                  "best_value": self.best, **figures, **extra}
        self.records.append(record)
        self.search_seconds = record.get("search_seconds", self.cum_wall)
        if extra.get("study_trial") is not None:
            self.study_trials.add(extra["study_trial"])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.best is not None:
            tokens_step, seconds_step = self._cost_steps()
        if self.writer is not None and self.best is not None:
            self.writer.add_scalar("search/best_vs_tokens", self.best, tokens_step)
            self.writer.add_scalar("search/best_vs_seconds", self.best, seconds_step)
            if value is not None:
                self.writer.add_scalar("search/value", value, self.n)
            self.writer.flush()
        return record

    @property
    def genotypes(self) -> list:
        """The genotype of every record so far, in order."""
        return [Genotype.from_dict(r["genotype"]) for r in self.records]

    def figures_of(self, genotype: Genotype) -> Optional[dict]:
        """The :data:`FIGURES` of this log's first trained trial of ``genotype`` (a repeated proposal reports its
        result); None when this log has none."""
        for r in self.records:
            if (not r.get("repeated") and r.get("pruned") is None
                    and Genotype.from_dict(r["genotype"]).key() == genotype.key()):
                return {k: r.get(k) for k in FIGURES}
        return None

    def results_table(self) -> str:
        """The trials as a Markdown table: number, genotype, the objective's value (its own column unless it is one
        of the three figures, whose header then says ``(objective)``), accuracy, cross-entropy (nats), parameter
        count, wall seconds; the best trial marked ``*`` (the first of equal values; never a pruned one, whose
        genotype cell says ``pruned after epoch <e>``)."""
        best = next((r["trial"] for r in self.records if r["value"] is not None and r["value"] == self.best
                     and r.get("pruned") is None), None)
        own = next((k for k in FIGURES if OBJECTIVES[k][0] == self.metric), None)
        names = {"accuracy": "accuracy", "cross_entropy": "cross-entropy", "params": "params"}

        def cell(v, fmt):
            return "-" if v is None else format(v, fmt)

        headers = ([] if own else [self.metric]) + [names[k] + (" (objective)" if k == own else "") for k in FIGURES]
        lines = ["| trial | genotype | " + " | ".join(headers) + " | seconds |",
                 "|---:|---|" + "---:|" * len(headers) + "---:|"]
        for r in self.records:
            mark = " *" if r["trial"] == best else ""
            seed = f" (seed {r['train_seed']})" if r.get("train_seed") is not None else ""
            seed += f" (pruned after epoch {r['pruned']})" if r.get("pruned") is not None else ""
            cells = ([] if own else [cell(r["value"], ".4f")]) + [
                cell(r.get("accuracy"), ".4f"), cell(r.get("cross_entropy"), ".4f"), cell(r.get("params"), ",")]
            lines.append(f"| {r['trial']}{mark} | `{Genotype.from_dict(r['genotype'])}`{seed} | " + " | ".join(cells)
                         + f" | {r['wall_seconds']:.1f} |")
        return "\n".join(lines) + "\n"
