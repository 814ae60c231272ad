"""The stacked_rnn space: parameter counts from the layer formulas, hidden state carried across BPTT segments,
padding, the supernet's one-hot path against the frozen model, genotype round trip, decisions, and the one-shot
strategies' refusal of units."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

import nas.config  # noqa: F401  (stores the config schemas)
from nas.errors import ConfigError
from nas.genotype import Edge, Genotype, GenotypeError
from nas.spaces import SPACES
from nas.spaces.stacked_rnn import CELLS, StackedRNNConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, E = 37, 12  # vocabulary, embedding size
OPS = CELLS + ("identity",)


def space(**kw):
    return SPACES.get("stacked_rnn")(StackedRNNConfig(**{"emsize": E, "nhid": E, **kw}))


def chain(*layers):
    """A genotype from (op, units, dropout, bidirectional) per layer (identity: (op, dropout))."""
    params = [{"dropout": l[1]} if l[0] == "identity" else {"units": l[1], "dropout": l[2], "bidirectional": l[3]}
              for l in layers]
    return Genotype("stacked_rnn", OPS, tuple((Edge(l[0], i),) for i, l in enumerate(layers)), (len(layers),),
                    params=params)


# -- parameter counts, written out from torch's layer formulas --------------------------------------------------
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def rnn_params(cell, ninp, units, bidirectional):
    """torch's nn.RNN/GRU/LSTM, one layer: per direction W_ih [g*u, in], W_hh [g*u, u], b_ih and b_hh [g*u]."""
    g = GATES[cell]
    return (2 if bidirectional else 1) * (g * units * ninp + g * units * units + 2 * g * units)


def expected_count(layers, num_classes=None):
    n, width = V * E, E  # the embedding (a language model's decoder weight is tied to it)
    for layer in layers:
        if layer[0] == "identity":
            continue
        op, units, _, bi = layer
        n += rnn_params(op, width, units, bi)
        width = units * (2 if bi else 1)
    if num_classes is None:
        n += V  # decoder bias
        if width != E:
            n += width * E + E  # projection to the tied decoder's size
    else:
        n += width * num_classes + num_classes
    return n


LM_GENOTYPES = [
    [("lstm", 20, 0.25, False)],  # projection 20 -> 12
    [("rnn_tanh", 12, 0.0, False), ("gru", 7, 0.5, False), ("rnn_relu", 12, 0.0, False)],  # no projection
    [("gru", 9, 0.0, False), ("identity", 0.25), ("lstm", 5, 0.0, False)],
    [("identity", 0.0)],  # embedding straight into the decoder
]
CLS_GENOTYPES = [
    [("gru", 8, 0.0, True), ("lstm", 6, 0.25, False)],
    [("rnn_relu", 10, 0.0, True)],
    [("identity", 0.0), ("lstm", 4, 0.0, True), ("identity", 0.5)],
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters once


@pytest.mark.parametrize("layers", LM_GENOTYPES)
def test_language_model_parameter_count_follows_the_layer_formulas(layers):
    assert n_params(space().freeze(chain(*layers), V)) == expected_count(layers)


@pytest.mark.parametrize("layers", CLS_GENOTYPES)
def test_classifier_parameter_count_follows_the_layer_formulas(layers):
    assert n_params(space().freeze(chain(*layers), V, num_classes=3)) == expected_count(layers, 3)


# -- hidden state across segments --------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_hidden_state_carried_across_segments_equals_one_long_pass(cell):
    torch.manual_seed(0)
    layers = [(cell, 6, 0.5, False), ("identity", 0.5), (cell, 5, 0.5, False)]
    model = space().freeze(chain(*layers), V).eval()
    B, T = 3, 13
    tokens = torch.randint(V, (T, B))
    h0 = model.init_hidden(B)
    # the state packs every layer's (LSTM: h and c)
    assert h0.shape == (B, (2 if cell == "lstm" else 1) * (6 + 5))
    with torch.no_grad():
        whole = model(tokens, h0)
        first = model(tokens[:5], h0)
        second = model(tokens[5:], first.hidden)
    torch.testing.assert_close(torch.cat([first.logits, second.logits]), whole.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.hidden, whole.hidden, rtol=1e-5, atol=1e-6)
    # and the carried state matters: a fresh state for the second segment changes its output
    with torch.no_grad():
        fresh = model(tokens[5:], model.init_hidden(B))
    assert not torch.allclose(fresh.logits, second.logits, atol=1e-4)


def test_supernet_hidden_state_carried_across_segments_equals_one_long_pass():
    torch.manual_seed(1)
    sp = space(units=[E])
    model = sp.build_supernet(V).eval()
    weights = torch.softmax(torch.randn(sp.alpha_shape), -1)
    tokens = torch.randint(V, (11, 2))
    h0 = model.init_hidden(2)
    assert h0.shape == (2, 4 * E * (1 + 1 + 2 + 1))  # every candidate's state, per layer
    with torch.no_grad():
        whole = model(tokens, h0, weights)
        first = model(tokens[:4], h0, weights)
        second = model(tokens[4:], first.hidden, weights)
    torch.testing.assert_close(torch.cat([first.logits, second.logits]), whole.logits, rtol=1e-5, atol=1e-6)


def test_fused_loss_equals_the_cross_entropy_of_the_logits():
    torch.manual_seed(2)
    model = space().freeze(chain(("gru", 9, 0.0, False)), V).eval()
    tokens, targets = torch.randint(V, (6, 2)), torch.randint(V, (6, 2))
    with torch.no_grad():
        out = model(tokens, model.init_hidden(2))
        fused = model(tokens, model.init_hidden(2), targets=targets)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(fused.loss, ce, rtol=1e-5, atol=1e-6)


# -- padding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", CLS_GENOTYPES)
def test_classifier_output_does_not_depend_on_padding_or_batch(layers):
    torch.manual_seed(3)
    model = space().freeze(chain(*layers), V, num_classes=2).eval()
    a, b = torch.randint(1, V, (3,)), torch.randint(1, V, (7,))
    batch = torch.zeros(7, 2, dtype=torch.long)
    batch[:3, 0], batch[:, 1] = a, b
    with torch.no_grad():
        both = model(batch, torch.tensor([3, 7])).logits
        alone_a = model(a.unsqueeze(1), torch.tensor([3])).logits
        alone_b = model(b.unsqueeze(1), torch.tensor([7])).logits
        # padding tokens that are not 0 must not matter either
        batch[3:, 0] = torch.randint(1, V, (4,))
        junk = model(batch, torch.tensor([3, 7])).logits
    torch.testing.assert_close(both, torch.cat([alone_a, alone_b]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(junk, both, rtol=1e-5, atol=1e-6)


# -- the supernet's one-hot path is the frozen model -----------------------------------------------------------------
def one_hot(ops):
    alphas = torch.zeros(len(ops), len(OPS))
    for i, op in enumerate(ops):
        alphas[i, OPS.index(op)] = 1.0
    return alphas


@pytest.mark.parametrize("ops", [("lstm", "identity", "gru", "rnn_tanh"), ("identity", "rnn_relu", "lstm", "lstm")])
def test_one_hot_path_through_the_supernet_equals_the_frozen_model(ops):
    torch.manual_seed(4)
    sp = space(units=[E], dropouts=[0.25, 0.0])
    supernet = sp.build_supernet(V).eval()
    genotype = sp.derive(one_hot(ops) * 3.0)
    assert [n[0].op for n in genotype.nodes] == list(ops)
    assert genotype.node_params(2) == ({"dropout": 0.25} if ops[1] == "identity" else
                                       {"units": E, "dropout": 0.25, "bidirectional": False})
    frozen = sp.freeze(genotype, V).eval()
    missing, _ = frozen.load_state_dict(supernet.state_dict(), strict=False)
    assert missing == []  # every frozen weight is the supernet's weight of that path
    weights = sp.path_weights(genotype)
    torch.testing.assert_close(weights, one_hot(ops))
    tokens = torch.randint(V, (9, 2))
    with torch.no_grad():
        hs, hf = supernet.init_hidden(2), frozen.init_hidden(2)
        for segment in (tokens[:4], tokens[4:]):  # the carried states too
            s, f = supernet(segment, hs, weights), frozen(segment, hf)
            torch.testing.assert_close(s.logits, f.logits, rtol=1e-5, atol=1e-6)
            hs, hf = s.hidden, f.hidden
        lengths = torch.tensor([9, 5])
        cls_super = sp.build_supernet(V, num_classes=2).eval()
        cls_frozen = sp.freeze(genotype, V, num_classes=2).eval()
        assert cls_frozen.load_state_dict(cls_super.state_dict(), strict=False)[0] == []
        torch.testing.assert_close(cls_super(tokens, lengths, weights).logits, cls_frozen(tokens, lengths).logits,
                                   rtol=1e-5, atol=1e-6)


def test_a_supernet_layer_mixes_its_candidates_by_their_weights():
    # one layer, emsize == nhid (no projection): the tied decoder is linear, so with weights summing to 1 the
    # supernet's logits are the weighted sum of the logits of each candidate's frozen model (identity included)
    torch.manual_seed(6)
    sp = space(units=[E], max_layers=1)
    supernet = sp.build_supernet(V).eval()
    weights = torch.softmax(torch.randn(sp.alpha_shape), -1)
    tokens = torch.randint(V, (7, 2))
    expected = 0
    with torch.no_grad():
        for k, op in enumerate(OPS):
            frozen = sp.freeze(sp.derive(one_hot([op])), V).eval()
            frozen.load_state_dict(supernet.state_dict(), strict=False)
            expected = expected + weights[0, k] * frozen(tokens, frozen.init_hidden(2)).logits
        got = supernet(tokens, supernet.init_hidden(2), weights).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- genotypes -----------------------------------------------------------------------------------------------------
def test_genotype_round_trip_keeps_the_params(tmp_path):
    sp = space(bidirectional=[False, True])
    choice = {name: choices[-1] for name, choices in sp.decisions()}
    choice.update(depth=3, cell_2="lstm", units_2=64, dropout_3=0.0)
    g = sp.from_decisions(choice).with_origin("classification", "sst2")
    assert [n[0].op for n in g.nodes] == ["gru", "lstm", "gru"] and g.concat == (3,)
    assert g.node_params(2) == {"units": 64, "dropout": 0.5, "bidirectional": True}
    path = str(tmp_path / "genotype.json")
    g.save(path)
    back = Genotype.load(path)
    assert back == g and back.key() == g.key() and hash(back) == hash(g)
    assert back.params == g.params and back.dataset == "sst2"
    # the params are part of the architecture
    other = chain(("gru", 256, 0.5, True), ("lstm", 128, 0.5, True), ("gru", 256, 0.0, True))
    assert other != g and other.key() != g.key()
    sp.freeze(back, V, num_classes=2)


def test_derived_genotype_round_trips_and_freezes():
    sp = space(units=[E])
    g = sp.derive(torch.randn(sp.alpha_shape))
    assert Genotype.from_json(g.to_json()) == g
    sp.freeze(Genotype.from_json(g.to_json()), V)


@pytest.mark.parametrize("bad, match", [
    (dict(params=[{"units": 8, "dropout": 0.0, "bidirectional": False}] * 2), "2 entries for 1 nodes"),
    (dict(params=None), "needs params"),
    (dict(params=[{"units": 8, "dropout": 0.0}]), "needs params"),
    (dict(params=[{"units": 0, "dropout": 0.0, "bidirectional": False}]), "units must be a positive integer"),
    (dict(params=[{"units": 8, "dropout": 1.5, "bidirectional": False}]), "dropout must be in"),
    (dict(params=[{"units": 8, "dropout": 0.0, "bidirectional": True}]), "cannot read the future"),
    (dict(concat=(0,)), "concat must be"),
    (dict(space="hybrid"), "not 'stacked_rnn'"),
])
def test_invalid_genotypes_are_refused_with_a_genotype_error(bad, match):
    fields = dict(space="stacked_rnn", ops=OPS, nodes=((Edge("gru", 0),),), concat=(1,),
                  params=[{"units": 8, "dropout": 0.0, "bidirectional": False}])
    with pytest.raises(GenotypeError, match=match):
        space().freeze(Genotype(**{**fields, **bad}), V)


def test_a_layer_reading_anything_but_the_previous_one_is_refused():
    g = Genotype("stacked_rnn", OPS, ((Edge("gru", 0),), (Edge("lstm", 0),)), (2,),
                 params=[{"units": 8, "dropout": 0.0, "bidirectional": False}] * 2)
    with pytest.raises(GenotypeError, match="must read layer 1"):
        space().freeze(g, V)


# -- decisions -----------------------------------------------------------------------------------------------------
def test_decisions_and_genotype_count():
    sp = space(max_layers=3, cells=["gru", "lstm"], units=[8, 16], dropouts=[0.0], bidirectional=[False, True])
    names = [n for n, _ in sp.decisions()]
    assert names[:5] == ["depth", "cell_1", "units_1", "dropout_1", "bidirectional_1"] and len(names) == 1 + 3 * 4
    assert "bidirectional_1" not in [n for n, _ in space().decisions()]  # one choice (the LM default): no decision
    # every combination, cut at its depth: the distinct genotypes are Σ_d (2 cells x 2 units x 1 x 2)^d
    import itertools

    decisions = sp.decisions()
    keys = {sp.from_decisions(dict(zip([n for n, _ in decisions], c))).key()
            for c in itertools.product(*(c for _, c in decisions))}
    assert len(keys) == 8 + 8 ** 2 + 8 ** 3 == sp.genotype_count()
    with pytest.raises(GenotypeError, match="is not one of"):
        sp.from_decisions({**{n: c[0] for n, c in decisions}, "units_1": 12})


def test_random_search_ends_when_the_space_is_exhausted():
    from nas.strategies.blackbox import RandomConfig, RandomStrategy

    sp = space(max_layers=2, cells=["gru"], units=[8], dropouts=[0.0, 0.5])
    strategy = RandomStrategy(RandomConfig(trials=10), sp, seed=0)
    assert strategy.size == 6  # (with the combinations, 8, ask() would never end)
    proposals = [strategy.ask() for _ in range(7)]
    assert all(p is not None for p in proposals[:6]) and proposals[6] is None  # 2 + 2^2 genotypes
    assert len({p.genotype.key() for p in proposals[:6]}) == 6


# -- conditional decisions: define-by-run ---------------------------------------------------------------------------
LAYER_DECISIONS = ("cell", "units", "dropout", "bidirectional")


def active_names(depth, bidirectional=True):
    """Written out by hand: depth, and the decisions of layers 1..depth only."""
    kinds = LAYER_DECISIONS if bidirectional else LAYER_DECISIONS[:3]
    return {"depth"} | {f"{k}_{i}" for i in range(1, depth + 1) for k in kinds}


def test_enumerated_draws_are_the_genotypes_each_once():
    from nas.genotype import enumerate_decisions

    sp = space(max_layers=3, cells=["gru", "lstm"], units=[8, 16], dropouts=[0.0], bidirectional=[False, True])
    draws = list(enumerate_decisions(sp))
    assert all(set(c) == active_names(c["depth"]) for c in draws)
    assert len(draws) == len({sp.from_decisions(c).key() for c in draws}) == 8 + 8 ** 2 + 8 ** 3


def test_every_bayesian_trial_holds_exactly_the_active_decisions(tmp_path):
    from nas.strategies.blackbox import BayesianConfig, BayesianStrategy

    sp = space(max_layers=3, cells=["gru", "lstm"], units=[8, 16], dropouts=[0.0], bidirectional=[False, True])
    strategy = BayesianStrategy(BayesianConfig(trials=30, n_startup_trials=5), sp, seed=0, run_dir=str(tmp_path))
    depths = set()
    for _ in range(30):
        p = strategy.ask()
        params = p.handle.params
        assert set(params) == active_names(params["depth"])  # no cell_3 when depth is 2
        assert p.genotype.steps == params["depth"] and sp.from_decisions(params) == p.genotype
        depths.add(params["depth"])
        strategy.tell(p.handle, float(p.genotype.steps))
    assert depths == {1, 2, 3}
    for t in strategy.study.trials:
        assert set(t.params) == active_names(t.params["depth"])


def test_bayesian_trials_of_one_genotype_share_params_and_are_not_trained_twice(tmp_path):
    from nas.strategies.blackbox import BayesianConfig, BayesianStrategy

    sp = space(max_layers=2, cells=["gru", "lstm"], units=[8], dropouts=[0.0])  # 2 + 2^2 = 6 genotypes
    strategy = BayesianStrategy(BayesianConfig(trials=20, n_startup_trials=3), sp, seed=1, run_dir=str(tmp_path))
    first, params_of = {}, {}
    for _ in range(20):  # 20 trials of 6 genotypes: repeats are certain
        p = strategy.ask()
        key = p.genotype.key()
        value = {"gru": 1.0, "lstm": 2.0}[p.genotype.nodes[0][0].op] + p.genotype.steps
        if key in first:
            assert p.handle.params == params_of[key] and p.known == first[key]
        else:
            assert p.known is None
            first[key], params_of[key] = value, dict(p.handle.params)
        strategy.tell(p.handle, value if p.known is None else p.known)
    assert len(first) <= 6 and sum(1 for _ in strategy.study.trials) == 20


def test_random_search_of_a_shared_study_draws_active_decisions_and_ends_at_the_genotype_count(tmp_path):
    from nas.strategies.blackbox import RandomConfig, RandomStrategy

    sp = space(max_layers=2, cells=["gru", "lstm"], units=[8], dropouts=[0.0, 0.5])  # 4 + 4^2 = 20 genotypes
    cfg = RandomConfig(trials=50, storage=f"sqlite:///{tmp_path}/study.db")
    strategy = RandomStrategy(cfg, sp, seed=0, run_dir=str(tmp_path / "w"))
    keys = []
    for _ in range(20):
        p = strategy.ask()
        assert set(p.handle.params) == active_names(p.handle.params["depth"], bidirectional=False)
        keys.append(p.genotype.key())
        strategy.tell(p.handle, 1.0)
    assert len(set(keys)) == 20 and strategy.ask() is None


def test_random_ws_draws_supernet_paths_with_the_supernets_params():
    from nas.strategies.random_ws import RandomWSConfig, RandomWSStrategy

    torch.manual_seed(5)
    sp = space(units=[E])
    model = sp.build_supernet(V)
    strategy = RandomWSStrategy(RandomWSConfig(), sp, model, seed=0)
    for _ in range(5):
        g = strategy.sample()
        sp.check_genotype(g)
        assert all(g.node_params(i) == {"units": E, "dropout": 0.0, "bidirectional": False}
                   for i in range(1, g.steps + 1))
        w = strategy.weights_of(g)
        assert w.shape == sp.alpha_shape and (w.sum(1) == 1).all()
        assert (w[g.steps:, OPS.index("identity")] == 1).all()


# -- one-shot strategies and units -----------------------------------------------------------------------------------
def test_one_shot_search_of_units_is_refused_in_one_line():
    """A one-shot strategy gets the one width nhid as its units choice by default (conf/space_strategy/), so
    ``search.py space=stacked_rnn strategy=darts`` runs; units asked for on the command line are refused in one line;
    the black-box strategies keep the space's three choices."""
    from nas.engine.search import build_search

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        for strategy in ("darts", "random_ws"):
            cfg = compose("search", overrides=["space=stacked_rnn", f"strategy={strategy}", "space.nhid=32",
                                               "space.emsize=32"])
            assert list(cfg.space.units) == [32]
            SPACES.get("stacked_rnn")(cfg.space).check_one_shot()
        for strategy in ("random", "bayesian"):
            cfg = compose("search", overrides=["space=stacked_rnn", f"strategy={strategy}"])
            assert list(cfg.space.units) == [64, 128, 256]
        cfg = compose("search", overrides=["space=stacked_rnn", "strategy=darts", "experiment=smoke",
                                           "space.units=[64,128,256]"])
    with pytest.raises(ConfigError) as err:
        build_search(cfg, data=object())  # refused before the data is touched
    message = str(err.value)
    assert "\n" not in message and "space.units=[16]" in message and "strategy=random" in message
    for kw in ({"units": [8, 16], "nhid": 8, "emsize": 8}, {"units": [16], "nhid": 8, "emsize": 8}):
        with pytest.raises(ConfigError, match="one-shot strategies"):
            SPACES.get("stacked_rnn")(StackedRNNConfig(**kw)).build_supernet(V)
    with pytest.raises(ConfigError, match="emsize == space.nhid"):
        SPACES.get("stacked_rnn")(StackedRNNConfig(units=[8], nhid=8, emsize=16)).build_supernet(V)
