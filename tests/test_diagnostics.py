"""Collapse diagnostics (issue 20): the Hessian's eigenvalue against a dense Hessian, DARTS-ES's rule, the cap on
parameter-free ops, decidedness, and a constructed search pushed to ``identity`` end to end."""
import json
import logging
import math
import os

import pytest
import torch

from nas.diagnostics import (EarlyStopConfig, alpha_loss, analysis_mode, decidedness, earliest_stop_epoch,
                             early_stop_decision, edge_entropy, hessian_eigenvalue, hessian_epochs,
                             lanczos_top_eigenvalue, op_histogram, op_shares)
from nas.genotype import GenotypeError, dag_margins, derive
from nas.spaces import SPACES
from nas.spaces.darts_rnn import DartsRNNConfig
from nas.spaces.hybrid import HybridConfig
from nas.spaces.stacked_rnn import StackedRNNConfig
from nas.tasks.base import Batch
from test_search import TINY, cfg_for

V, T, B = 11, 5, 3
DARTS_OPS = ["none", "tanh", "relu", "sigmoid", "identity"]


# -- the eigenvalue ---------------------------------------------------------------------------------------------------
def test_lanczos_finds_the_largest_eigenvalue_not_the_largest_magnitude():
    """Spectrum {-9, -1, 0.5, 2, 3} in a random basis: the largest eigenvalue is 3, though -9 dominates in magnitude
    (power iteration would return -9)."""
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-9.0, -1.0, 0.5, 2.0, 3.0], dtype=torch.float64)) @ q.t()
    out = lanczos_top_eigenvalue(lambda v: a @ v, 5, tol=1e-10, max_matvecs=5)
    assert abs(out["value"] - 3.0) < 1e-9 and out["matvecs"] <= 5 and out["converged"]
    short = lanczos_top_eigenvalue(lambda v: a @ v, 5, tol=1e-10, max_matvecs=2)  # stopped before convergence
    assert not short["converged"] and short["matvecs"] == 2 and short["residual"] > 1e-10 * abs(short["value"])


def tiny_supernet(name):
    torch.manual_seed(0)
    if name == "darts_rnn":
        sp = SPACES.get(name)(DartsRNNConfig(steps=3, emsize=6, nhid=6, dropout=0.0, dropouth=0.0, dropoutx=0.0,
                                             dropouti=0.0))
    elif name == "hybrid":
        sp = SPACES.get(name)(HybridConfig(nodes=3, emsize=6, nhid=6, heads=2, dropout=0.0, dropouth=0.0,
                                           dropouti=0.0, ops=["lstm", "gru", "self_attention", "identity", "zero"]))
    else:
        sp = SPACES.get(name)(StackedRNNConfig(max_layers=2, units=[6], emsize=6, nhid=6, dropouts=[0.0]))
    model = sp.build_supernet(V).double()
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g),
                     model.init_hidden(B)) for _ in range(2)]
    alphas = torch.randn(*sp.alpha_shape, generator=g, dtype=torch.float64)
    return sp, model, batches, alphas


@pytest.mark.parametrize("name", ["darts_rnn", "hybrid", "stacked_rnn"])
def test_hessian_eigenvalue_equals_the_dense_hessians_largest(name):
    """Lanczos on double-backward products against the largest eigenvalue of the dense Hessian that
    torch.autograd.functional.hessian builds from the same loss, on two α batches (the validation loss's mean)."""
    sp, model, batches, alphas = tiny_supernet(name)
    model.train()  # hessian_eigenvalue switches to eval mode itself, and back
    with analysis_mode(model):  # eval mode; attention by the math kernel (the fused one has no double backward)
        dense = torch.autograd.functional.hessian(alpha_loss(model, batches), alphas)
    n = alphas.numel()
    expected = torch.linalg.eigvalsh(dense.reshape(n, n)).max().item()
    before = torch.get_rng_state()
    got = hessian_eigenvalue(model, alphas, batches, tol=1e-8, max_matvecs=n)
    assert abs(got["value"] - expected) <= 1e-3 * abs(expected), (got, expected)
    assert model.training and torch.equal(torch.get_rng_state(), before)  # mode and random state put back


def test_hessian_epochs_follow_the_reference_schedule():
    # the reference computes at 0-based epochs 0, 2, 4, ... and the last: here 1, 3, 5, ... and the last
    assert hessian_epochs(2, 6) == [1, 3, 5, 6] and hessian_epochs(1, 3) == [1, 2, 3]


def test_earliest_stop_epoch():
    """The rule of test_early_stop_rule_by_hand first acts after epoch 5 of 6 (never with 5 epochs: that check would
    be after the last).  darts_ptb_es (every 2, window 5, delta 4, from epoch 11, 50 epochs): the reference's first
    check is at 0-based epoch 22 (la_epochs[e] - 2·4 >= 10 with la_epochs[e] = e - 2·2), here epoch 23."""
    es = EarlyStopConfig(True, window=3, delta=2, factor=1.5, start_epoch=2)
    assert earliest_stop_epoch(1, 6, es) == 5 and earliest_stop_epoch(1, 5, es) is None
    assert earliest_stop_epoch(2, 50, EarlyStopConfig(True)) == 23


# -- DARTS-ES --------------------------------------------------------------------------------------------------------
def test_early_stop_rule_by_hand():
    """window 3 (centred means over 3 eigenvalues, truncated at the start), delta 2, factor 1.5, from epoch 2.
    Eigenvalues 1 1 1 1 2 4 at epochs 1..6.  After epoch 5: newest full mean at epoch 4 = (1+1+2)/3, the one 2
    before at epoch 2 = (1+1+1)/3, ratio 4/3 < 1.5: go on.  After epoch 6: epoch 5's mean (1+2+4)/3 = 7/3 over epoch
    3's 1: 2.33 > 1.5: stop, with epoch 3's genotype.  Before epoch 5 the earlier mean would be epoch 1's, under
    start_epoch."""
    cfg = EarlyStopConfig(enabled=True, window=3, delta=2, factor=1.5, start_epoch=2)
    evs = list(zip(range(1, 7), [1.0, 1.0, 1.0, 1.0, 2.0, 4.0]))
    assert [early_stop_decision(evs[:n], cfg) for n in range(1, 6)] == [None] * 5
    got = early_stop_decision(evs, cfg)
    assert got["genotype_epoch"] == 3 and math.isclose(got["ratio"], 7 / 3) and math.isclose(got["previous"], 1.0)
    # a larger start epoch holds it back; a falling eigenvalue never stops
    assert early_stop_decision(evs, EarlyStopConfig(True, 3, 2, 1.5, start_epoch=4)) is None
    assert early_stop_decision(list(zip(range(1, 9), [8, 7, 6, 5, 4, 3, 2, 1.0])), cfg) is None


# -- the cap and decidedness ----------------------------------------------------------------------------------------
def probs_to_logits(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float64))


def test_cap_keeps_the_strongest_identities_and_gives_the_rest_their_edges_best_other_op():
    """3 nodes (6 edges), k=1.  Node 1 (row 0): identity 0.5.  Node 2 (rows 1-2): row 2 wins with identity 0.6.
    Node 3 (rows 3-5): row 3 wins with identity 0.7 (then sigmoid 0.25).  Uncapped: three identities.
    Cap 1: node 3's (0.7) stays; node 2's edge 1->2 takes its best other op relu (0.3), node 1's edge takes tanh
    (0.3 > relu 0.1, sigmoid 0.1); the predecessors stay."""
    rows = [[0.0001, 0.3, 0.1, 0.0999, 0.5],   # 0->1
            [0.1, 0.2, 0.2, 0.1, 0.4],          # 0->2
            [0.0001, 0.05, 0.3, 0.0499, 0.6],   # 1->2
            [0.0, 0.05, 0.0, 0.25, 0.7],        # 0->3
            [0.2, 0.2, 0.2, 0.2, 0.2],          # 1->3
            [0.2, 0.2, 0.2, 0.2, 0.2]]          # 2->3
    a = probs_to_logits([[max(p, 1e-9) for p in r] for r in rows])
    plain = derive(a, DARTS_OPS, "darts_rnn", k=1)
    assert [(e.op, e.input) for n in plain.nodes for e in n] == [("identity", 0), ("identity", 1), ("identity", 0)]
    capped = derive(a, DARTS_OPS, "darts_rnn", k=1, max_parameter_free=1)
    assert [(e.op, e.input) for n in capped.nodes for e in n] == [("tanh", 0), ("relu", 1), ("identity", 0)]
    none = derive(a, DARTS_OPS, "darts_rnn", k=1, max_parameter_free=0)
    assert [(e.op, e.input) for n in none.nodes for e in n] == [("tanh", 0), ("relu", 1), ("sigmoid", 0)]
    assert derive(a, DARTS_OPS, "darts_rnn", k=1, max_parameter_free=3) == plain
    with pytest.raises(GenotypeError, match="no other non-zero op"):
        derive(a[:, [0, 4]], ["none", "identity"], "darts_rnn", k=1, max_parameter_free=1)


def test_cap_in_the_stacked_rnn_space_keeps_the_strongest_identity_layer():
    sp = SPACES.get("stacked_rnn")(StackedRNNConfig(max_layers=3, units=[8], emsize=8, nhid=8, dropouts=[0.0],
                                                    max_parameter_free=1))
    ops = list(sp.ops)
    ident, lstm, gru = ops.index("identity"), ops.index("lstm"), ops.index("gru")
    a = torch.zeros(sp.alpha_shape, dtype=torch.float64)
    a[0, ident], a[1, ident], a[1, gru], a[2, ident], a[2, lstm] = 2.0, 3.0, 1.0, 1.0, 0.5
    assert [n[0].op for n in SPACES.get("stacked_rnn")(StackedRNNConfig(
        max_layers=3, units=[8], emsize=8, nhid=8, dropouts=[0.0])).derive(a).nodes] == ["identity"] * 3  # uncapped
    # rule: identities at layers 1, 2, 3 with logits 2, 3, 1 -> layer 2 (largest) keeps it; layer 1 takes its best
    # cell (all cells 0: the first cell), layer 3 its best cell (lstm 0.5)
    first_cell = next(o for o in ops if o != "identity")
    assert [n[0].op for n in sp.derive(a).nodes] == [first_cell, "identity", "lstm"]
    # the decidedness of that capped genotype: layer 1's cell leads the other cells by 0 (all at logit 0), layer 2's
    # identity leads gru, layer 3's lstm leads the other cells (logit 0.5 over 0)
    p = torch.softmax(a, -1)
    margins = dict(sp.decision_margins(a))
    assert margins["layer 1"] == 0.0
    assert math.isclose(margins["layer 2"], (p[1, ident] - p[1, gru]).item())
    assert math.isclose(margins["layer 3"], (p[2, lstm] - p[2, gru]).item())


def test_dag_margins_and_decidedness_by_hand():
    """Node 1 (row 0): tanh 0.5 over relu 0.3 -> lead 0.2.  Node 2 (rows 1-2), k=1: row 1's best non-zero is
    sigmoid 0.4, row 2's relu 0.35; kept row 1, its lead = 0.4 - max(second op 0.3, rival 0.35) = 0.05."""
    rows = [[0.1, 0.5, 0.3, 0.05, 0.05],
            [0.1, 0.1, 0.1, 0.4, 0.3],
            [0.2, 0.15, 0.35, 0.15, 0.15]]
    a = probs_to_logits(rows)
    got = dag_margins(a, DARTS_OPS, k=1)
    assert [n for n, _ in got] == [1, 2]
    assert math.isclose(got[0][1], 0.2, abs_tol=1e-12) and math.isclose(got[1][1], 0.05, abs_tol=1e-12)
    sp = SPACES.get("darts_rnn")(DartsRNNConfig(steps=2))
    d = decidedness(a, DARTS_OPS, sp, margin=0.05)
    assert d["decided"] and math.isclose(d["min_lead"], 0.05, abs_tol=1e-12)
    assert not decidedness(a, DARTS_OPS, sp, margin=0.06)["decided"]
    # per edge: the top weight and its lead over the row's second (none counts here: it is α's mass)
    assert [(e["op"], round(e["top"], 6), round(e["lead"], 6)) for e in d["edges"]] == [
        ("tanh", 0.5, 0.2), ("sigmoid", 0.4, 0.1), ("relu", 0.35, 0.15)]
    # with the cap, a choice the cap made leads the edge's other allowed ops: one node whose identity (0.4) gives way
    # to tanh (0.3), which leads relu (0.25) by 0.05 (uncapped: identity over tanh by 0.1)
    one = probs_to_logits([[0.0001, 0.3, 0.25, 0.0499, 0.4]])
    assert math.isclose(dag_margins(one, DARTS_OPS, 1)[0][1], 0.1, abs_tol=1e-12)
    assert math.isclose(dag_margins(one, DARTS_OPS, 1, max_parameter_free=0)[0][1], 0.05, abs_tol=1e-12)


def test_op_histogram_shares_and_entropy():
    # node 1: relu (0.3); node 2: row 2's identity (0.25) beats row 1's best non-zero op (0.2)
    a = probs_to_logits([[0.1, 0.2, 0.3, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2], [0.45, 0.1, 0.1, 0.1, 0.25]])
    shares = op_shares(a, DARTS_OPS)
    assert math.isclose(shares["none"], 0.75 / 3) and math.isclose(shares["identity"], 0.65 / 3)
    assert math.isclose(sum(shares.values()), 1.0)
    ent = edge_entropy(a)
    assert math.isclose(ent[1].item(), math.log(5))  # a uniform row
    assert math.isclose(ent[2].item(), -(0.45 * math.log(0.45) + 3 * 0.1 * math.log(0.1) + 0.25 * math.log(0.25)))
    g = derive(a, DARTS_OPS, "darts_rnn", k=1)
    assert op_histogram(g, DARTS_OPS) == {"none": 0, "tanh": 0, "relu": 1, "sigmoid": 0, "identity": 1}


# -- a constructed search pushed to identity -----------------------------------------------------------------------
ES = ["epochs=6", "diagnostics.early_stop.enabled=true", "diagnostics.early_stop.window=3",
      "diagnostics.early_stop.delta=2", "diagnostics.early_stop.factor=1.5", "diagnostics.early_stop.start_epoch=2",
      "limit_train_batches=2", "num_threads=1"]


def push_to_identity(monkeypatch, eigenvalues, until_epoch=None, steps_per_epoch=2):
    """Every α step's gradient says: more identity (-1 on its column, 0 elsewhere) -- after ``until_epoch``: more
    tanh and less identity; the eigenvalue of epoch e is ``eigenvalues[e - 1]`` (the Hessian itself is tested
    above)."""
    from nas import diagnostics
    from nas.strategies.darts import DartsStrategy

    original, steps = DartsStrategy.arch_gradient, []

    def pushed(self, train, valid, eta):
        grad, hidden = original(self, train, valid, eta)
        steps.append(1)
        ops = list(self.space.ops)
        grad = torch.zeros_like(grad)
        if until_epoch is None or (len(steps) - 1) // steps_per_epoch + 1 <= until_epoch:
            grad[:, ops.index("identity")] = -1.0
        else:
            grad[:, ops.index("identity")], grad[:, ops.index("tanh")] = 10.0, -10.0  # (outweighs Adam's momentum)
        return grad, hidden

    calls = []

    def fake(model, alphas, batches, tol, max_matvecs):
        calls.append(1)
        return {"value": eigenvalues[len(calls) - 1], "matvecs": 1, "residual": 0.0, "converged": True}

    monkeypatch.setattr(DartsStrategy, "arch_gradient", pushed)
    monkeypatch.setattr(diagnostics, "hessian_eigenvalue", fake)


def test_search_pushed_to_identity_is_reported_warned_stopped_and_capped(tmp_path, corpus, monkeypatch, caplog):
    from nas.engine.search import search

    push_to_identity(monkeypatch, [1.0, 1.0, 1.0, 1.0, 2.0, 4.0])
    caplog.set_level(logging.INFO)
    cfg = cfg_for(TINY + [f"dataset.root={corpus}"] + ES)
    m = search(cfg, run_dir=str(tmp_path / "es"))
    steps = cfg.space.steps
    # the histogram and shares say identity: every node, and the largest share of the mass, growing
    last = m["history"][-1]["diagnostics"]
    assert last["op_counts"]["identity"] == steps and last["parameter_free_genotype"] == 1.0
    assert max(last["op_shares"], key=last["op_shares"].get) == "identity"
    shares = [h["diagnostics"]["op_shares"]["identity"] for h in m["history"]]
    assert all(a < b for a, b in zip(shares, shares[1:]))
    assert "parameter-free ops (identity) hold 100% of the genotype's ops" in caplog.text
    # ES, by the rule worked by hand in test_early_stop_rule_by_hand: it would stop after epoch 6 with epoch 3's
    # genotype -- but as in the reference the rule is not applied after the last epoch: with epochs=6 the search ends
    assert m["early_stop"] is None and m["epochs_run"] == 6
    # with 7 epochs it stops after epoch 6 and returns epoch 3's genotype: identity everywhere (α is pushed to tanh
    # from epoch 4 on, so that epoch 6's genotype is all tanh)
    monkeypatch.undo()
    push_to_identity(monkeypatch, [1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 8.0], until_epoch=3)
    m = search(cfg_for(TINY + [f"dataset.root={corpus}"] + ES + ["epochs=7", "strategy.arch_lr=0.1"]),
               run_dir=str(tmp_path / "es7"))
    assert m["epochs_run"] == 6 and m["early_stop"]["stopped_after_epoch"] == 6
    assert m["early_stop"]["genotype_epoch"] == 3 and math.isclose(m["early_stop"]["ratio"], 7 / 3)
    run = tmp_path / "es7"
    ops_of = lambda g: [e["op"] for node in g["nodes"] for e in node]  # noqa: E731
    assert ops_of(json.load(open(run / "genotypes/epoch_003.json"))) == ["identity"] * steps
    assert ops_of(json.load(open(run / "genotypes/epoch_006.json"))) == ["tanh"] * steps
    assert ops_of(json.load(open(run / "genotype.json"))) == ["identity"] * steps
    assert sorted(os.listdir(run / "genotypes"))[-1] == "epoch_006.json"
    assert "DARTS-ES" in caplog.text

    # the cap: with space.max_parameter_free=1 the genotype keeps one identity, the node whose identity weight is
    # largest, and every other node takes its edge's best op that is neither identity nor none (from the saved α)
    monkeypatch.undo()
    push_to_identity(monkeypatch, [1.0] * 3)
    m = search(cfg_for(TINY + [f"dataset.root={corpus}", "epochs=3", "space.max_parameter_free=1"]),
               run_dir=str(tmp_path / "cap"))
    alphas = torch.load(tmp_path / "cap" / "checkpoint.pt", weights_only=False)["strategy"]["alphas"].double()
    probs = torch.softmax(alphas, -1)
    plain = derive(alphas, DARTS_OPS, "darts_rnn", k=1)
    rows = [sum(range(i)) + e.input for i, node in enumerate(plain.nodes, 1) for e in node]
    keeper = max(range(steps), key=lambda n: probs[rows[n], 4].item())
    expected = ["identity" if n == keeper else DARTS_OPS[1 + int(probs[rows[n], 1:4].argmax())] for n in range(steps)]
    got = json.load(open(tmp_path / "cap" / "genotype.json"))
    assert [node[0]["op"] for node in got["nodes"]] == expected
    assert [node[0]["input"] for node in got["nodes"]] == [e.input for n in plain.nodes for e in n]


@pytest.mark.parametrize("extra,message", [
    (["diagnostics.hessian=false"], "needs diagnostics.enabled=true and diagnostics.hessian=true"),
    (["diagnostics.enabled=false"], "needs diagnostics.enabled=true and diagnostics.hessian=true"),
    (["strategy=random"], "strategy=random has no α to watch"),
    (["strategy=random_ws"], "strategy=random_ws has no α to watch"),
])
def test_early_stopping_without_its_eigenvalue_is_refused_before_anything_is_written(tmp_path, corpus, extra, message):
    from nas.engine.search import search
    from nas.errors import ConfigError

    cfg = cfg_for(TINY + [f"dataset.root={corpus}", "diagnostics.early_stop.enabled=true"] + extra)
    with pytest.raises(ConfigError, match=message):
        search(cfg, run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


def test_diagnostics_do_not_change_the_search(tmp_path, corpus):
    """Same seed with the diagnostics on (the default) and off: the same α, weights and genotype."""
    from nas.engine.search import search

    on = search(cfg_for(TINY + [f"dataset.root={corpus}", "num_threads=1"]), run_dir=str(tmp_path / "on"))
    off = search(cfg_for(TINY + [f"dataset.root={corpus}", "num_threads=1", "diagnostics.enabled=false"]),
                 run_dir=str(tmp_path / "off"))
    assert "diagnostics" in on["history"][0] and "diagnostics" not in off["history"][0]
    assert on["decidedness"] is not None and off["decidedness"] is None
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("on", "off"))
    assert torch.equal(a["strategy"]["alphas"], b["strategy"]["alphas"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert on["genotype"] == off["genotype"]
    # TensorBoard: the diagnostics' scalars, and every image tag once per step (u01 item 9: genotype/dag was logged
    # twice at the last epoch's step; the final genotype is now genotype/final_dag)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "on" / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert {"diagnostics/hessian_eigenvalue", "diagnostics/op_share/identity", "diagnostics/edge_entropy_min",
            "diagnostics/min_lead"} <= set(ea.Tags()["scalars"])
    # the last epoch's weakest lead is the final decidedness's (the same α)
    assert on["history"][-1]["diagnostics"]["min_lead"] == on["decidedness"]["min_lead"]
    images = {tag: [e.step for e in ea.Images(tag)] for tag in ea.Tags()["images"]}
    assert {"genotype/dag", "genotype/final_dag", "alphas/softmax", "diagnostics/op_shares"} <= set(images)
    assert all(len(steps) == len(set(steps)) for steps in images.values()), images


def test_alpha_heatmap_scale_spans_the_values_shown():
    """A nearly uniform α (softmax 0.120-0.130, u01 item 9's hybrid smoke search): the colours span exactly that
    range, with a colour bar, instead of one flat colour on a 0-to-max scale."""
    from nas.engine.tb import alpha_heatmap

    probs = torch.linspace(0.120, 0.130, 8)
    alphas = torch.log(torch.stack([probs / probs.sum() * 1.0] * 6))  # 6 rows (3 nodes), 8 ops
    shown = torch.softmax(alphas, -1)
    fig = alpha_heatmap(alphas, [f"op{i}" for i in range(8)])
    (image,) = fig.axes[0].get_images()
    low, high = image.get_clim()
    assert math.isclose(low, shown.min().item(), rel_tol=1e-6) and math.isclose(high, shown.max().item(), rel_tol=1e-6)
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    import matplotlib.pyplot as plt

    plt.close(fig)
