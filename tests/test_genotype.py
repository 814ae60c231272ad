"""Genotype value: derivation (softmax, not logits), JSON round trip by name, validation errors."""
import json

import pytest
import torch

from nas.genotype import Edge, Genotype, GenotypeError, derive
from nas.ops import DARTS_RNN_OPS

OPS = list(DARTS_RNN_OPS)  # none, tanh, relu, sigmoid, identity


def test_derivation_uses_softmax_not_raw_logits():
    # node 1 has one predecessor; node 2 has two: rows 1 (from node 0) and 2 (from node 1)
    alphas = torch.tensor([[0.0, 1, 0, 0, 0],
                           [0.0, 3, 0, 0, 0],  # softmax: tanh 0.834
                           [9.0, 9, 10, 9, 9]])  # raw max 10, but softmax relu only 0.405
    g = derive(alphas, OPS, "darts_rnn")
    assert g.nodes[1] == (Edge("tanh", 0),)
    # the logit-based choice would have been relu from node 1
    assert g.nodes[1] != (Edge("relu", 1),)


def test_adding_a_constant_to_a_row_changes_nothing():
    torch.manual_seed(0)
    alphas = torch.randn(36, 5)
    shifted = alphas + torch.randn(36, 1) * 100
    assert derive(alphas, OPS, "darts_rnn") == derive(shifted, OPS, "darts_rnn")


def test_never_contains_none_even_when_none_dominates():
    alphas = torch.zeros(36, 5)
    alphas[:, 0] = 50.0  # `none` is by far the strongest everywhere
    alphas[:, 3] = 1.0
    g = derive(alphas, OPS, "darts_rnn")
    assert all(e.op == "sigmoid" for node in g.nodes for e in node)
    assert g.steps == 8 and g.concat == tuple(range(1, 9))


def test_none_is_found_by_name_in_any_column():
    ops = ["tanh", "none", "relu"]
    alphas = torch.tensor([[0.0, 9.0, 1.0]])
    assert derive(alphas, ops, "darts_rnn").nodes == ((Edge("relu", 0),),)


def test_top_k_edges_per_node():
    alphas = torch.zeros(6, 3)
    alphas[3:6] = torch.tensor([[0.0, 1, 0], [0.0, 5, 0], [0.0, 3, 0]])  # node 3 from nodes 0, 1, 2
    g = derive(alphas, ["zero", "identity", "conv"], "hybrid", k=2)
    assert g.nodes[2] == (Edge("identity", 1), Edge("identity", 2))
    assert len(g.nodes[0]) == 1  # node 1 has a single possible input


def test_json_round_trip_by_op_name(tmp_path):
    g = derive(torch.randn(36, 5), OPS, "darts_rnn")
    path = tmp_path / "g.json"
    g.save(str(path))
    d = json.loads(path.read_text())
    assert d["space"] == "darts_rnn" and d["ops"] == OPS
    assert all(isinstance(e["op"], str) for node in d["nodes"] for e in node)
    assert Genotype.load(str(path)) == g


def _logits(genotype, x):
    from nas.spaces.darts_rnn import DartsRNNConfig, DartsRNNSpace

    torch.manual_seed(0)  # the same weights for every genotype: the cell's parameters do not depend on its ops
    model = DartsRNNSpace(DartsRNNConfig(emsize=8, nhid=8)).freeze(genotype, 20).double().eval()
    return model(x, model.init_hidden(x.size(1))).logits


def test_a_file_with_its_op_list_reordered_builds_the_same_model(tmp_path):
    """Ops are stored and parsed by name: permuting the file's op list changes neither the cell nor its output,
    while changing one node's op does (so the comparison can see a different cell)."""
    from nas.published import load_published

    g = load_published("darts_v2")  # sigmoid, relu, identity and tanh nodes
    path = tmp_path / "g.json"
    g.save(str(path))
    d = json.loads(path.read_text())
    d["ops"] = ["sigmoid", "identity", "none", "relu", "tanh"]  # no op keeps its position
    assert all(a != b for a, b in zip(d["ops"], OPS))
    (tmp_path / "permuted.json").write_text(json.dumps(d))
    g2 = Genotype.load(str(tmp_path / "permuted.json"))
    assert [[(e.op, e.input) for e in node] for node in g2.nodes] == \
        [[("sigmoid", 0)], [("relu", 1)], [("relu", 1)], [("identity", 1)], [("tanh", 2)], [("sigmoid", 5)],
         [("tanh", 3)], [("relu", 5)]]  # DARTS_V2 of the reference rnn/genotypes.py
    x = torch.randint(20, (7, 3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(g2, x), _logits(g, x))
    other = Genotype.from_dict({**d, "nodes": [[{"op": "tanh", "input": 0}]] + d["nodes"][1:]})
    assert (_logits(other, x) - _logits(g, x)).abs().max() > 1e-3


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"]}', "missing field"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"], "nodes": [[{"op": "conv9", "input": 0}]], "concat": [1]}',
     "unknown op 'conv9'"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"], "nodes": [[{"op": "none", "input": 0}]], "concat": [1]}',
     "never keeps a 'none' edge"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"], "nodes": [[{"op": "tanh", "input": 1}]], "concat": [1]}',
     "not an earlier node"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"], "nodes": [[{"op": "tanh", "input": 0}]], "concat": [5]}',
     "concat"),
    ('{"space": "darts_rnn", "ops": ["none", "tanh"], "nodes": [[{"op": "tanh"}]], "concat": [1]}',
     "malformed"),
])
def test_corrupt_genotype_files_give_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(GenotypeError, match=match) as err:
        Genotype.load(str(path))
    assert str(path) in str(err.value)


def test_missing_file_is_a_genotype_error(tmp_path):
    with pytest.raises(GenotypeError, match="cannot read"):
        Genotype.load(str(tmp_path / "nope.json"))


def test_derive_rejects_wrong_shapes():
    with pytest.raises(GenotypeError, match="do not fit"):
        derive(torch.zeros(36, 4), OPS, "darts_rnn")
    with pytest.raises(GenotypeError, match="triangular"):
        derive(torch.zeros(35, 5), OPS, "darts_rnn")


def test_saved_files_have_ordinary_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final file gets the umask's usual mode."""
    import os
    import stat

    g = derive(torch.randn(3, 5), OPS, "darts_rnn")
    path = tmp_path / "g.json"
    g.save(str(path))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask


def test_the_origin_task_and_dataset_round_trip_and_do_not_change_the_architecture(tmp_path):
    """A genotype records the task and dataset it was searched for (u01.1); they are not part of the architecture:
    equality and hashing ignore them, and a file without them (older versions, published genotypes) loads with None."""
    plain = Genotype(space="darts_rnn", ops=tuple(DARTS_RNN_OPS), nodes=((Edge("tanh", 0),), (Edge("relu", 1),)),
                     concat=(1, 2))
    searched = plain.with_origin("language_modeling", "ptb")
    assert (searched.task, searched.dataset) == ("language_modeling", "ptb") and plain.task is None
    d = searched.to_dict()
    assert (d["task"], d["dataset"]) == ("language_modeling", "ptb") and "task" not in plain.to_dict()
    path = tmp_path / "g.json"
    searched.save(str(path))
    back = Genotype.load(str(path))
    assert (back.task, back.dataset) == ("language_modeling", "ptb")
    assert back == plain and hash(back) == hash(plain) and len({back, plain}) == 1 and back.key() == plain.key()
    assert searched.with_origin("classification", "sst2").key() == plain.key() != searched.to_json()
    old = json.loads(path.read_text())
    del old["task"], old["dataset"]
    path.write_text(json.dumps(old))
    assert Genotype.load(str(path)).task is None and Genotype.load(str(path)).dataset is None
    with pytest.raises(GenotypeError, match="'task' must be a name, got 3"):
        Genotype.from_dict({**d, "task": 3}, where="x")


def test_retraining_refuses_a_genotype_of_another_task(tmp_path):
    """The engine itself (not only the command line) refuses an SST-2 classifier genotype on a language-model dataset
    (u01.1: it used to retrain silently as a PTB language model); one of the same task on another dataset is fine."""
    from nas.engine.train import check_genotype_task
    from nas.tasks import TASKS

    genotype = Genotype(space="hybrid", ops=("none", "identity", "rnn"), nodes=((Edge("rnn", 0),),), concat=(1,),
                        task="classification", dataset="sst2")
    with pytest.raises(GenotypeError, match="searched for task classification on sst2, but dataset=ptb is for task "
                                            "language_modeling: retrain it on a dataset of task classification"):
        check_genotype_task(genotype, TASKS.get("language_modeling")(), "ptb")
    check_genotype_task(genotype, TASKS.get("classification")(), "sst2")
    check_genotype_task(genotype.with_origin(None, None), TASKS.get("language_modeling")(), "ptb")  # an old file
