"""The DARTS strategy: hypergradients against exact autograd, disjoint parameter sets, determinism."""
import pytest
import torch
from torch.func import functional_call

from nas.spaces import SPACES
from nas.spaces.darts_rnn import DartsRNNConfig
from nas.strategies import STRATEGIES
from nas.losses import lm_nll, nll
from nas.strategies.darts import Batch, DartsConfig

V, T, B = 23, 6, 4
DARTS_OPS = ["none", "tanh", "relu", "sigmoid", "identity"]
# relu has a kink: a central difference that straddles it is off by O(1) whatever ε, so the
# convergence test uses the smooth ops; relu is checked separately at a small ε.
SMOOTH_OPS = ["none", "tanh", "sigmoid", "identity"]


def make(unrolled, fd_epsilon=0.01, dropout=0.0, batchnorm=True, clip=None, weight_decay=5e-7,
         ops=DARTS_OPS, hypergradient="eq7"):
    torch.manual_seed(0)
    d = dropout
    space = SPACES.get("darts_rnn")(DartsRNNConfig(ops=list(ops), emsize=8, nhid=8, steps=3, dropout=d, dropouth=d,
                                                   dropoutx=d, dropouti=d, dropoute=0.0,
                                                   batchnorm=batchnorm))
    model = space.build_supernet(V).double()
    model.train()
    strat = STRATEGIES.get("darts")(DartsConfig(unrolled=unrolled, fd_epsilon=fd_epsilon, alpha_init_std=0.5,
                                                                hypergradient=hypergradient),
                                    space, model, lm_nll,
                                    weight_decay=weight_decay, clip=clip)
    g = torch.Generator().manual_seed(1)
    tr = Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g),
               torch.randn(B, 8, generator=g, dtype=torch.float64))
    va = Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g),
               torch.randn(B, 8, generator=g, dtype=torch.float64))
    return space, model, strat, tr, va


def exact_second_order(model, strat, tr, va, eta, weight_decay):
    """∇α L_val(w - η(∇w L_train(w, α) + λw), α) by autograd through the explicit SGD step."""
    alphas = strat.alphas.detach().clone().requires_grad_(True)
    params = dict(model.named_parameters())
    names, w = list(params), list(params.values())
    out = functional_call(model, params, (tr.data, tr.hidden), {"weights": torch.softmax(alphas, -1)})
    g = torch.autograd.grad(nll(out.logits, tr.targets), w, create_graph=True)
    w1 = {n: p - eta * (gi + weight_decay * p) for n, p, gi in zip(names, w, g)}
    out = functional_call(model, w1, (va.data, va.hidden), {"weights": torch.softmax(alphas, -1)})
    (ga,) = torch.autograd.grad(nll(out.logits, va.targets), [alphas])
    return ga


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_second_order_matches_autograd_through_sgd_step(dropout):
    eta, wd = 0.5, 5e-7
    errs = []
    for eps in (1e-2, 1e-3, 1e-4):
        _, model, strat, tr, va = make(True, eps, dropout=dropout, weight_decay=wd, ops=SMOOTH_OPS)
        w_before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(123)
        approx, _ = strat.arch_gradient(tr, va, eta)
        # w restored bit-exactly (it is never written)
        assert all(torch.equal(a, p) for a, p in zip(w_before, model.parameters()))
        torch.manual_seed(123)  # the same dropout masks for the exact computation
        exact = exact_second_order(model, strat, tr, va, eta, wd)
        errs.append(rel_err(approx, exact))
        # the implicit term matters: the first-order gradient is measurably different
        torch.manual_seed(123)
        model(tr.data, tr.hidden, torch.softmax(strat.alphas, -1))  # consume the same randomness
        first = torch.autograd.grad(nll(model(va.data, va.hidden, torch.softmax(strat.alphas, -1)).logits,
                                        va.targets), [strat.alphas])[0]
        assert rel_err(first, exact) > 10 * errs[-1]
    assert max(errs) < 1e-2, errs
    # no drift with ε: a central difference converges as ε², so each 10x smaller ε is ~100x closer
    for big, small in zip(errs, errs[1:]):
        assert 30 < big / small < 300, errs


def test_second_order_with_relu_at_small_epsilon():
    _, model, strat, tr, va = make(True, 1e-5, dropout=0.3, ops=DARTS_OPS)
    torch.manual_seed(7)
    approx, _ = strat.arch_gradient(tr, va, 0.5)
    torch.manual_seed(7)
    assert rel_err(approx, exact_second_order(model, strat, tr, va, 0.5, 5e-7)) < 1e-2


def test_first_order_gradient_is_dl_val_dalpha():
    _, model, strat, tr, va = make(False)
    grad, hidden = strat.arch_gradient(tr, va, eta=20.0)
    alphas = strat.alphas.detach().clone().requires_grad_(True)
    out = model(va.data, va.hidden, torch.softmax(alphas, -1))
    (expected,) = torch.autograd.grad(nll(out.logits, va.targets), [alphas])
    # the strategy's pass uses the fused decoder + cross-entropy: equal up to float64 rounding
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hidden, out.hidden.detach(), rtol=0, atol=0)


def test_weights_and_alphas_are_disjoint_and_each_optimizer_changes_only_its_own():
    _, model, strat, tr, va = make(False, batchnorm=True)
    weight_params = {id(p) for p in model.parameters()}
    assert id(strat.alphas) not in weight_params
    assert all(id(p) not in weight_params for g in strat.optimizer.param_groups for p in g["params"])
    w_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    assert all(id(p) != id(strat.alphas) for g in w_opt.param_groups for p in g["params"])

    w0 = [p.detach().clone() for p in model.parameters()]
    a0 = strat.alphas.detach().clone()
    strat.step(tr, va, eta=1.0)  # α step: α changes, w does not
    assert not torch.equal(a0, strat.alphas)
    assert all(torch.equal(x, p) for x, p in zip(w0, model.parameters()))

    a1 = strat.alphas.detach().clone()
    g1 = strat.alphas.grad.clone()
    w_opt.zero_grad()
    out = model(tr.data, tr.hidden, strat.edge_weights())
    nll(out.logits, tr.targets).backward()
    w_opt.step()  # weight step: w changes, α does not and receives no gradient
    assert torch.equal(a1, strat.alphas)
    assert torch.equal(strat.alphas.grad, g1)
    assert any(not torch.equal(x, p) for x, p in zip(w0, model.parameters()))


def test_weight_step_leaves_alpha_grad_untouched():
    _, model, strat, tr, va = make(False)
    out = model(tr.data, tr.hidden, strat.edge_weights())
    nll(out.logits, tr.targets).backward()
    assert strat.alphas.grad is None


def test_clip_coefficient_scales_virtual_step():
    """With a tiny clip the virtual step uses the clipped gradient: compare against autograd with c fixed."""
    eta, wd, clip = 0.5, 0.0, 1e-3
    _, model, strat, tr, va = make(True, 1e-3, clip=clip, weight_decay=wd)
    approx, _ = strat.arch_gradient(tr, va, eta)
    params = dict(model.named_parameters())
    out = model(tr.data, tr.hidden, torch.softmax(strat.alphas.detach(), -1))
    g = torch.autograd.grad(nll(out.logits, tr.targets), list(params.values()))
    c = min(1.0, clip / (torch.sqrt(sum(x.pow(2).sum() for x in g)).item() + 1e-6))
    assert c < 1.0
    exact = exact_second_order(model, strat, tr, va, eta * c, wd)
    assert rel_err(approx, exact) < 1e-2
