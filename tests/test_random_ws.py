"""Random search with weight sharing (strategy=random_ws): selection on toy scores whose answer is known, the
engine's scoring split and final-only selection, the single path = discrete cell, and preset composition."""
import math
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import nas.config  # noqa: F401  (stores the config schemas)
import nas.engine.search as engine
import nas.tasks.language_modeling as lm_task
from nas.errors import ConfigError
from nas.genotype import path_weights
from nas.spaces import build_space
from nas.strategies.darts import DartsConfig
from nas.strategies.random_ws import RandomWSConfig, RandomWSStrategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_for(overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("search", overrides=overrides)


def _strategy(**kw):
    cfg = cfg_for(["space.steps=3", "space.emsize=8", "space.nhid=8"])  # 1*4 x 2*4 x 3*4 = 384 genotypes
    space = build_space(cfg.space)
    return RandomWSStrategy(RandomWSConfig(**kw), space, space.build_supernet(20), seed=0), space


def _toy(space, target):
    """A known ranking: quick score = L1 distance of a path to ``target``'s path; the full-split score is its
    negative, so rescoring reverses the quick order.  Records (max_batches, value) of every call."""
    t = path_weights(target, space.ops)
    calls = []

    def score(weights, max_batches):
        d = float((weights - t).abs().sum())
        value = d if max_batches is not None else -d
        calls.append((max_batches, value))
        return value

    return score, calls


def test_best_of_the_rescored_top_k_is_returned_and_quick_scores_use_the_configured_batches():
    strat, space = _strategy(candidates=40, score_batches=3, rescore_top=4)
    score, calls = _toy(space, strat.sample())
    ranked = strat.select(score)
    quick = sorted(v for n, v in calls if n == 3)
    full = [v for n, v in calls if n is None]
    assert len(quick) + len(full) == len(calls) and len(full) == 4 and 30 <= len(quick) <= 40  # repeats scored once
    # the full score reverses the quick one: the winner is the 4th best quick candidate (ties keep their value)
    assert ranked[0][1] == -quick[3] == strat.best_value and strat.export() == ranked[0][0]
    assert [v for _, v in ranked] == sorted(full)
    assert torch.equal(strat.eval_weights(), path_weights(ranked[0][0], space.ops))


def test_without_rescoring_the_best_quick_score_wins_and_null_batches_mean_the_whole_split():
    strat, space = _strategy(candidates=25, score_batches=None, rescore_top=0)
    score, calls = _toy(space, strat.sample())
    ranked = strat.select(score)
    assert calls and all(n is None for n, _ in calls) and len(ranked) == len(calls)  # one score per candidate
    assert ranked[0][1] == min(v for _, v in calls) == strat.best_value  # (negative distances: the farthest)


def test_selection_end_selects_only_on_the_final_call():
    strat, space = _strategy(candidates=5, selection="end")
    score, calls = _toy(space, strat.sample())
    assert strat.select(score, final=False) == [] and calls == [] and strat.best is None
    assert strat.select(score, final=True) and strat.best is not None
    assert [n for n, _ in calls].count(None) == 3 and 3 <= [n for n, _ in calls].count(4) <= 5  # (repeats once)


def test_a_nan_score_ranks_last():
    strat, space = _strategy(candidates=12, rescore_top=0)
    seen = []

    def score(weights, max_batches):  # every other candidate diverges
        seen.append(weights)
        return math.nan if len(seen) % 2 else float(len(seen))

    ranked = strat.select(score)
    assert ranked[0][1] == 2.0 and math.isnan(ranked[-1][1])


@pytest.mark.parametrize("kw,match", [({"selection": "sometimes"}, "strategy.selection"),
                                      ({"rescore_top": -1}, "strategy.rescore_top"),
                                      ({"score_batches": 0}, "strategy.score_batches"),
                                      ({"score_batch_size": 0}, "strategy.score_batch_size"),
                                      ({"candidates": 0}, "strategy.candidates")])
def test_bad_settings_are_one_line_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        _strategy(**kw)


def test_search_scores_at_score_batch_size_and_selects_once_at_the_end(tmp_path, corpus, monkeypatch):
    """The engine: with selection=end nothing is scored before the last epoch; candidates are scored on the
    validation split batchified at strategy.score_batch_size (not eval_batch_size), quick ones on
    score_batches segments, rescored ones on limit_eval_batches; the search returns the selected genotype."""
    calls = []
    real = lm_task.evaluate

    def spy(model, source, bptt, weights=None, max_batches=None, **kw):
        calls.append((source.size(1), max_batches))
        return real(model, source, bptt, weights, max_batches, **kw)

    monkeypatch.setattr(lm_task, "evaluate", spy)
    cfg = cfg_for(["experiment=smoke", f"dataset.root={corpus}", "batch_size=4", "eval_batch_size=4", "bptt=8",
                   "limit_train_batches=3", "limit_eval_batches=3", "progress=false", "space.steps=3",
                   "epochs=2", "strategy=random_ws", "strategy.selection=end", "strategy.candidates=6",
                   "strategy.score_batches=2", "strategy.rescore_top=2", "strategy.score_batch_size=7"])
    metrics = engine.search(cfg, run_dir=str(tmp_path))
    scoring = [c for c in calls if c[0] == 7]
    per_epoch = [c for c in calls if c[0] == 4]
    assert per_epoch == [(4, 3), (4, 3)]  # the epochs' validation at eval_batch_size
    assert calls.index(scoring[0]) > calls.index(per_epoch[0])  # nothing scored after epoch 1
    assert sorted(scoring) == sorted([(7, 2)] * 6 + [(7, 3)] * 2)
    assert metrics["genotype"] == metrics["history"][-1]["genotype"]


def test_one_hot_path_of_the_plain_supernet_is_the_frozen_language_model():
    """What random_ws trains and scores (space.batchnorm=false) is the discrete model of the sampled genotype:
    the same weights give the same logits, in eval mode and (same dropout masks) in train mode."""
    cfg = cfg_for(["space.batchnorm=false", "space.emsize=12", "space.nhid=12", "space.dropoute=0.1"])
    space = build_space(cfg.space)
    sup = space.build_supernet(30).double()
    strat = RandomWSStrategy(RandomWSConfig(), space, sup, seed=3)
    x = torch.randint(30, (7, 3))
    for _ in range(3):
        g = strat.sample()
        frozen = space.freeze(g, 30).double()
        frozen.load_state_dict(sup.state_dict())
        for train in (False, True):
            sup.train(train), frozen.train(train)
            h = sup.init_hidden(3)
            torch.manual_seed(0)
            a = sup(x, h, strat.weights_of(g)).logits
            torch.manual_seed(0)
            b = frozen(x, h).logits
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["darts", "random_ws", "random", "bayesian"])
def test_darts_ptb_composes_with_every_strategy(strategy):
    cfg = cfg_for(["experiment=darts_ptb", f"strategy={strategy}"])
    assert cfg.strategy.name == strategy and (cfg.space.emsize, cfg.batch_size, cfg.lr) == (300, 256, 20.0)
    if strategy == "darts":  # the preset leaves the strategy to its schema, whose defaults are the paper's
        d = DartsConfig()
        assert (cfg.strategy.unrolled, cfg.strategy.arch_lr, list(cfg.strategy.arch_betas),
                cfg.strategy.arch_weight_decay, cfg.strategy.fd_epsilon, cfg.strategy.alpha_split) == \
               (False, 3e-3, [0.9, 0.999], 1e-3, 0.01, "valid") == \
               (d.unrolled, d.arch_lr, d.arch_betas, d.arch_weight_decay, d.fd_epsilon, d.alpha_split)


def test_second_order_preset_with_another_strategy_names_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        cfg_for(["experiment=darts_ptb_2nd", "strategy=random_ws"])
    assert "unrolled" in str(err.value.__cause__ or err.value)


def test_rsws_ptb_preset_holds_their_settings():
    """Values read from liamcli/randomNAS_release (cited line by line in conf/experiment/rsws_ptb.yaml)."""
    cfg = cfg_for(["experiment=rsws_ptb"])
    s, st = cfg.space, cfg.strategy
    assert st.name == "random_ws"
    assert (cfg.epochs, cfg.batch_size, cfg.bptt, cfg.lr, cfg.weight_decay, cfg.clip) == (50, 64, 35, 20.0, 8e-7, 0.1)
    assert (cfg.ar_alpha, cfg.tar_beta, cfg.eval_batch_size) == (0.0, 1e-3, 10)
    assert (s.emsize, s.nhid, s.steps, s.batchnorm, s.init_range) == (850, 850, 8, False, 0.04)
    assert (s.dropout, s.dropouth, s.dropoutx, s.dropouti, s.dropoute) == (0.75, 0.25, 0.75, 0.2, 0.1)
    assert list(s.ops) == ["tanh", "relu", "sigmoid", "identity"]
    assert (st.selection, st.candidates, st.score_batches, st.score_batch_size, st.rescore_top) == \
           ("end", 1000, None, 1024, 0)
