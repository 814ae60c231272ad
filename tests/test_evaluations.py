"""The three evaluations the seed article names (accuracy, cross-entropy, parameter count): counted exactly, chosen
from the right epoch, reported by every trial and run; the black-box objective; random search with replacement;
the ``seed_example`` preset."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
from nas.engine.blackbox import TRIALS_FILE, TrialResult, search_black_box, task_metric, trial_figures
from nas.engine.trials import RESULTS_FILE
from nas.errors import ConfigError
from nas.spaces import build_space
from nas.spaces.lm import LMOutput
from nas.tasks.language_modeling import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compose_search(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("search", overrides=["progress=false"] + overrides)


class NextIsPlusOne(torch.nn.Module):
    """A language model that gives token ``(x + 1) % V`` probability ``p`` and spreads the rest evenly: its
    predictions and its cross-entropy are known in closed form."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def init_hidden(self, batch_size):
        return torch.zeros(batch_size, 1)

    def forward(self, data, hidden, weights=None):
        probs = torch.full((*data.shape, self.vocab), (1 - self.p) / (self.vocab - 1), dtype=torch.float64)
        probs.scatter_(-1, ((data + 1) % self.vocab).unsqueeze(-1), self.p)
        return LMOutput(probs.log().float(), hidden, None, None)


def test_language_model_accuracy_and_cross_entropy_are_counted_over_every_target():
    """Next-token accuracy = the targets that follow their input by +1, counted here in plain Python over the
    columns; cross-entropy = -(hits ln p + misses ln q) / targets; for bptt that does and does not divide the split."""
    vocab, p = 7, 0.6
    rng = np.random.default_rng(0)
    source = torch.as_tensor(rng.integers(0, vocab, size=(23, 3)))
    # make about half of the steps follow the +1 rule
    for t in range(1, 23):
        for b in range(3):
            if rng.random() < 0.5:
                source[t, b] = (source[t - 1, b] + 1) % vocab
    hits = sum(int(source[t + 1, b]) == (int(source[t, b]) + 1) % vocab for t in range(22) for b in range(3))
    targets = 22 * 3
    q = (1 - p) / (vocab - 1)
    for bptt in (5, 11, 22, 30):
        result = evaluate(NextIsPlusOne(vocab, p), source, bptt)
        assert result.tokens == targets and result.correct == hits
        assert result.accuracy == pytest.approx(hits / targets, abs=1e-12)
        assert result.loss == pytest.approx(-(hits * math.log(p) + (targets - hits) * math.log(q)) / targets,
                                            rel=1e-6)


def test_a_trial_s_value_and_figures_come_from_one_epoch():
    """``objective=cross_entropy`` takes the epoch with the lowest held-out cross-entropy and that epoch's accuracy,
    ``accuracy`` the epoch with the highest accuracy, null the task's metric as retraining kept it, ``params`` the
    parameter count (the kept epoch's figures)."""
    m = {"best_valid_accuracy": 0.80, "valid_accuracy": 0.80, "valid_cross_entropy": 0.50, "params": 1234,
         "history": [{"epoch": 1, "valid_accuracy": 0.70, "valid_loss": 0.45},
                     {"epoch": 2, "valid_accuracy": 0.80, "valid_loss": 0.50},
                     {"epoch": 3, "valid_accuracy": 0.75, "valid_loss": 0.47}]}

    def cfg(objective):
        return compose_search(["dataset=sst2", "space=hybrid", "strategy=random"]
                              + ([] if objective is None else [f"strategy.objective={objective}"]))

    assert trial_figures(cfg("cross_entropy"), m) == (0.45, {"accuracy": 0.70, "cross_entropy": 0.45, "params": 1234})
    assert trial_figures(cfg("accuracy"), m) == (0.80, {"accuracy": 0.80, "cross_entropy": 0.50, "params": 1234})
    assert trial_figures(cfg(None), m) == (0.80, {"accuracy": 0.80, "cross_entropy": 0.50, "params": 1234})
    assert trial_figures(cfg("params"), m) == (1234, {"accuracy": 0.80, "cross_entropy": 0.50, "params": 1234})
    assert task_metric(cfg("cross_entropy")) == ("valid_cross_entropy", "minimize")
    assert task_metric(cfg("params")) == ("params", "minimize")
    assert task_metric(cfg(None)) == ("valid_accuracy", "maximize")


def test_an_unknown_objective_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "search.py", "strategy=random", "strategy.objective=crossentropy",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NAS_DATA": str(tmp_path / "none")})
    assert r.returncode != 0
    assert "strategy.objective='crossentropy'; valid: accuracy, cross_entropy, params" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(ConfigError, match="one worker"):
        from nas.strategies.blackbox import RandomConfig, RandomStrategy

        RandomStrategy(RandomConfig(repeat=True, storage="sqlite:///x.db"), build_space(
            compose_search(["space=stacked_rnn"]).space))


def test_random_search_with_replacement_draws_independently_and_resumes_the_same_draws():
    """``repeat=true`` on the 3-genotype space of seed_example: 10 proposals, each trained with seed + n; the
    draws repeat genotypes (10 > 3); a strategy resumed after k trials proposes what the uninterrupted one did."""
    from nas.strategies.blackbox import RandomStrategy

    cfg = compose_search(["experiment=seed_example"])
    space = build_space(cfg.space)

    def run(k=0, first=None):
        s = RandomStrategy(cfg.strategy, space, seed=5)
        if first is not None:
            s.mark_seen(first)
        out = []
        while not s.stopped(k + len(out)):
            out.append(s.ask())
        return out

    whole = run()
    assert len(whole) == 10 and [p.seed for p in whole] == list(range(5, 15))
    cells = [p.genotype.nodes[0][0].op for p in whole]
    assert set(cells) <= {"rnn_tanh", "lstm", "gru"} and len(set(cells)) < len(cells)  # with replacement
    tail = run(4, [p.genotype for p in whole[:4]])
    assert [(p.genotype, p.seed) for p in tail] == [(p.genotype, p.seed) for p in whole[4:]]


def test_every_trial_records_its_figures_and_the_run_reports_the_best_s(tmp_path):
    """A toy objective whose figures are the trial number: trials.jsonl and results.md hold each trial's, metrics.json
    the best trial's (chosen by the objective, here the lowest cross-entropy), a repeated Bayesian proposal the first
    training's."""
    values = {"rnn_tanh": 0.6, "lstm": 0.4, "gru": 0.5}
    n = []

    def evaluate(genotype, trial_dir, seed=None):
        n.append(seed)
        ce = values[genotype.nodes[0][0].op] + 0.001 * len(n)
        return TrialResult(ce, 0.1, 10, None, {"accuracy": 1 - ce, "cross_entropy": ce, "params": 100 + len(n)})

    cfg = compose_search(["experiment=seed_example", "strategy.trials=6"])
    m = search_black_box(cfg, str(tmp_path), evaluate=evaluate)
    recs = [json.loads(line) for line in open(tmp_path / TRIALS_FILE)]
    assert [r["train_seed"] for r in recs] == n == list(range(6))
    for i, r in enumerate(recs, start=1):
        assert r["params"] == 100 + i and r["cross_entropy"] == r["value"] and r["accuracy"] == 1 - r["value"]
    best = min(recs, key=lambda r: r["value"])
    assert m["best_valid_cross_entropy"] == best["value"] == m["valid_cross_entropy"]
    assert (m["valid_accuracy"], m["params"]) == (best["accuracy"], best["params"])
    table = open(tmp_path / RESULTS_FILE).read().splitlines()
    assert len(table) == 2 + 6
    assert table[0] == "| trial | genotype | accuracy | cross-entropy (objective) | params | seconds |"
    assert table[1 + best["trial"]].startswith(f"| {best['trial']} * |")
    assert f"| {best['params']:,} |" in table[1 + best["trial"]]

    # Bayesian on the same space: the fourth proposal of a 3-genotype space repeats one and reports its figures
    out = tmp_path / "bo"
    m = search_black_box(compose_search(["dataset=sst2", "space=stacked_rnn", "strategy=bayesian", "strategy.trials=5",
                                         "strategy.objective=cross_entropy", "space.cells=[rnn_tanh,lstm,gru]",
                                         "space.max_layers=1", "space.units=[64]", "space.dropouts=[0.0]",
                                         "space.bidirectional=[false]"]), str(out), evaluate=evaluate)
    recs = [json.loads(line) for line in open(out / TRIALS_FILE)]
    firsts = {}
    for r in recs:
        key = json.dumps(r["genotype"], sort_keys=True)
        if r["repeated"]:
            assert {k: r[k] for k in ("accuracy", "cross_entropy", "params")} == firsts[key]
        else:
            firsts[key] = {k: r[k] for k in ("accuracy", "cross_entropy", "params")}
    assert any(r["repeated"] for r in recs)


@pytest.mark.slow
def test_seed_example_runs_ten_trials_selected_by_held_out_cross_entropy(tmp_path):
    """``python search.py experiment=seed_example`` on real SST-2, each trial cut to a few batches: ten trials of
    one 64-unit layer whose cell is rnn_tanh, lstm or gru, seeds 0..9, each with its three figures; the best is
    the lowest held-out cross-entropy; results.md lists all ten."""
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "sst-2")):
        pytest.skip("needs $NAS_DATA/sst-2")
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "search.py", "experiment=seed_example", "strategy.trial_limit_train_batches=4",
                        "limit_eval_batches=2", "num_threads=1", "progress=false", f"hydra.run.dir={run}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in open(run / TRIALS_FILE)]
    assert [r["trial"] for r in recs] == list(range(1, 11)) and [r["train_seed"] for r in recs] == list(range(10))
    emsize, vocab = 128, None
    for rec in recs:
        (layer,) = rec["genotype"]["nodes"]
        assert layer[0]["op"] in ("rnn_tanh", "lstm", "gru")
        assert rec["genotype"]["params"] == [{"bidirectional": False, "dropout": 0.0, "units": 64}]
        trial = json.load(open(run / "trials" / f"{rec['trial']:04d}" / "metrics.json"))
        assert rec["metric"] == "valid_cross_entropy" and rec["value"] == rec["cross_entropy"] == trial["history"][0]["valid_loss"]
        assert rec["accuracy"] == trial["history"][0]["valid_accuracy"] and rec["params"] == trial["params"]
        # params: embedding V x 128 + the cell + the 64 -> 2 classifier; the cell's share from torch's formulas
        gates = {"rnn_tanh": 1, "gru": 3, "lstm": 4}[layer[0]["op"]]
        cell = gates * 64 * (emsize + 64 + 2)
        v = (rec["params"] - cell - (64 * 2 + 2)) / emsize
        assert v == int(v) and (vocab is None or v == vocab)
        vocab = v
    best = min(recs, key=lambda rec: rec["value"])
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["best_valid_cross_entropy"] == best["value"] == metrics["valid_cross_entropy"]
    assert json.load(open(run / "genotype.json"))["nodes"] == best["genotype"]["nodes"]
    table = open(run / RESULTS_FILE).read().splitlines()
    assert len(table) == 12 and table[1 + best["trial"]].startswith(f"| {best['trial']} * |")


def test_a_trial_whose_training_diverges_is_a_failed_trial_and_the_search_goes_on(tmp_path):
    """One genotype's training ends in a NaN loss: its record has value null, the error and the tokens it cost;
    the other trials run and the best is theirs.  On real data, a learning rate that makes every trial diverge:
    each trial is recorded failed with its tokens, and the search ends with SearchFailed."""
    from nas.errors import NonFiniteLossError, SearchFailed

    def evaluate(genotype, trial_dir, seed=None):
        if genotype.nodes[0][0].op == "lstm":
            err = NonFiniteLossError("training loss became nan")
            err.train_tokens = 777
            raise err
        ce = {"rnn_tanh": 0.6, "gru": 0.5}[genotype.nodes[0][0].op]
        return TrialResult(ce, 0.1, 10, None, {"accuracy": 1 - ce, "cross_entropy": ce, "params": 1})

    m = search_black_box(compose_search(["experiment=seed_example"]), str(tmp_path / "toy"), evaluate=evaluate)
    recs = [json.loads(line) for line in open(tmp_path / "toy" / TRIALS_FILE)]
    assert len(recs) == 10
    lstm = [r for r in recs if r["genotype"]["nodes"][0][0]["op"] == "lstm"]
    assert lstm and all(r["value"] is None and r["train_tokens"] == 777 and "nan" in r["failed"] for r in lstm)
    assert all("failed" not in r for r in recs if r not in lstm)
    assert recs[-1]["cum_train_tokens"] == 777 * len(lstm) + 10 * (10 - len(lstm))
    assert m["best_valid_cross_entropy"] == 0.5
    # Bayesian: a diverged trial counts toward the budget of trials as random search's does (it was evaluated)
    cfg = compose_search(["dataset=sst2", "space=stacked_rnn", "strategy=bayesian", "strategy.trials=3",
                          "strategy.n_startup_trials=3", "strategy.objective=cross_entropy", "space.cells=[lstm,gru]",
                          "space.max_layers=1", "space.units=[64,128]", "space.dropouts=[0.0]",
                          "space.bidirectional=[false]"])
    m = search_black_box(cfg, str(tmp_path / "bo"), evaluate=evaluate)
    recs = [json.loads(line) for line in open(tmp_path / "bo" / TRIALS_FILE)]
    lstm = [r for r in recs if r["genotype"]["nodes"][0][0]["op"] == "lstm"]
    assert len(recs) == m["trials"] == 3 and lstm and all(r["value"] is None for r in lstm)

    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    cfg = compose_search(["experiment=smoke", "strategy=random", "strategy.trials=2", "lr=1e30", "clip=1e30",
                          "num_threads=1"])
    with pytest.raises(SearchFailed, match="no trial of random succeeded"):
        search_black_box(cfg, str(tmp_path / "real"))
    recs = [json.loads(line) for line in open(tmp_path / "real" / TRIALS_FILE)]
    assert len(recs) == 2 and all(r["value"] is None and "NonFiniteLossError" in r["failed"] for r in recs)
    # the tokens of the steps before the divergence: whole batches of the smoke config (16 columns x 20 bptt at most)
    assert all(0 < r["train_tokens"] and r["train_tokens"] % 16 == 0 for r in recs)


def test_the_results_table_has_the_objective_s_own_column_only_when_it_is_not_one_of_the_figures(tmp_path):
    from nas.engine.trials import TrialLog
    from nas.genotype import Genotype

    g = Genotype.from_dict({"space": "stacked_rnn", "ops": ["lstm", "identity"], "nodes": [[{"op": "lstm", "input": 0}]],
                            "concat": [1], "params": [{"bidirectional": False, "dropout": 0.0, "units": 64}]})
    log = TrialLog(str(tmp_path), "random", "valid_ppl", "minimize", 0)
    log.add(g, 120.5, 3.0, 10, {"accuracy": 0.25, "cross_entropy": 4.79, "params": 1234567})
    log.add(g, None, 1.0, 5, failed="NonFiniteLossError: nan")
    assert log.results_table().splitlines() == [
        "| trial | genotype | valid_ppl | accuracy | cross-entropy | params | seconds |",
        "|---:|---|---:|---:|---:|---:|---:|",
        f"| 1 * | `{g}` | 120.5000 | 0.2500 | 4.7900 | 1,234,567 | 3.0 |",
        f"| 2 | `{g}` | - | - | - | - | 1.0 |"]
    (tmp_path / "p").mkdir()
    log = TrialLog(str(tmp_path / "p"), "random", "params", "minimize", 0)
    log.add(g, 1234567, 3.0, 10, {"accuracy": 0.25, "cross_entropy": 4.79, "params": 1234567})
    assert log.results_table().splitlines()[0] == "| trial | genotype | accuracy | cross-entropy | params (objective) | seconds |"
    assert log.results_table().splitlines()[2] == f"| 1 * | `{g}` | 0.2500 | 4.7900 | 1,234,567 | 3.0 |"
