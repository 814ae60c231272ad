"""Exact perplexity and evaluation under NT-ASGD: exact values, invariance to batch layout, no side effects."""
import copy
import math

import pytest
import torch
from torch import nn

from nas.data import batchify, bptt_segments, get_batch
from nas.engine.asgd import averaged_weights, make_asgd, make_sgd, nonmono_trigger, set_lr
from nas.tasks.language_modeling import evaluate, lm_objective
from nas.published import load_published
from nas.spaces.darts_rnn import DartsRNNConfig, DartsRNNSpace
from nas.spaces.lm import LMOutput


class UniformLM(nn.Module):
    """Predicts the uniform distribution over V words (all logits zero): its perplexity is exactly V."""

    def __init__(self, ntoken):
        super().__init__()
        self.ntoken = ntoken
        self.bias = nn.Parameter(torch.zeros(1))

    def init_hidden(self, batch_size):
        return torch.zeros(batch_size, 1)

    def forward(self, tokens, hidden, weights=None):
        T, B = tokens.shape
        logits = torch.zeros(T, B, self.ntoken) * self.bias
        return LMOutput(logits, hidden, torch.zeros(T, B, 1), torch.zeros(T, B, 1))


class BigramLM(nn.Module):
    """Stateless: logits = table[previous token], so every (previous, next) pair has a known NLL."""

    def __init__(self, ntoken, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(scale * torch.randn(ntoken, ntoken, generator=g, dtype=torch.float64))

    def init_hidden(self, batch_size):
        return torch.zeros(batch_size, 1, dtype=torch.float64)

    def forward(self, tokens, hidden, weights=None):
        logits = self.table[tokens]  # [T, B, V]
        z = torch.zeros(*tokens.shape, 1, dtype=torch.float64)
        return LMOutput(logits, hidden, z, z)


def tokens(n, vocab, seed=0):
    return torch.randint(vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("V", [7, 10000])
@pytest.mark.parametrize("B,bptt,extra", [(1, 35, 1), (1, 35, 0), (3, 5, 1), (10, 35, 1), (10, 7, 4), (4, 1, 0)])
def test_uniform_model_scores_exactly_V(V, B, bptt, extra):
    T = 3 * bptt + 1 + extra  # rows; extra = length of the last segment (1: a last segment of length 1)
    source = batchify(tokens(T * B, V), B)
    lengths = [get_batch(source, i, n)[0].size(0) for i, n in bptt_segments(source, bptt)]
    assert lengths[-1] == (extra or bptt)
    res = evaluate(UniformLM(V), source, bptt)
    assert res.tokens == (T - 1) * B  # every target row once, nothing more
    assert abs(res.ppl - V) < 1e-4


def brute_force_nll(model, source):
    logp = torch.log_softmax(model.table.detach(), dim=-1)
    return sum(-logp[source[t, b], source[t + 1, b]].item()
               for b in range(source.size(1)) for t in range(source.size(0) - 1))


@pytest.mark.parametrize("B", [1, 3, 10])
def test_exact_total_nll_independent_of_bptt(B):
    """Not a mean of segment means: the short last segment weighs by its tokens."""
    V = 13
    model = BigramLM(V)
    source = batchify(tokens(200, V, seed=B), B)
    expected = brute_force_nll(model, source)
    ppls = []
    for bptt in (1, 4, 7, 35, 1000):
        res = evaluate(model, source, bptt)
        assert res.tokens == (source.size(0) - 1) * B
        assert res.nll == pytest.approx(expected, rel=1e-12)
        ppls.append(res.ppl)
    assert max(ppls) - min(ppls) < 1e-9 * ppls[0]


def tiny_frozen(H=8, V=17, dropout=0.3, seed=0):
    torch.manual_seed(seed)
    d = dropout
    cfg = DartsRNNConfig(emsize=H, nhid=H, dropout=d, dropouth=d, dropoutx=d, dropouti=d, dropoute=0.1)
    return DartsRNNSpace(cfg).freeze(load_published("darts_v2"), V)


def test_recurrent_model_ppl_independent_of_bptt():
    """The hidden state is carried across segments, so cutting the sequence differently changes nothing."""
    model = tiny_frozen().double()
    source = batchify(tokens(301, 17), 3)
    ppls = [evaluate(model, source, bptt).ppl for bptt in (1, 5, 35, 99)]
    assert max(ppls) - min(ppls) < 1e-9 * ppls[0]


def test_overflowing_loss_gives_inf_not_an_exception():
    V = 5
    model = BigramLM(V, scale=1e6)  # NLL ~ 1e6 nats per token: exp overflows
    res = evaluate(model, batchify(tokens(60, V), 2), 7)
    assert math.isfinite(res.nll) and res.ppl == math.inf


def train_steps(model, optimizer, source, n, bptt=5):
    model.train()
    hidden = model.init_hidden(source.size(1))
    for i, _ in list(bptt_segments(source, bptt))[:n]:
        x, y = get_batch(source, i, bptt)
        optimizer.zero_grad()
        out = model(x, hidden)
        lm_objective(out, y, 0.0, 1e-3).backward()
        optimizer.step()
        hidden = out.hidden.detach()


def snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    opt = copy.deepcopy(optimizer.state_dict())
    return params, opt, model.training, torch.get_rng_state()


def assert_same_state(a, b):
    (pa, oa, ta, ra), (pb, ob, tb, rb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert ta == tb and torch.equal(ra, rb)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, v in oa["state"][k].items():
            w = ob["state"][k][name]
            assert torch.equal(v, w) if torch.is_tensor(v) else v == w


def evaluate_lm(model, source, bptt, optimizer):
    """Validation as the retraining loop runs it: with ASGD's averaged weights when the optimizer averages."""
    with averaged_weights(model, optimizer):
        return evaluate(model, source, bptt)


@pytest.mark.parametrize("averaging", [False, True])
def test_evaluate_mid_training_changes_nothing(averaging):
    model = tiny_frozen()
    source = batchify(tokens(400, 17), 4)
    valid = batchify(tokens(120, 17, seed=1), 2)
    optimizer = make_sgd(model.parameters(), 1.0, 1e-4)
    train_steps(model, optimizer, source, 3)
    if averaging:
        optimizer = make_asgd(model.parameters(), 1.0, 1e-4)
        train_steps(model, optimizer, source, 4)
    model.train()
    before = snapshot(model, optimizer)
    first = evaluate_lm(model, valid, 5, optimizer)
    assert_same_state(before, snapshot(model, optimizer))
    second = evaluate_lm(model, valid, 5, optimizer)
    assert_same_state(before, snapshot(model, optimizer))
    assert (first.nll, first.tokens) == (second.nll, second.tokens)
    # and training continues from exactly the same point as without the evaluation
    raw = evaluate(model, valid, 5)
    if averaging:  # the averaged weights were really used: same figure as a model holding ``ax``
        avg = copy.deepcopy(model)
        with torch.no_grad():
            for p, q in zip(avg.parameters(), model.parameters()):
                p.copy_(optimizer.state[q]["ax"])
        assert evaluate(avg, valid, 5).nll == first.nll
        assert raw.nll != first.nll
    else:
        assert raw.nll == first.nll


def test_averaged_weights_restored_on_error():
    model = tiny_frozen()
    optimizer = make_asgd(model.parameters(), 1.0, 0.0)
    train_steps(model, optimizer, batchify(tokens(400, 17), 4), 3)
    raw = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with averaged_weights(model, optimizer) as on:
            assert on
            assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))
            raise RuntimeError("boom")
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), raw))


def test_asgd_average_and_per_step_lr():
    """ASGD(t0=0, lambd=0) takes SGD steps of the lr set *for this step* and averages the iterates."""
    w = nn.Parameter(torch.zeros(3))
    opt = make_asgd([w], lr=1.0, weight_decay=0.0)
    grad = torch.tensor([1.0, 2.0, 3.0])
    iterates = []
    for lr in (1.0, 0.5, 2.0, 0.25):
        set_lr(opt, lr)
        before = w.detach().clone()
        w.grad = grad.clone()
        opt.step()
        assert torch.allclose(w.detach(), before - lr * grad)  # not the previous step's lr
        iterates.append(w.detach().clone())
    # torch's ASGD with t0=0 copies the first two iterates, then keeps a running mean from the second on
    assert torch.allclose(opt.state[w]["ax"], torch.stack(iterates[1:]).mean(0))


def test_nonmono_trigger():
    # worse than the best of all but the last 5 (AWD-LSTM / DARTS)
    assert not nonmono_trigger([5.0, 4.0, 3.0, 3.0, 3.0], 9.0, 5)  # needs more than nonmono evaluations
    assert not nonmono_trigger([5.0, 4.0, 3.0, 3.0, 3.0, 3.0], 4.9, 5)  # better than min([5.0])
    assert nonmono_trigger([5.0, 4.0, 3.0, 3.0, 3.0, 3.0], 5.1, 5)
    assert not nonmono_trigger([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0], 3.5, 5)  # min([5, 4]) = 4
    assert nonmono_trigger([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0], 4.5, 5)
    assert nonmono_trigger([5.0, 4.0], 4.5, 0) and not nonmono_trigger([5.0, 4.0], 3.9, 0)
    with pytest.raises(ValueError):
        nonmono_trigger([1.0], 1.0, -1)
