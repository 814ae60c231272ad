"""The search runs what the DARTS reference code (quark0/darts, rnn/) ran: each expected value is computed here from
that code's semantics (../shared/cases/f01-reference-deviations.md), without the strategy's or the engine's code.

* the second-order α gradient in ``reference`` mode (rnn/architect.py): plain NLL in the virtual step and the ±ε
  passes, the virtual step's gradient clipped with the *uncapped* coefficient scaling the implicit term, v clipped,
  the virtual model built with ``load_state_dict`` (so its tied embedding/decoder matrix stays at w), its BatchNorm
  statistics a copy;
* the random state after a second-order α step: the weight step draws new masks;
* the segment-length samplers of the search (rnn/train_search.py) and the retraining (rnn/train.py), 10k draws
  against their exact distributions;
* the tied embedding/decoder initialization U(-0.04, 0.04) (rnn/model.py INITRANGE).
"""
import copy
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.data import sample_seq_len
from nas.tasks.language_modeling import lm_objective
from nas.spaces.darts_rnn import DartsRNNConfig, DartsRNNSpace
from nas.strategies.darts import Batch, DartsConfig, DartsStrategy

V, T, B, H = 29, 7, 5, 8
TAR = 2.0  # a large TAR in the training objective: the reference's passes must not use it


def _setup(clip, hypergradient="reference", dropout=0.3, seed=0, fd_masks="replay"):
    torch.manual_seed(seed)
    space = DartsRNNSpace(DartsRNNConfig(emsize=H, nhid=H, steps=3, dropout=dropout, dropouth=dropout,
                                         dropoutx=dropout, dropouti=dropout, dropoute=0.0))
    model = space.build_supernet(V).double().train()
    strat = DartsStrategy(DartsConfig(unrolled=True, hypergradient=hypergradient, alpha_init_std=0.5,
                                      fd_masks=fd_masks), space, model,
                          partial(lm_objective, tar_beta=TAR), weight_decay=1e-3, clip=clip)
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g),
                     torch.randn(B, H, generator=g, dtype=torch.float64)) for _ in range(2)]
    return model, strat, batches


def _nll(model, batch, probs):
    logits = model(batch.data, batch.hidden, probs).logits
    return F.cross_entropy(logits.reshape(-1, V), batch.targets.reshape(-1))


def _norm(xs):
    return math.sqrt(sum(float(x.pow(2).sum()) for x in xs))


def reference_hypergradient(model, alphas, train, valid, eta, clip, wdecay, r=1e-2, replay=True):
    """rnn/architect.py ``_backward_step_unrolled``, step by step, on ``model`` (its weights are perturbed in place
    and put back, as there).  ``replay``: the ±ε passes reuse the training pass's masks (nas's default) instead of
    drawing new ones (the reference).  Returns (dα, facts) where facts records which branches were taken."""
    rng_train = torch.get_rng_state()
    named = dict(model.named_parameters())  # one entry for the tied matrix, as model.parameters() there
    params = list(named.values())
    loss = _nll(model, train, torch.softmax(alphas, -1))  # model._loss: the plain NLL
    grads = torch.autograd.grad(loss, params)
    clip_coef = clip / (_norm(grads) + 1e-6)  # _clip's return value, never capped
    if clip_coef < 1:
        grads = [g * clip_coef for g in grads]
    state = model.state_dict()  # holds decoder.weight too: a reference to w
    state.update({n: (p - eta * (g + wdecay * p)).detach() for (n, p), g in zip(named.items(), grads)})
    unrolled = copy.deepcopy(model)
    unrolled.load_state_dict(state)  # decoder.weight (= w) is loaded after encoder.weight (= w'), into one tensor
    stale_tied = torch.equal(unrolled.encoder.weight, model.encoder.weight)
    a = alphas.detach().clone().requires_grad_(True)
    out = torch.autograd.grad(_nll(unrolled, valid, torch.softmax(a, -1)), [a] + list(unrolled.parameters()))
    rng_after_valid = torch.get_rng_state()
    dalpha, vector = out[0], list(out[1:])
    v_coef = clip / (_norm(vector) + 1e-6)
    if v_coef < 1:  # _clip(dtheta, clip)
        vector = [v * v_coef for v in vector]
    R = r / _norm(vector)
    alpha_grads = []
    for step in (R, -2 * R):  # w + Rv, then w - Rv
        with torch.no_grad():
            for p, v in zip(params, vector):
                p.add_(v, alpha=step)
        if replay:
            torch.set_rng_state(rng_train)  # the same masks as the training pass (nas's documented improvement)
        b = alphas.detach().clone().requires_grad_(True)
        alpha_grads.append(torch.autograd.grad(_nll(model, train, torch.softmax(b, -1)), [b])[0])
    with torch.no_grad():
        for p, v in zip(params, vector):
            p.add_(v, alpha=R)
    if replay:
        torch.set_rng_state(rng_after_valid)
    implicit = (alpha_grads[0] - alpha_grads[1]) / (2 * R)
    facts = {"clip_coef": clip_coef, "v_clipped": v_coef < 1,
             "stale_tied": stale_tied}
    return dalpha - eta * clip_coef * implicit, facts


@pytest.mark.parametrize("clip,fd_masks", [(1e-3, "replay"), (50.0, "replay"), (1e-3, "fresh")],
                         ids=["clipped: c < 1, v clipped", "unclipped: c > 1 uncapped", "fresh masks, as the reference"])
def test_reference_hypergradient_equals_the_reference_code(clip, fd_masks):
    eta = 0.7
    model, strat, (train, valid) = _setup(clip, fd_masks=fd_masks)
    twin, _, _ = _setup(clip)  # the same initial weights, for the reference computation
    alphas = strat.alphas.detach().clone()
    w0 = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(11)
    got, _ = strat.arch_gradient(train, valid, eta)
    rng_got = torch.get_rng_state()
    torch.manual_seed(11)
    expected, facts = reference_hypergradient(twin, alphas, train, valid, eta, clip, 1e-3, replay=fd_masks == "replay")
    # the case exercises what it names
    assert (facts["clip_coef"] < 1 and facts["v_clipped"]) if clip < 1 else (facts["clip_coef"] > 1 and
                                                                              not facts["v_clipped"]), facts
    assert facts["stale_tied"]
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-6, rel
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # w untouched
    # BatchNorm statistics: updated by the training and the ±ε passes, not by the virtual model's pass
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, dict(twin.named_buffers())[name], rtol=1e-12, atol=1e-14)
    assert torch.equal(rng_got, torch.get_rng_state())  # the generator ends where the reference's ends
    # and the mode matters here: eq7 gives another gradient
    _, eq7, _ = _setup(clip, "eq7", fd_masks=fd_masks)
    torch.manual_seed(11)
    other, _ = eq7.arch_gradient(train, valid, eta)
    assert ((other - expected).norm() / expected.norm()).item() > 1e-3


def test_weight_step_after_a_second_order_step_draws_new_masks():
    """f01 item 3: after the ±ε passes replay the training pass's random state, the generator is put back where the
    virtual model's validation pass left it, so the weight step's masks are neither the validation pass's nor the
    training pass's."""
    model, strat, (train, valid) = _setup(0.25)
    twin, _, _ = _setup(0.25)
    torch.manual_seed(5)
    strat.arch_gradient(train, valid, 0.5)
    after_step = torch.get_rng_state()
    torch.manual_seed(5)
    probs = torch.softmax(strat.alphas.detach(), -1)
    twin(train.data, train.hidden, probs)  # the training pass's draws
    after_train = torch.get_rng_state()
    twin(valid.data, valid.hidden, probs)  # the validation pass's draws
    assert torch.equal(after_step, torch.get_rng_state())
    assert not torch.equal(after_step, after_train)  # where the old code left it: the validation masks again


def _exact_awd_lstm(bptt, cap, sigma=5.0):
    """P(seq_len = k) of rnn/train.py's sampler: base = bptt (p 0.95) or bptt/2, L = min(max(5, int(N(base, σ))), cap)."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    probs = {}
    for base, w in ((bptt, 0.95), (bptt / 2, 0.05)):
        cdf = lambda x: phi((x - base) / sigma)
        for k in range(5, cap + 1):
            lo = -math.inf if k == 5 else k  # int() truncates; every draw below 6 gives 5 (negative ones too)
            hi = math.inf if k == cap else k + 1
            probs[k] = probs.get(k, 0.0) + w * ((1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo)))
    return probs


@pytest.mark.parametrize("sampler", ["darts_search", "awd_lstm"])
def test_segment_length_samplers_over_10k_draws(sampler):
    n, bptt, cap = 10_000, 35, 55
    rng = np.random.default_rng(123)
    draws = np.array([sample_seq_len(bptt, rng, cap, sampler) for _ in range(n)])
    exact = {35: 0.95, 17: 0.05} if sampler == "darts_search" else _exact_awd_lstm(bptt, cap)
    assert set(np.unique(draws)) <= set(exact)
    for k, p in exact.items():
        freq = float(np.mean(draws == k))
        assert abs(freq - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-4, (k, freq, p)


def test_search_and_retraining_use_their_own_samplers():
    from nas.config import SearchConfig, TrainConfig

    assert SearchConfig.seq_len_sampler == "darts_search" and TrainConfig.seq_len_sampler == "awd_lstm"
    with pytest.raises(ValueError, match="unknown segment-length sampler"):
        sample_seq_len(35, np.random.default_rng(0), sampler="gaussian")


def test_tied_embedding_is_initialized_like_the_reference():
    torch.manual_seed(0)
    model = DartsRNNSpace(DartsRNNConfig(emsize=64, nhid=64)).build_supernet(10_000)
    w = model.encoder.weight.detach()
    assert model.decoder.weight is model.encoder.weight
    assert float(model.decoder.bias.detach().abs().max()) == 0.0
    assert float(w.abs().max()) <= 0.04 and float(w.abs().max()) > 0.0399  # U(-0.04, 0.04), the whole range
    assert abs(float(w.std()) - 0.04 / math.sqrt(3)) < 2e-4
