"""Retraining (train.py): published genotypes, arch= lookup and its errors, presets, the loop end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import nas.config  # noqa: F401  (stores the schemas)
from nas.data import batchify, load_corpus
from nas.engine import train as train_mod
from nas.engine.common import CheckpointError
from nas.tasks.language_modeling import evaluate
from nas.engine.train import load_trained, train
from nas.errors import ConfigError
from nas.genotype import Genotype, GenotypeError
from nas.layers import LockedDropout
from nas.published import load_published, published_names, resolve_arch
from nas.spaces.darts_rnn import DartsRNNConfig, DartsRNNSpace

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PUBLISHED = ["darts_v1", "darts_v2", "enas"]


# ------------------------------------------------------------------ published genotypes


def test_published_names_are_the_three_cells():
    assert published_names() == PUBLISHED


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_genotype_loads_builds_and_trains_a_step(name):
    g = load_published(name.upper())  # names are case-insensitive
    assert g == load_published(name) and g.space == "darts_rnn"
    torch.manual_seed(0)
    model = DartsRNNSpace(DartsRNNConfig(emsize=12, nhid=12)).freeze(g, 31)
    assert len(model.cell.Ws) == g.steps
    x = torch.randint(31, (6, 3))
    out = model(x, model.init_hidden(3))
    assert out.logits.shape == (6, 3, 31) and torch.isfinite(out.logits).all()
    nn_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 31), x.reshape(-1))
    nn_loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_darts_cell_parameter_count_matches_reference():
    """DARTS README: the PTB model (850/850, 10k vocabulary) has 22.960M parameters."""
    model = DartsRNNSpace(DartsRNNConfig(emsize=850, nhid=850)).freeze(load_published("darts_v2"), 10000)
    assert sum(p.numel() for p in model.parameters()) == 22_960_000


def test_enas_cell_structure():
    g = load_published("enas")
    assert g.steps == 11 and g.concat == (2, 5, 6, 9, 10, 11)


# ------------------------------------------------------------------ arch= lookup


def test_resolve_arch_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(GenotypeError, match="darts_v1, darts_v2, enas") as err:
        resolve_arch("darts_v3", base_dir=str(tmp_path))
    assert "did you mean arch=darts_v" in str(err.value)  # v1 and v2 are as close; either is a fair guess
    with pytest.raises(GenotypeError, match="did you mean arch=enas"):
        resolve_arch("ENSA", base_dir=str(tmp_path))
    with pytest.raises(GenotypeError) as err:  # a path is not guessed at, and nothing close is not either
        resolve_arch(os.path.join("runs", "darts_v2"), base_dir=str(tmp_path))
    assert "did you mean" not in str(err.value) and "': no such file or directory (" in str(err.value)
    with pytest.raises(GenotypeError) as err:  # a file name is a file, not "neither a published genotype nor..."
        resolve_arch("my_cell.json", base_dir=str(tmp_path))
    assert "did you mean" not in str(err.value) and "arch='my_cell.json': no such file or directory" in str(err.value)
    with pytest.raises(GenotypeError, match="nothing_close_at_all' is neither a published genotype"):
        resolve_arch("nothing_close_at_all", base_dir=str(tmp_path))


def test_resolve_arch_file_relative_to_launch_dir_and_run_dir(tmp_path):
    g = DartsRNNSpace(DartsRNNConfig()).derive(torch.randn(36, 5))  # what search.py writes
    (tmp_path / "run").mkdir()
    g.save(str(tmp_path / "run" / "genotype.json"))
    assert resolve_arch("run/genotype.json", base_dir=str(tmp_path))[0] == g
    assert resolve_arch("run", base_dir=str(tmp_path))[0] == g  # a search run directory
    with pytest.raises(GenotypeError, match="without genotype.json"):
        resolve_arch(".", base_dir=str(tmp_path))


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"space": "darts_rnn", "ops": ["tanh"], "nodes": [[{"op": "relu", "input": 0}]], "concat": [1]}',
     "unknown op 'relu'"),
    ('{"space": "darts_rnn", "ops": ["tanh"], "nodes": [[{"op": "tanh", "input": 3}]], "concat": [1]}',
     "not an earlier node"),
    ('{"space": "darts_rnn", "ops": ["tanh"], "nodes": []}', "missing field"),
])
def test_resolve_arch_corrupt_file_says_what_is_wrong(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(GenotypeError, match=message) as err:
        resolve_arch("bad.json", base_dir=str(tmp_path))
    assert "bad.json" in str(err.value)


def test_genotype_of_another_space_or_shape_is_rejected():
    space = DartsRNNSpace(DartsRNNConfig(emsize=8, nhid=8))
    other = Genotype(space="hybrid", ops=("tanh",), nodes=((("tanh", 0),),), concat=(1,))
    with pytest.raises(GenotypeError, match="space 'hybrid'"):
        space.check_genotype(other)
    two_edges = Genotype(space="darts_rnn", ops=("tanh", "relu"), nodes=((("tanh", 0),), (("relu", 0), ("tanh", 1))),
                         concat=(1, 2))
    with pytest.raises(GenotypeError, match="exactly one edge"):
        space.freeze(two_edges, 10)


# ------------------------------------------------------------------ locked dropout


def test_locked_dropout_mask_constant_in_time_varies_across_rows():
    torch.manual_seed(0)
    drop = LockedDropout().train()
    x = torch.ones(7, 16, 32)
    y = drop(x, 0.5)
    assert torch.equal(y, y[:1].expand_as(y))  # same mask at every time step
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # inverted dropout: kept units scaled by 1/(1-p)
    rows = y[0]
    assert len({tuple(r.tolist()) for r in rows}) > 1  # differs across batch rows
    drop.eval()
    assert torch.equal(drop(x, 0.5), x)  # eval mode: identity
    assert torch.equal(LockedDropout().train()(x, 0.0), x)


# ------------------------------------------------------------------ presets


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_paper_presets_have_the_darts_values():
    cfg = compose_train("experiment=darts_ptb_retrain", "arch=darts_v2")
    assert (cfg.lr, cfg.weight_decay, cfg.clip, cfg.batch_size, cfg.bptt) == (20.0, 8e-7, 0.25, 64, 35)
    assert (cfg.eval_batch_size, cfg.test_batch_size, cfg.optimizer, cfg.nonmono) == (10, 1, "ntasgd", 5)
    s = cfg.space
    assert (s.emsize, s.nhid, s.dropout, s.dropouth, s.dropoutx, s.dropouti, s.dropoute) == \
        (850, 850, 0.75, 0.25, 0.75, 0.2, 0.1)
    assert (cfg.tar_beta, cfg.ar_alpha, cfg.max_seq_len_delta, cfg.limit_eval_batches) == (1e-3, 0.0, 20, None)
    wt2 = compose_train("experiment=darts_wt2_retrain", "arch=darts_v2")
    assert (wt2.dataset.name, wt2.space.emsize, wt2.space.nhid, wt2.weight_decay, wt2.space.dropouth) == \
        ("wikitext2", 700, 700, 5e-7, 0.15)
    assert (wt2.test_batch_size, wt2.space.dropout, wt2.lr) == (1, 0.75, 20.0)
    # rnn/train.py: a NaN reloads the best model.pt + optimizer.pt and goes on (f01 item 6)
    assert cfg.nan_policy == wt2.nan_policy == "reload_best"


def test_misspelled_key_is_an_error():
    with pytest.raises(Exception, match="nonmno"):
        compose_train("arch=darts_v2", "nonmno=3")


# ------------------------------------------------------------------ the loop, end to end


def write_corpus(root: Path, seed=0) -> Path:
    """A small Markov-chain corpus (24 words) with train / valid / test.txt."""
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(23)] + ["<unk>"]
    trans = torch.softmax(3 * torch.randn(len(words), len(words), generator=g), -1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3000), ("valid", 600), ("test", 500)):
        w, lines, line = 0, [], []
        for _ in range(n):
            w = torch.multinomial(trans[w], 1, generator=g).item()
            line.append(words[w])
            if len(line) == 12:
                lines.append(" ".join(line))
                line = []
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def smoke_cfg(data_root, *overrides):
    return compose_train("experiment=smoke", "arch=darts_v2", f"dataset.root={data_root}", "progress=false",
                         "device=cpu", "limit_eval_batches=null", *overrides)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "ptb")


def unigram_ppl(root: Path, split: str) -> float:
    """Perplexity on ``split`` of the unigram model of the training text (counts, one <eos> per line): what a
    model that learned the word frequencies but no context scores."""
    import collections
    import math

    def words(name):
        return [w for line in (root / f"{name}.txt").read_text().splitlines() for w in line.split() + ["<eos>"]]

    train_words, counts = words("train"), collections.Counter(words("train"))
    text = words(split)
    return math.exp(-sum(math.log(counts[w] / len(train_words)) for w in text) / len(text))


@pytest.mark.parametrize("optimizer", ["ntasgd", "asgd"])
def test_train_writes_outputs_and_checkpoint_reproduces_valid_ppl(tmp_path, corpus_root, optimizer):
    # long enough, and without dropout, to learn the chain's transitions (a uniform model scores 25)
    cfg = smoke_cfg(corpus_root, f"optimizer={optimizer}", "epochs=10", "batch_size=8", "limit_train_batches=null",
                    *(f"space.{d}=0" for d in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute")))
    run = tmp_path / "run"
    metrics = train(cfg, run_dir=str(run))
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["test_ppl"] == metrics["test_ppl"]
    for key in ("best_valid_ppl", "test_ppl", "params", "epochs", "tokens_per_second", "wall_seconds"):
        assert key in on_disk
    assert on_disk["exact_eval"] and on_disk["epochs"] == 10 and len(on_disk["history"]) == 10
    assert Genotype.load(str(run / "genotype.json")) == load_published("darts_v2")
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # the text is a Markov chain: a model that uses the previous word beats the unigram model of the training
    # text (17.1 test / 18.2 valid ppl; measured at 10 epochs: ntasgd 4.8 / 4.7, asgd 7.5 / 8.1, the same with 1 and 2
    # threads; at 6 epochs asgd, which averages from the first step, was at 12.1 / 12.9; untrained ~25)
    assert metrics["test_ppl"] < 0.7 * unigram_ppl(corpus_root, "test")
    assert metrics["best_valid_ppl"] < 0.7 * unigram_ppl(corpus_root, "valid")

    trained = load_trained(str(run))  # rebuilds from the checkpoint alone
    assert trained.genotype == load_published("darts_v2")
    assert trained.checkpoint["averaged"] == (optimizer == "asgd")
    c = trained.cfg
    corpus = load_corpus(c.dataset.name, c.dataset.root)
    valid = evaluate(trained.model, batchify(corpus.valid, c.eval_batch_size), c.bptt)
    assert abs(valid.ppl - metrics["best_valid_ppl"]) < 1e-6
    test = evaluate(trained.model, batchify(corpus.test, c.test_batch_size), c.bptt)
    assert abs(test.ppl - metrics["test_ppl"]) < 1e-6


def test_train_with_bf16_products_learns_the_chain_and_scores_in_fp32(tmp_path, corpus_root, monkeypatch):
    """``matmul_dtype=bfloat16`` (nas.precision): the same learning bound as float32 above (measured, 1 thread: 4.99 /
    4.66 test / valid ppl in float32, 5.01 / 4.73 in bf16); the reported perplexities are those of the float32 weights."""
    # on a CPU without AVX512-BF16/AMX the run is refused (emulated products); this model is small enough to emulate
    monkeypatch.setattr("nas.precision.native_support", lambda dtype, device: True)
    cfg = smoke_cfg(corpus_root, "matmul_dtype=bfloat16", "epochs=10", "batch_size=8", "limit_train_batches=null",
                    *(f"space.{d}=0" for d in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute")))
    metrics = train(cfg, run_dir=str(tmp_path / "run"))
    assert metrics["test_ppl"] < 0.7 * unigram_ppl(corpus_root, "test")
    trained = load_trained(str(tmp_path / "run"))
    assert trained.cfg.matmul_dtype == "bfloat16" and trained.model.encoder.weight.dtype == torch.float32
    c = trained.cfg
    test = evaluate(trained.model, batchify(load_corpus(c.dataset.name, c.dataset.root).test, c.test_batch_size), c.bptt)
    assert abs(test.ppl - metrics["test_ppl"]) < 1e-6


def test_nonmono_switch_evaluates_with_averaged_weights(tmp_path, corpus_root, monkeypatch):
    calls = []

    def trigger_once(history, val_loss, nonmono):
        calls.append(len(history))
        return len(history) == 0  # fire after the first epoch

    monkeypatch.setattr(train_mod, "nonmono_trigger", trigger_once)
    metrics = train(smoke_cfg(corpus_root, "epochs=3"), run_dir=str(tmp_path / "run"))
    assert calls == [0]  # only asked while still on SGD
    assert metrics["asgd_epoch"] == 1
    assert [h["averaged"] for h in metrics["history"]] == [False, True, True]
    best = load_trained(str(tmp_path / "run")).checkpoint
    assert best["averaged"] == (best["epoch"] > 1)


def test_train_from_a_search_genotype_file(tmp_path, corpus_root, monkeypatch):
    torch.manual_seed(3)
    g = DartsRNNSpace(DartsRNNConfig()).derive(torch.randn(36, 5))
    g.save(str(tmp_path / "genotype.json"))
    monkeypatch.chdir(tmp_path)  # arch= is relative to the launch directory
    metrics = train(smoke_cfg(corpus_root, "arch=genotype.json", "epochs=1"), run_dir=str(tmp_path / "run"))
    assert Genotype.from_dict(metrics["genotype"]) == g


def test_train_errors(tmp_path, corpus_root, monkeypatch):
    with pytest.raises(GenotypeError, match="darts_v1, darts_v2, enas"):
        train(smoke_cfg(corpus_root, "arch=nope"), run_dir=str(tmp_path / "a"))
    with pytest.raises(GenotypeError, match="arch= is required"):
        train(compose_train("experiment=smoke"), run_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="optimizer"):
        train(smoke_cfg(corpus_root, "optimizer=rmsprop"), run_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="matmul_dtype='bf16x'; valid: null"):
        train(smoke_cfg(corpus_root, "matmul_dtype=bf16x"), run_dir=str(tmp_path / "d"))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ConfigError, match="no AVX512-BF16 or AMX"):  # refused before any data or model
        train(smoke_cfg(corpus_root, "matmul_dtype=bfloat16"), run_dir=str(tmp_path / "e"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_trained(str(tmp_path / "broken.pt"))


def test_cli_smoke(tmp_path, corpus_root):
    """``python train.py experiment=smoke arch=darts_v2``: the Hydra shim, composition, run dir."""
    run = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "arch=darts_v2",
                           f"dataset.root={corpus_root}", "progress=false", f"hydra.run.dir={run}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["arch"] == "darts_v2" and not metrics["exact_eval"]  # smoke: partial evaluation
    assert (run / "best.pt").is_file() and (run / "config.yaml").is_file()
    assert OmegaConf.load(run / "config.yaml").arch == "darts_v2"
    assert os.path.isfile(run / "train.log")
    done = [line for line in proc.stderr.splitlines() if "done in" in line][-1]  # the partial test figure says so
    assert f"over {metrics['test_tokens']:,} tokens only, not the whole split (limit_eval_batches=" in done, done
    assert "device cpu (" in proc.stderr  # the thread count, which the floats depend on


@pytest.mark.slow
def test_smoke_on_real_ptb(tmp_path):
    """``experiment=smoke`` on the real corpus (needs $NAS_DATA/ptb): runs, full vocabulary, finite ppl."""
    if not os.path.isdir(os.path.join(os.environ.get("NAS_DATA", "/nonexistent"), "ptb")):
        pytest.skip("needs $NAS_DATA/ptb")
    cfg = compose_train("experiment=smoke", "arch=darts_v2", "progress=false", "device=cpu")
    metrics = train(cfg, run_dir=str(tmp_path / "run"))
    emsize = cfg.space.emsize
    assert load_trained(str(tmp_path / "run")).model.encoder.weight.shape == (10000, emsize)
    assert 100 < metrics["best_valid_ppl"] < 10000 and 100 < metrics["test_ppl"] < 10000
    assert not metrics["exact_eval"]  # smoke scores the first limit_eval_batches segments only
