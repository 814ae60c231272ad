"""The hybrid space: every op (shape, gradients, causality, padding), the DAG, genotypes, and DARTS over it."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from nas.errors import ConfigError
from nas.genotype import Genotype, GenotypeError
from nas.losses import nll
from nas.sequence_ops import HYBRID_OPS, SEQUENCE_OPS, build_sequence_op, padding_mask
from nas.spaces import SPACES
from nas.spaces.hybrid import HybridConfig
from nas.strategies import STRATEGIES
from nas.strategies.darts import Batch, DartsConfig, SentenceInputs

D, T, B, V = 8, 7, 3, 19
ALL_OPS = SEQUENCE_OPS.names()


def test_every_default_op_is_registered_and_the_list_is_complete():
    assert set(HYBRID_OPS) - {"zero"} == set(ALL_OPS)
    assert {"lstm", "gru", "rnn_tanh", "self_attention", "conv3", "conv5", "identity"} <= set(ALL_OPS)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ALL_OPS)
def test_op_preserves_shape_and_has_finite_gradients(name, causal):
    torch.manual_seed(0)
    op = build_sequence_op(name, D, causal, heads=2).double()
    x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
    lengths = None if causal else torch.tensor([T, 4, 1])
    y = op(x, lengths)
    assert y.shape == (T, B, D)
    (y * torch.randn_like(y)).sum().backward()
    grads = [x.grad] + [p.grad for p in op.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad.abs().sum() > 0
    # every parameter takes part (a parameter with an all-zero gradient would be dead weight)
    assert all(p.grad.abs().sum() > 0 for p in op.parameters())


@pytest.mark.parametrize("name", ALL_OPS)
def test_causal_op_output_at_t_ignores_inputs_after_t(name):
    torch.manual_seed(0)
    op = build_sequence_op(name, D, True, heads=2).double().eval()
    x = torch.randn(T, B, D, dtype=torch.float64)
    y = op(x)
    for t in range(T - 1):
        x2 = x.clone()
        x2[t + 1:] = torch.randn(T - t - 1, B, D, dtype=torch.float64) * 5
        y2 = op(x2)
        torch.testing.assert_close(y2[:t + 1], y[:t + 1], rtol=0, atol=1e-12)
        if name != "identity" and t + 1 < T:  # and the future does reach later outputs (the test can fail)
            assert not torch.allclose(y2[t + 1:], y[t + 1:])


@pytest.mark.parametrize("name", [n for n in ALL_OPS if n not in ("identity",)])
def test_bidirectional_op_looks_both_ways(name):
    torch.manual_seed(0)
    op = build_sequence_op(name, D, False, heads=2).double().eval()
    x = torch.randn(T, B, D, dtype=torch.float64)
    x2 = x.clone()
    x2[1] += 3.0
    assert not torch.allclose(op(x2)[0], op(x)[0])  # the first output sees the next input


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "self_attention"])
def test_bidirectional_op_ignores_padding_content(name):
    """Recurrent layers run packed and attention masks padded keys: what sits in the padding is never read
    (convolutions read it as their zero padding: the DAG keeps padded positions at zero)."""
    torch.manual_seed(0)
    op = build_sequence_op(name, D, False, heads=2).double().eval()
    lengths = torch.tensor([T, 4, 2])
    x = torch.randn(T, B, D, dtype=torch.float64)
    x2 = x + 7.0 * (~padding_mask(lengths, T)).unsqueeze(-1)
    valid = padding_mask(lengths, T)
    torch.testing.assert_close(op(x2, lengths)[valid], op(x, lengths)[valid], rtol=0, atol=1e-10)


def space(**kw):
    cfg = dict(emsize=D, nhid=D, heads=2, dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0)
    cfg.update(kw)
    return SPACES.get("hybrid")(HybridConfig(**cfg))


def random_alphas(sp, seed=0):
    return torch.randn(*sp.alpha_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_supernet_language_model_is_causal():
    torch.manual_seed(0)
    sp = space(nodes=4)
    model = sp.build_supernet(V).double().eval()
    w = torch.softmax(random_alphas(sp), -1)
    tokens = torch.randint(V, (T, B))
    h = model.init_hidden(B)
    logits = model(tokens, h, w).logits
    for t in range(T - 1):
        t2 = tokens.clone()
        t2[t + 1:] = (t2[t + 1:] + 1 + torch.randint(V - 1, t2[t + 1:].shape)) % V
        out = model(t2, h, w).logits
        torch.testing.assert_close(out[:t + 1], logits[:t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(out[t + 1:], logits[t + 1:])


def padded(sentences):
    lengths = torch.tensor([len(s) for s in sentences])
    tokens = torch.zeros(int(lengths.max()), len(sentences), dtype=torch.long)
    for b, s in enumerate(sentences):
        tokens[:len(s), b] = torch.tensor(s)
    return tokens, lengths


def test_classifier_does_not_depend_on_padding_or_batch_mates():
    torch.manual_seed(0)
    sp = space(nodes=4, output="mean")
    model = sp.build_supernet(V, num_classes=3).double().eval()
    w = torch.softmax(random_alphas(sp), -1)
    g = torch.Generator().manual_seed(3)
    sents = [torch.randint(1, V, (n,), generator=g).tolist() for n in (6, 2, 4)]
    tokens, lengths = padded(sents)
    logits = model(tokens, lengths, w).logits
    assert logits.shape == (3, 3)
    # alone, without any padding
    for b, s in enumerate(sents):
        t1, l1 = padded([s])
        torch.testing.assert_close(model(t1, l1, w).logits[0], logits[b], rtol=0, atol=1e-10)
    # with extra padding rows
    more = torch.cat([tokens, torch.zeros(5, 3, dtype=torch.long)])
    torch.testing.assert_close(model(more, lengths, w).logits, logits, rtol=0, atol=1e-10)


def copy_ops_into_frozen(sp, supernet, frozen, genotype):
    """Give the frozen model the supernet's parameters: the kept (edge, op) modules, norms, embedding, head."""
    sd = {k: v for k, v in supernet.state_dict().items() if not k.startswith(("cell.edges", "dag.edges"))}
    prefix = "cell" if hasattr(supernet, "cell") else "dag"
    sup_dag, fro_dag = getattr(supernet, prefix), getattr(frozen, prefix)
    active = [o for o in sp.ops if o != "zero"]
    offset = 0
    for i, node in enumerate(genotype.nodes, start=1):
        for m, e in zip(fro_dag.edges[i - 1], node):
            m.load_state_dict(sup_dag.edges[offset + e.input][active.index(e.op)].state_dict())
        offset += i
    missing, unexpected = frozen.load_state_dict(sd, strict=False)
    assert not unexpected and all(".edges." in k for k in missing)


def one_hot_weights(sp, genotype):
    """Edge weights under which the supernet computes exactly the genotype: the kept op of each kept edge, and
    the zero op on every other edge."""
    w = torch.zeros(*sp.alpha_shape, dtype=torch.float64)
    w[:, sp.ops.index("zero")] = 1.0
    offset = 0
    for i, node in enumerate(genotype.nodes, start=1):
        for e in node:
            w[offset + e.input] = 0.0
            w[offset + e.input, sp.ops.index(e.op)] = 1.0
        offset += i
    return w


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_frozen_model_equals_supernet_on_its_one_hot_path(task):
    torch.manual_seed(0)
    sp = space(nodes=4, k=2)
    classes = None if task == "lm" else 2
    supernet = sp.build_supernet(V, num_classes=classes).double().eval()
    genotype = sp.derive(random_alphas(sp, 1))
    frozen = sp.freeze(genotype, V, num_classes=classes).double().eval()
    copy_ops_into_frozen(sp, supernet, frozen, genotype)
    w = one_hot_weights(sp, genotype)
    if task == "lm":
        tokens, h = torch.randint(V, (T, B)), frozen.init_hidden(B)
        a, b = supernet(tokens, h, w).logits, frozen(tokens, h).logits
    else:
        tokens, lengths = padded([[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]])
        a, b = supernet(tokens, lengths, w).logits, frozen(tokens, lengths).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # and the frozen model holds only the kept ops: far fewer parameters
    assert sum(p.numel() for p in frozen.parameters()) < sum(p.numel() for p in supernet.parameters())


def test_derive_keeps_top_k_edges_by_best_non_zero_weight_and_records_space_ops_k():
    sp = space(nodes=4, k=2)
    ops = list(sp.ops)
    a = torch.zeros(*sp.alpha_shape)
    z = ops.index("zero")
    # node 1: one input. node 2 (rows 1, 2): both kept. node 3 (rows 3, 4, 5): a huge zero weight on row 3 must
    # not make it win; row 5 is strongest (conv3), row 4 second (gru); row 3 has only "zero" strong -> dropped
    a[0, ops.index("lstm")] = 2.0
    a[1, ops.index("self_attention")] = 1.0
    a[2, ops.index("identity")] = 1.5
    a[3, z] = 9.0
    a[4, ops.index("gru")] = 1.0
    a[5, ops.index("conv3")] = 3.0
    g = sp.derive(a)
    assert g.space == "hybrid" and list(g.ops) == ops and g.k == 2 and g.concat == (3,)
    assert [[(e.op, e.input) for e in n] for n in g.nodes] == [
        [("lstm", 0)], [("self_attention", 0), ("identity", 1)], [("gru", 1), ("conv3", 2)]]
    assert all(e.op != "zero" for n in g.nodes for e in n)
    assert Genotype.from_json(g.to_json()) == g and '"k": 2' in g.to_json()
    assert space(nodes=4, k=1).derive(a).nodes[2] == g.nodes[2][1:]  # k=1: the single best edge
    assert space(nodes=4, output="mean").derive(a).concat == (1, 2, 3)


def test_bad_space_settings_and_genotypes_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown hybrid op"):
        space(ops=["lstm", "transformer"])
    with pytest.raises(ConfigError, match="no non-zero op"):
        space(ops=["zero"])
    with pytest.raises(ConfigError, match="nodes must be >= 2"):
        space(nodes=1)
    with pytest.raises(ConfigError, match="output"):
        space(output="max")
    with pytest.raises(ConfigError, match="divisible by heads"):
        space(heads=3).build_supernet(V)
    with pytest.raises(ConfigError, match="even width"):
        space(emsize=7, nhid=7, heads=1).build_supernet(V, num_classes=2)
    with pytest.raises(ConfigError, match="emsize"):
        space(emsize=8, nhid=16).build_supernet(V)  # the LM's decoder is tied to the embedding
    sp = space()
    darts = Genotype("darts_rnn", ("none", "tanh"), (((("tanh", 0),),)), (1,))
    with pytest.raises(GenotypeError, match="space 'darts_rnn'"):
        sp.freeze(darts, V)
    bad_op = Genotype("hybrid", ("lstm", "mamba"), ((("mamba", 0),),), (1,))
    with pytest.raises(GenotypeError, match="mamba"):
        sp.freeze(bad_op, V)
    with pytest.raises(GenotypeError, match="more than k=1"):
        Genotype("hybrid", ("lstm", "gru"), ((("lstm", 0),), (("lstm", 0), ("gru", 1))), (2,), k=1)


def make_strategy(task, unrolled, fd_epsilon=1e-2):
    torch.manual_seed(0)
    # ops with smooth derivatives (relu in the convolutions has kinks a central difference can straddle)
    sp = space(nodes=3, ops=["lstm", "gru", "self_attention", "identity", "zero"])
    classes = None if task == "lm" else 2
    model = sp.build_supernet(V, num_classes=classes).double().train()
    strat = STRATEGIES.get("darts")(DartsConfig(unrolled=unrolled, fd_epsilon=fd_epsilon, alpha_init_std=0.5,
                                                hypergradient="eq7"),
                                    sp, model, lambda out, targets: out.loss, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    if task == "lm":
        def batch():
            return Batch(torch.randint(V, (T, B), generator=g), torch.randint(V, (T, B), generator=g),
                         model.init_hidden(B))
    else:
        def batch():
            tokens, lengths = padded([torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 3, 2)])
            return SentenceInputs(tokens, torch.randint(2, (3,), generator=g), lengths)
    return model, strat, batch(), batch()


def exact_second_order(model, strat, tr, va, eta, wd):
    """∇α L_val(w - η(∇w L_train(w, α) + λw), α) by double backward through the explicit SGD step."""
    alphas = strat.alphas.detach().clone().requires_grad_(True)
    params = dict(model.named_parameters())
    names, w = list(params), list(params.values())
    kw = {"weights": torch.softmax(alphas, -1)}

    def loss(p, batch):  # from the logits: the fused LM loss computes its gradients in forward, no double backward
        out = functional_call(model, p, batch.inputs(), kw)
        return nll(out.logits, batch.targets) if isinstance(batch, Batch) else F.cross_entropy(out.logits,
                                                                                              batch.targets)

    g = torch.autograd.grad(loss(params, tr), w, create_graph=True)
    w1 = {n: p - eta * (gi + wd * p) for n, p, gi in zip(names, w, g)}
    return torch.autograd.grad(loss(w1, va), [alphas])[0]


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_hybrid_second_order_hypergradient_matches_autograd(task):
    eta, errs = 0.5, []
    with sdpa_kernel(SDPBackend.MATH):  # the math kernel has a double backward (for the exact reference)
        for eps in (1e-2, 1e-3):
            model, strat, tr, va = make_strategy(task, True, eps)
            approx, hidden = strat.arch_gradient(tr, va, eta)
            exact = exact_second_order(model, strat, tr, va, eta, 1e-4)
            errs.append(((approx - exact).norm() / exact.norm()).item())
            first, _ = make_strategy(task, False)[1].arch_gradient(tr, va, eta)
            assert ((first - exact).norm() / exact.norm()).item() > 10 * errs[-1]  # the implicit term matters
            assert (hidden is None) == (task == "classification")
    assert errs[-1] < 1e-4 and errs[0] / errs[1] > 30, errs  # central difference: error ~ ε²


@pytest.mark.parametrize("task", ["lm", "classification"])
def test_hybrid_first_order_hypergradient_is_dl_val_dalpha(task):
    model, strat, tr, va = make_strategy(task, False)
    grad, _ = strat.arch_gradient(tr, va, 0.5)
    alphas = strat.alphas.detach().clone().requires_grad_(True)
    loss = model(*va.inputs(), torch.softmax(alphas, -1), va.targets).loss
    torch.testing.assert_close(grad, torch.autograd.grad(loss, [alphas])[0], rtol=1e-10, atol=0)
