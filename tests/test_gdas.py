"""GDAS (strategy=gdas): the Gumbel sample, one op per edge, the reference's straight-through α gradient derived by
hand, the τ schedule, the weights-then-α order, and bit-exact resume."""
import json
import os
import signal

import pytest
import torch
from torch import nn

import nas.strategies.gdas as gdas_module
from nas.engine.search import one_shot_step, SearchSetup
from nas.errors import ConfigError
from nas.genotype import Genotype
from nas.mixed import gumbel_hard, sampled_index
from nas.spaces import SPACES
from nas.spaces.darts_rnn import DartsCell, DartsRNNConfig
from nas.spaces.hybrid import HybridConfig
from nas.spaces.stacked_rnn import StackedRNNConfig
from nas.strategies import STRATEGIES
from nas.strategies.gdas import GdasConfig, tau_at
from nas.tasks.base import Batch, SentenceInputs, Step

V, T, B = 23, 5, 3
DARTS_OPS = ["none", "tanh", "relu", "sigmoid", "identity"]


def reference_draw(alphas, tau, seed):
    """The reference code's draw written out (AutoDL-Projects search_model_gdas.py): g = -log(Exp(1)),
    p = softmax((log_softmax(α) + g) / τ), index = argmax p; returns (p, index)."""
    torch.manual_seed(seed)
    g = -torch.empty_like(alphas).exponential_().log()
    p = torch.softmax((torch.log_softmax(alphas.detach(), -1) + g) / tau, -1)
    return p, p.argmax(-1)


def test_the_sample_is_exactly_one_hot_at_the_reference_draws_argmax():
    alphas = torch.randn(36, 5, dtype=torch.float64)
    for tau in (10.0, 1.0, 0.1):
        p, index = reference_draw(alphas, tau, seed=3)
        torch.manual_seed(3)
        s = gumbel_hard(alphas, tau)
        assert torch.equal(s.index, index) and torch.allclose(s.probs, p, rtol=0, atol=1e-15)
        expected = torch.zeros_like(alphas)
        expected[torch.arange(36), index] = 1.0
        assert torch.equal(s.hard, expected)  # exactly 0 and 1: a supernet skips the zeros
        assert torch.equal(sampled_index(s.hard), index)
    with pytest.raises(ValueError, match="> 0"):
        gumbel_hard(alphas, 0.0)
    # float32, τ = 10 (p ~ 0.2 everywhere): still exactly one-hot
    torch.manual_seed(0)
    s = gumbel_hard(torch.zeros(2000, 5), 10.0)
    assert torch.equal(s.hard, torch.zeros(2000, 5).scatter_(-1, s.index.unsqueeze(-1), 1.0))


def test_low_temperature_samples_follow_softmax_alpha():
    """Gumbel-max draws op k with probability softmax(α)_k, whatever τ (τ only shapes the relaxed gradient)."""
    alphas = torch.log(torch.tensor([[0.1, 0.2, 0.7]])).repeat(4000, 1)
    torch.manual_seed(0)
    freq = torch.bincount(gumbel_hard(alphas, 0.1).index, minlength=3).double() / 4000
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.03)


def test_alpha_gradient_equals_the_hand_derived_reference_estimator():
    """One node, one edge, one time step, no BatchNorm or dropout; L = Σ R ⊙ h_1.  The reference's estimator
    (forward_gdas): h_1 = h_a e_a(s0) + Σ_{k≠a} h_k, so ∂L/∂h_a = Σ R ⊙ e_a(s0), ∂L/∂h_k = Σ R (k ≠ a), then
    ∂L/∂α_j = Σ_k ∂L/∂h_k p_k (δ_kj - p_j) / τ; e_k(s) = s + σ(c)(f_k(hh) - s), [c; hh] = s W_1 (DARTS cell)."""
    torch.manual_seed(0)
    Ein, H, tau = 4, 6, 0.7
    cell = DartsCell(Ein, H, DARTS_OPS, steps=1, batchnorm=False).double()
    x, h = torch.randn(1, B, Ein, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    R = torch.randn(B, H, dtype=torch.float64)
    acts = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda v: v}
    seen = set()
    for seed in range(12):
        alphas = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
        p, index = reference_draw(alphas, tau, seed)
        a = int(index[0])
        seen.add(a)
        torch.manual_seed(seed)
        out, _ = cell(x, h, gumbel_hard(alphas, tau).hard)
        (got,) = torch.autograd.grad((out[0] * R).sum(), [alphas])
        # by hand
        with torch.no_grad():
            c0, h0 = (torch.cat([x[0], h], 1) @ cell.W0).chunk(2, -1)
            s0 = h + torch.sigmoid(c0) * (torch.tanh(h0) - h)
            c, hh = (s0 @ cell.Ws[0]).chunk(2, -1)
            dh = torch.full((5,), float(R.sum()), dtype=torch.float64)
            op = DARTS_OPS[a]
            dh[a] = 0.0 if op == "none" else float((R * (s0 + torch.sigmoid(c) * (acts[op](hh) - s0))).sum())
            pr = p[0]
            expected = torch.stack([(dh * pr * ((torch.arange(5) == j).double() - pr[j])).sum() / tau
                                    for j in range(5)])
            assert torch.isfinite(got).all() and got.abs().sum() > 0
            assert torch.allclose(got[0], expected, rtol=1e-10, atol=1e-12), (seed, op, got, expected)
    assert len(seen) >= 3  # several sampled ops, 'none' among the draws or not


def _genotype_path_alphas(genotype, ops, steps):
    """α that samples ``genotype``'s path with certainty: per edge, +60 on the genotype's op or on 'none'."""
    alphas = torch.zeros(steps * (steps + 1) // 2, len(ops), dtype=torch.float64)
    alphas[:, ops.index("none")] = 60.0
    for i, node in enumerate(genotype.nodes, start=1):
        for e in node:
            row = i * (i - 1) // 2 + e.input
            alphas[row] = 0.0
            alphas[row, ops.index(e.op)] = 60.0
    return alphas


def test_darts_rnn_sampled_path_is_the_frozen_genotype():
    """On a sampled path each edge computes its sampled op alone; the supernet then computes the frozen cell."""
    torch.manual_seed(0)
    cfg = DartsRNNConfig(emsize=8, nhid=8, steps=4, dropout=0, dropouth=0, dropoutx=0, dropouti=0, batchnorm=False)
    space = SPACES.get("darts_rnn")(cfg)
    genotype = Genotype("darts_rnn", tuple(DARTS_OPS),
                        ((("tanh", 0),), (("relu", 1),), (("identity", 1),), (("sigmoid", 2),)), (1, 2, 3, 4))
    supernet = space.build_supernet(V).double().eval()
    frozen = space.freeze(genotype, V).double().eval()
    frozen.load_state_dict(supernet.state_dict())
    data, hidden = torch.randint(V, (T, B)), torch.randn(B, 8, dtype=torch.float64)
    torch.manual_seed(1)
    sample = gumbel_hard(_genotype_path_alphas(genotype, DARTS_OPS, 4), 1.0)
    assert sampled_index(sample.hard) is not None
    out = supernet(data, hidden, sample.hard)
    ref = frozen(data, hidden)
    assert torch.equal(out.logits, ref.logits)
    # the mixing path (the same one-hot weights without the sampled ops) computes the same cell, all ops included
    mixed = supernet(data, hidden, sample.hard.detach().clone())
    assert torch.allclose(mixed.logits, ref.logits, rtol=0, atol=1e-12)


def _lm_batch(model, g):
    return Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g), model.init_hidden(B))


def _strategy(space, num_classes=None, **kw):
    torch.manual_seed(0)
    model = space.build_supernet(V, num_classes=num_classes) if num_classes else space.build_supernet(V)
    model = model.double().train()
    return model, STRATEGIES.get("gdas")(GdasConfig(alpha_init_std=0.5, **kw), space, model)


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_hybrid_computes_one_op_per_edge_and_alpha_learns(task, monkeypatch):
    space = SPACES.get("hybrid")(HybridConfig(nodes=3, emsize=8, nhid=8, heads=2,
                                              ops=["lstm", "gru", "self_attention", "conv3", "identity", "zero"]))
    model, strat = _strategy(space, None if task == "lm" else 2)
    dag = model.dag if task == "classification" else model.cell
    g = torch.Generator().manual_seed(1)
    if task == "lm":
        batch = _lm_batch(model, g)
    else:
        batch = SentenceInputs(torch.randint(1, V, (5, 3), generator=g), torch.tensor([0, 1, 1]),
                               torch.tensor([5, 3, 2]))
    calls = []
    for e, edge in enumerate(dag.edges):
        for m, module in enumerate(edge):
            module.register_forward_hook(lambda mod, args, out, e=e, k=dag._active[m]: calls.append((e, k)))
    drawn = []
    real = gdas_module.gumbel_hard
    monkeypatch.setattr(gdas_module, "gumbel_hard", lambda a, t: drawn.append(real(a, t)) or drawn[-1])
    before = strat.alphas.detach().clone()
    grad, _ = strat.arch_gradient(batch)
    index = drawn[0].index.tolist()
    assert sorted(calls) == sorted((e, k) for e, k in enumerate(index) if space.ops[k] != "zero")
    assert torch.isfinite(grad).all() and (grad.abs() > 0).any()
    strat.step(None, batch, 0.0)
    assert not torch.equal(strat.alphas.detach(), before)


def test_stacked_rnn_computes_one_op_per_layer_and_alpha_learns(monkeypatch):
    space = SPACES.get("stacked_rnn")(StackedRNNConfig(emsize=8, nhid=8, units=[8], max_layers=3))
    model, strat = _strategy(space)
    calls = []
    for layer_i, layer in enumerate(model.cell.layers):
        for name, module in layer.cells.items():
            module.register_forward_hook(lambda mod, args, out, i=layer_i, n=name: calls.append((i, n)))
    drawn = []
    real = gdas_module.gumbel_hard
    monkeypatch.setattr(gdas_module, "gumbel_hard", lambda a, t: drawn.append(real(a, t)) or drawn[-1])
    grad, _ = strat.arch_gradient(_lm_batch(model, torch.Generator().manual_seed(1)))
    ops = model.cell.layers[0].ops
    expected = [(i, ops[k]) for i, k in enumerate(drawn[0].index.tolist()) if ops[k] != "identity"]
    assert calls == expected
    assert torch.isfinite(grad).all() and (grad.abs() > 0).any()


def test_darts_rnn_alpha_gradient_reaches_every_op_of_a_sampled_edge():
    cfg = DartsRNNConfig(emsize=8, nhid=8, steps=3, dropout=0.1, dropouth=0.1, dropoutx=0.1, dropouti=0.1)
    model, strat = _strategy(SPACES.get("darts_rnn")(cfg))
    grad, hidden = strat.arch_gradient(_lm_batch(model, torch.Generator().manual_seed(1)))
    assert hidden.shape == (B, 8) and not hidden.requires_grad
    # the straight-through gradient of the relaxation reaches every α of every edge
    assert torch.isfinite(grad).all() and (grad != 0).all()


def test_tau_schedule_is_linear_per_epoch_from_tau_max_to_tau_min():
    # τ_max - (τ_max - τ_min)(e - 1)/(E - 1) with τ_max = 10, τ_min = 0.1, E = 5: 10, 7.525, 5.05, 2.575, 0.1
    assert [tau_at(e, 5, 10.0, 0.1) for e in range(1, 6)] == pytest.approx([10, 7.525, 5.05, 2.575, 0.1], abs=1e-12)
    assert tau_at(1, 1, 10.0, 0.1) == 10.0
    with pytest.raises(ValueError):
        tau_at(6, 5, 10.0, 0.1)
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=8, steps=2))
    _, strat = _strategy(space)
    assert strat.tau == 10.0
    strat.start_epoch(50, 50)
    assert strat.tau == pytest.approx(0.1) and strat.state_dict()["tau"] == strat.tau


def test_bad_settings_are_one_line_config_errors():
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=8, steps=2))
    for kw, match in (({"tau_min": 11.0}, "tau_min"), ({"tau_min": 0.0}, "> 0"),
                      ({"eval_path": "softmax"}, "eval_path"), ({"alpha_split": "test"}, "alpha_split")):
        with pytest.raises(ConfigError, match=match):
            _strategy(space, **kw)


def test_the_engine_makes_the_weight_step_before_the_alpha_step():
    order = []

    class Strategy:
        weights_first = True

        def edge_weights(self):
            order.append("sample w")
            return None

        def step(self, train, alpha, lr):
            order.append("alpha")
            return "carry"

    class Task:
        def weight_step(self, model, optimizer, batch, cfg, weights):
            order.append("w")
            return "result"

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    setup = SearchSetup(None, None, None, None, Strategy(), opt, Task())
    cfg = type("Cfg", (), {"lr": 1.0})()
    assert one_shot_step(setup, cfg, Step("train", "alpha", 1.0)) == ("result", "carry")
    assert order == ["sample w", "w", "alpha"]


# -- bit-exact resume ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [7, 5])
def test_gdas_search_interrupted_and_resumed_equals_uninterrupted(tmp_path, corpus, monkeypatch, stop_at):
    """Stopped mid-epoch between checkpoints (7) and at the end of epoch 1 (5): the resumed run ends bit-identical,
    the τ schedule included (epoch 2 runs at τ_min)."""
    from test_resume import SEARCH, assert_identical, compose_cfg, final_state, interrupt_after, resume, untimed
    from nas.engine.resume import Interrupted
    from nas.engine.search import search

    overrides = SEARCH + [f"dataset.root={corpus}", "strategy=gdas"]
    whole = search(compose_cfg("search", overrides), run_dir=str(tmp_path / "whole"))
    interrupt_after(monkeypatch, stop_at)
    with pytest.raises(Interrupted):
        search(compose_cfg("search", overrides), run_dir=str(tmp_path / "cut"))
    assert final_state(tmp_path / "cut")["state"]["step"] == stop_at
    monkeypatch.undo()
    resumed = resume("search", str(tmp_path / "cut"), search)
    assert untimed(resumed) == untimed(whole)
    end = final_state(tmp_path / "whole")
    assert_identical(final_state(tmp_path / "cut"), end)
    assert end["strategy"]["epoch"] == 2 and end["strategy"]["tau"] == pytest.approx(0.1)  # epochs=2: 10, then 0.1
    assert json.load(open(tmp_path / "cut" / "genotype.json")) == json.load(open(tmp_path / "whole" / "genotype.json"))
    assert os.path.isfile(tmp_path / "cut" / "metrics.json") and signal.SIGINT
