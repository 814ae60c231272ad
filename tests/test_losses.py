"""The fused decoder + cross-entropy equals F.cross_entropy(F.linear(...)) in value and gradients."""
import pytest
import torch
import torch.nn.functional as F

from nas.losses import linear_cross_entropy, lm_nll
from nas.spaces import SPACES
from nas.spaces.darts_rnn import DartsRNNConfig

N, D, V = 50, 7, 13


def _inputs(dtype, bias=True, requires=(True, True, True)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(requires[0])
    w = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_(requires[1])
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_(requires[2]) if bias else None
    y = torch.randint(V, (N,), generator=g)
    return h, w, b, y


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("block_rows", [1, 16, 50, 1024])
@pytest.mark.parametrize("bias", [True, False])
def test_value_and_gradients_match_unfused(dtype, tol, block_rows, bias):
    h, w, b, y = _inputs(dtype, bias)
    inputs = [t for t in (h, w, b) if t is not None]
    fused = linear_cross_entropy(h, w, b, y, block_rows)
    plain = F.cross_entropy(F.linear(h, w, b), y)
    torch.testing.assert_close(fused, plain, rtol=tol, atol=tol)
    g_fused = torch.autograd.grad(2.5 * fused, inputs)  # a non-unit upstream gradient is applied
    g_plain = torch.autograd.grad(2.5 * plain, inputs)
    for a, c in zip(g_fused, g_plain):
        torch.testing.assert_close(a, c, rtol=tol, atol=tol)


def test_only_the_inputs_that_require_grad_get_one():
    h, w, b, y = _inputs(torch.float64, requires=(True, False, False))
    loss = linear_cross_entropy(h, w, b, y)
    (gh,) = torch.autograd.grad(loss, [h])
    torch.testing.assert_close(gh, torch.autograd.grad(F.cross_entropy(F.linear(h, w, b), y), [h])[0])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, b, y), F.cross_entropy(F.linear(h, w, b), y))


def test_underflowing_target_probability_gives_the_exact_nll_not_inf():
    """A target 200 nats below the best logit: float32 softmax gives p = 0; the NLL must still be ~200."""
    h = torch.zeros(2, 1)
    w = torch.zeros(V, 1)
    b = torch.zeros(V)
    b[0] = 200.0
    y = torch.tensor([1, 0])
    loss = linear_cross_entropy(h, w, b, y)
    expected = F.cross_entropy(F.linear(h, w, b).double(), y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


def test_shape_errors_are_clear():
    h, w, b, y = _inputs(torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w[:, :3], b, y)
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h, w, b, y[:-1])
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(h[:0], w, b, y[:0])


def test_model_forward_with_targets_equals_the_logits_path():
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=8, steps=3))
    torch.manual_seed(0)
    model = space.build_supernet(30).double().eval()
    tokens, targets = torch.randint(30, (5, 4)), torch.randint(30, (5, 4))
    weights = torch.softmax(torch.randn(space.alpha_shape, dtype=torch.float64), -1)
    hidden = model.init_hidden(4)
    fused = model(tokens, hidden, weights, targets)
    plain = model(tokens, hidden, weights)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, lm_nll(plain, targets), rtol=1e-12, atol=1e-12)
    g_fused = torch.autograd.grad(fused.loss, list(model.parameters()))
    g_plain = torch.autograd.grad(lm_nll(plain, targets), list(model.parameters()))
    for a, c in zip(g_fused, g_plain):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
