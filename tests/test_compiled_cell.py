"""The torch.compile'd cell time step (config ``compile=true``) computes what the plain implementation does.

Outputs and gradients of the compiled supernet and frozen cell against ``reference_cell`` (a per-edge,
per-op loop), and the first- and second-order hypergradients of a compiled supernet against the eager one,
all to 1e-5.  Each test checks that Dynamo really compiled frames, so a silent fallback to eager fails.
Slow: every new shape/grad-mode variant is compiled by Inductor (tens of seconds on 2 cores).
"""
import pytest
import torch
from torch._dynamo.utils import counters

from nas.genotype import Edge, Genotype
from nas.ops import DARTS_RNN_OPS
from nas.spaces.darts_rnn import DartsCell
from test_darts_rnn_space import _compare
from test_darts_strategy import make

pytestmark = pytest.mark.slow

E, H, T, B = 6, 6, 5, 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Forget compiled frames so each test compiles (and counts) its own; Inductor's disk cache stays."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_frames() -> int:
    return counters["frames"]["ok"]


def _check_against_reference(cell, weights, dtype):
    before = _compiled_frames()
    with torch.no_grad():
        cell.train()(torch.randn(T, B, E, dtype=dtype), torch.randn(B, H, dtype=dtype), weights)
    assert _compiled_frames() > before, "the time step was not compiled"
    _compare(cell, weights, True, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_supernet_matches_plain_implementation(dtype):
    torch.manual_seed(0)
    cell = DartsCell(E, H, DARTS_RNN_OPS, 4, None, dropouth=0.3, dropoutx=0.3, batchnorm=True).to(dtype)
    cell.compile_step()
    weights = torch.softmax(torch.randn(10, 5, dtype=dtype), -1).requires_grad_(True)
    _check_against_reference(cell, weights, dtype)


def test_compiled_frozen_cell_matches_plain_implementation():
    g = Genotype("darts_rnn", DARTS_RNN_OPS, [[Edge("tanh", 0)], [Edge("relu", 1)], [Edge("identity", 1)],
                                             [Edge("sigmoid", 2)]], range(1, 5))
    torch.manual_seed(0)
    cell = DartsCell(E, H, DARTS_RNN_OPS, 4, g, dropouth=0.3, dropoutx=0.3)
    cell.compile_step()
    _check_against_reference(cell, None, torch.float32)


@pytest.mark.parametrize("unrolled", [False, True])
def test_compiled_hypergradient_equals_eager(unrolled):
    """The α gradient (first order; second order with its four passes) does not change when compiled."""
    grads = []
    for compiled in (False, True):
        _, model, strat, tr, va = make(unrolled, dropout=0.3)
        if compiled:
            model.cell.compile_step()
        before = _compiled_frames()
        torch.manual_seed(11)
        grad, hidden = strat.arch_gradient(tr, va, eta=0.5)
        if compiled:
            assert _compiled_frames() > before, "the time step was not compiled"
        grads.append((grad, hidden))
    (g_eager, h_eager), (g_comp, h_comp) = grads
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_comp, h_eager, rtol=1e-5, atol=1e-5)


def test_each_new_case_of_the_compiled_step_is_announced_once_with_its_time(caplog):
    """issue 21 item 4: the log says when compiling starts, for which case, and how long the case took."""
    torch.manual_seed(0)
    cell = DartsCell(E, H, DARTS_RNN_OPS, 4, None)
    cell.compile_step()
    weights = torch.softmax(torch.randn(10, 5), -1)
    x, h = torch.randn(T, B, E), torch.randn(B, H)
    with caplog.at_level("INFO", logger="nas.spaces.darts_rnn"):
        for _ in range(2):
            cell.train()(x, h, weights)  # the same case twice: one announcement
        with torch.no_grad():
            cell.eval()(x, h, weights)  # a new case
            cell.train()(torch.randn(T, B + 1, E), torch.randn(B + 1, H), weights)  # another (batch size)
    starts = [r.getMessage() for r in caplog.records if "compiling the cell's time step" in r.getMessage()]
    ends = [r.getMessage() for r in caplog.records if "ran its first forward pass in" in r.getMessage()]
    assert [m.split("(")[1].split(")")[0] for m in starts] == [
        f"batch {B}, training, with gradients", f"batch {B}, evaluation, no gradients",
        f"batch {B + 1}, training, no gradients"]
    assert [m.split(" case ")[1].split()[0] for m in starts + ends] == ["1", "2", "3", "1", "2", "3"]
    # only a case with gradients has a backward still to compile
    assert ["its backward compiles" in m for m in ends] == [True, False, False]
    cell = DartsCell(E, H, DARTS_RNN_OPS, 4, None)  # eager (compile=false): nothing announced
    caplog.clear()
    with caplog.at_level("INFO", logger="nas.spaces.darts_rnn"):
        cell.train()(x, h, weights)
    assert not caplog.records
