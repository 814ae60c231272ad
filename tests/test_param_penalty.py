"""The one-shot strategies' differentiable parameter-count penalty (strategy.param_penalty, nas.mixed.ParamPenalty):
each space's per-op counts against the frozen models' sizes, the gradient against its closed form, and the DARTS and
GDAS α steps adding it."""
import pytest
import torch

from nas.errors import ConfigError
from nas.mixed import ParamPenalty
from nas.spaces import SPACES
from nas.spaces.hybrid import HybridConfig
from nas.spaces.stacked_rnn import StackedRNNConfig
from nas.spaces.darts_rnn import DartsRNNConfig
from nas.strategies import STRATEGIES
from nas.strategies.darts import DartsConfig
from nas.strategies.gdas import GdasConfig

V = 23


def size(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_stacked_rnn_counts_are_what_a_layers_cell_adds_to_the_frozen_model():
    space = SPACES.get("stacked_rnn")(StackedRNNConfig(emsize=16, nhid=16, units=[16], max_layers=2))
    counts = space.op_params(space.build_supernet(V))
    ops = list(space.ops)

    def frozen(cell1):
        return size(space.freeze(space.from_decisions({"depth": 2, "cell_1": cell1, "units_1": 16, "dropout_1": 0.0,
                                                       "cell_2": "lstm", "units_2": 16, "dropout_2": 0.0}), V))

    cells = [o for o in ops if o != "identity"]
    for a in cells:
        for b in cells:
            # swapping layer 1's cell from a to b changes the frozen model's size by counts[0, b] - counts[0, a]
            assert frozen(b) - frozen(a) == counts[0, ops.index(b)] - counts[0, ops.index(a)]
    assert (counts[:, ops.index("identity")] == 0).all()
    assert counts[0, ops.index("lstm")] == 4 * (16 * 16 + 16 * 16 + 2 * 16)  # torch's LSTM: 4 gates, two biases


def test_hybrid_counts_are_what_an_edges_op_adds_to_the_frozen_model():
    ops = ["lstm", "self_attention", "conv3", "identity", "zero"]
    space = SPACES.get("hybrid")(HybridConfig(nodes=2, emsize=8, nhid=8, heads=2, ops=ops))
    counts = space.op_params(space.build_supernet(V))
    assert (counts[:, ops.index("zero")] == 0).all() and (counts[:, ops.index("identity")] == 0).all()
    rest = {size(space.freeze(space.from_decisions({"node1_op0": op}), V)) - counts[0, k].item()
            for k, op in enumerate(ops) if op != "zero"}
    assert len(rest) == 1  # every frozen model is the same rest plus its edge's op
    assert counts[0, ops.index("lstm")] > counts[0, ops.index("conv3")] > 0


def test_penalty_gradient_is_its_closed_form():
    torch.manual_seed(0)
    counts = torch.randint(0, 10_000, (6, 5)).double()
    alphas = torch.randn(6, 5, dtype=torch.float64)
    p = torch.softmax(alphas, -1)
    expected = 2.5 / 1e6 * p * (counts - (p * counts).sum(-1, keepdim=True))
    penalty = ParamPenalty(2.5, counts)
    assert torch.allclose(penalty.gradient(alphas), expected, rtol=1e-12, atol=0)
    assert penalty.expected(alphas).item() == pytest.approx((p * counts).sum().item(), rel=1e-12)


@pytest.mark.parametrize("strategy", ["darts", "gdas"])
def test_the_alpha_step_adds_the_penalty_gradient(strategy, monkeypatch):
    space = SPACES.get("stacked_rnn")(StackedRNNConfig(emsize=8, nhid=8, units=[8], max_layers=3))
    model = space.build_supernet(V).double()
    cfg = (DartsConfig if strategy == "darts" else GdasConfig)(param_penalty=3.0, alpha_init_std=0.5)
    strat = STRATEGIES.get(strategy)(cfg, space, model, None)
    data = torch.randn(strat.alphas.shape, dtype=torch.float64)
    monkeypatch.setattr(strat, "arch_gradient", lambda *a: (data.clone(), None))
    alphas = strat.alphas.detach().clone()
    strat.step(None, None, 0.0)
    p = torch.softmax(alphas, -1)
    counts = space.op_params(model)
    expected = data + 3.0 / 1e6 * p * (counts - (p * counts).sum(-1, keepdim=True))
    assert torch.allclose(strat.alphas.grad, expected, rtol=1e-12, atol=1e-15)


def test_darts_rnn_counts_and_bad_penalties():
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=8, steps=3))
    model = space.build_supernet(V)
    counts = space.op_params(model)
    # a derived cell keeps one edge per node: node i's i edges share its matrix (2 * 8 * 8), none counts 0
    assert counts[:, space.ops.index("none")].sum() == 0
    assert counts[:, space.ops.index("tanh")].tolist() == [128.0, 64.0, 64.0] + [128 / 3] * 3
    with pytest.raises(ConfigError, match="param_penalty must be finite and >= 0"):
        STRATEGIES.get("darts")(DartsConfig(param_penalty=-1.0), space, model, None)
