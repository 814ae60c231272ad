"""The DARTS recurrent-cell space: shapes, agreement with a plain implementation, supernet == frozen cell."""
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from nas.genotype import Edge, Genotype, GenotypeError
from nas.ops import DARTS_RNN_OPS
from nas.spaces import SPACES
from nas.spaces.darts_rnn import DartsCell, DartsRNNConfig
from reference_cell import bernoulli_mask, reference_forward

E, H, T, B = 5, 6, 5, 3


def test_alpha_shape_is_36_by_5_for_the_paper_space():
    space = SPACES.get("darts_rnn")(DartsRNNConfig())
    assert space.alpha_shape == (36, 5)
    assert space.ops == DARTS_RNN_OPS


def test_every_space_is_registered_with_a_schema():
    for name in SPACES:
        assert SPACES.schema(name) is not None


def _cell(genotype=None, dropout=0.0, batchnorm=True, ops=DARTS_RNN_OPS, steps=4):
    torch.manual_seed(0)
    return DartsCell(E, H, ops, steps, genotype, dropouth=dropout, dropoutx=dropout,
                     batchnorm=batchnorm).double()


@contextmanager
def given_masks(*masks):
    """The cell's dropout masks are ``masks``, in the order it draws them (x, then h)."""
    queue = list(masks)

    def take(like, shape, p, batch_dim=None):
        mask = queue.pop(0)
        assert tuple(mask.shape) == tuple(shape)
        return mask.to(like.dtype)

    with mock.patch("nas.spaces.darts_rnn.dropout_mask", take):
        yield
    assert not queue, "the cell drew fewer masks than expected"


def _compare(cell, weights, train, dtype=torch.float64):
    """The cell's outputs, gradients and BatchNorm running statistics equal the reference code's semantics
    (``reference_cell``), to 1e-5, with the same dropout masks."""
    cell.train(train)
    E, H = cell.ninp, cell.nhid
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, E, dtype=dtype, requires_grad=True)
    h = torch.randn(B, H, dtype=dtype)
    bn = None
    if cell.batchnorm:
        if not train:  # running statistics that are not the initial 0 / 1
            with torch.no_grad(), given_masks(*_masks(cell, g, dtype)):
                cell.train()(torch.randn(T, 7, E, dtype=dtype), torch.randn(7, H, dtype=dtype), weights)
            cell.eval()
        bn = torch.nn.BatchNorm1d(H, affine=False).to(dtype).train(train)
        bn.running_mean.copy_(cell.bn_running_mean)
        bn.running_var.copy_(cell.bn_running_var)
    masks = _masks(cell, g, dtype, B) if train else []
    with given_masks(*masks):
        out, last = cell(x, h, weights)
    xm = masks[0] if train and cell.dropoutx > 0 else None
    hm = masks[-1] if train and cell.dropouth > 0 else None
    genotype = cell.genotype
    ref, ref_last = reference_forward(
        cell.W0, list(cell.Ws), x, h, ops=cell.ops, probs=weights, concat=cell.concat, x_mask=xm, h_mask=hm, bn=bn,
        edges=None if genotype is None else [(node[0].op, node[0].input) for node in genotype.nodes])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)
    if bn is not None:  # updated at every call in training, untouched in evaluation
        torch.testing.assert_close(cell.bn_running_mean, bn.running_mean, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cell.bn_running_var, bn.running_var, rtol=1e-5, atol=1e-7)
    loss_w = torch.randn_like(out)
    params = [x] + list(cell.parameters()) + ([weights] if weights is not None else [])
    grads = torch.autograd.grad((out * loss_w).sum(), params)
    grads_ref = torch.autograd.grad((ref * loss_w).sum(), params)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _masks(cell, g, dtype, batch=7):
    """Fresh masks for one forward of ``cell`` over ``batch`` columns, in the order it draws them."""
    out = []
    if cell.dropoutx > 0:
        out.append(bernoulli_mask((batch, cell.ninp), cell.dropoutx, g, dtype))
    if cell.dropouth > 0:
        out.append(bernoulli_mask((batch, cell.nhid), cell.dropouth, g, dtype))
    return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_supernet_matches_plain_implementation(train, batchnorm):
    cell = _cell(dropout=0.3, batchnorm=batchnorm)
    weights = torch.softmax(torch.randn(10, 5, dtype=torch.float64), -1).requires_grad_(True)
    _compare(cell, weights, train)


def test_search_cell_evaluation_does_not_depend_on_batch_mates_and_runs_at_batch_1():
    """f01 item 2: in evaluation the search cell's BatchNorm uses its running statistics (DARTS's BatchNorm1d in
    eval mode), so a column's output is the same whatever the other columns are, and a batch of 1 works."""
    cell = _cell(dropout=0.3, batchnorm=True)
    weights = torch.softmax(torch.randn(10, 5, dtype=torch.float64), -1)
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the initial 0 / 1
            cell.train()(torch.randn(T, 8, E, dtype=torch.float64), torch.randn(8, H, dtype=torch.float64), weights)
        assert cell.bn_running_mean.abs().max() > 1e-3
        cell.eval()
        x, h = torch.randn(T, 10, E, dtype=torch.float64), torch.randn(10, H, dtype=torch.float64)
        ten = cell(x, h, weights)[0][:, :1]
        two = cell(x[:, :2] * torch.tensor([1.0, 3.0], dtype=torch.float64).view(1, 2, 1), h[:2], weights)[0][:, :1]
        one = cell(x[:, :1], h[:1], weights)[0]
    assert (ten - two).abs().max() < 1e-6 and (ten - one).abs().max() < 1e-6


@pytest.mark.parametrize("train", [False, True])
def test_frozen_cell_matches_plain_implementation(train):
    g = Genotype("darts_rnn", DARTS_RNN_OPS, [[Edge("tanh", 0)], [Edge("relu", 1)], [Edge("identity", 1)],
                                             [Edge("sigmoid", 2)]], range(1, 5))
    _compare(_cell(genotype=g, dropout=0.3), None, train)


def test_supernet_with_one_hot_weights_is_the_frozen_cell():
    """One model definition: the supernet restricted to a genotype's edges computes the frozen cell."""
    g = Genotype("darts_rnn", DARTS_RNN_OPS, [[Edge("sigmoid", 0)], [Edge("relu", 1)], [Edge("tanh", 0)],
                                             [Edge("identity", 2)]], range(1, 5))
    sup = _cell(batchnorm=False)
    frozen = _cell(genotype=g)
    frozen.load_state_dict(sup.state_dict())
    weights = torch.zeros(10, 5, dtype=torch.float64)
    offset = 0
    for i, node in enumerate(g.nodes, start=1):
        weights[offset + node[0].input, DARTS_RNN_OPS.index(node[0].op)] = 1.0
        offset += i
    x, h = torch.randn(T, B, E, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    sup.eval(), frozen.eval()
    torch.testing.assert_close(sup(x, h, weights)[0], frozen(x, h)[0], rtol=1e-12, atol=1e-12)


def test_none_is_handled_by_name_not_position():
    ops = ("tanh", "identity", "none", "relu")
    cell = _cell(ops=ops, batchnorm=False)
    w = torch.softmax(torch.randn(10, 4, dtype=torch.float64), -1)
    w_none_only = torch.zeros_like(w)
    w_none_only[:, 2] = 1.0
    x, h = torch.randn(T, B, E, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    cell.eval()
    # all weight on `none`: every intermediate node is exactly zero
    out, _ = cell(x, h, w_none_only)
    assert torch.count_nonzero(out) == 0
    _compare(cell, w.requires_grad_(True), True)


def test_space_builds_supernet_and_frozen_lm_and_rejects_foreign_genotypes():
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=8, steps=3))
    sup = space.build_supernet(30)
    tokens = torch.randint(30, (4, 2))
    out = sup(tokens, sup.init_hidden(2), torch.softmax(torch.zeros(space.alpha_shape), -1))
    assert out.logits.shape == (4, 2, 30) and out.hidden.shape == (2, 8)
    with pytest.raises(ValueError, match="edge weights of shape"):
        sup(tokens, sup.init_hidden(2), None)
    g = space.derive(torch.randn(space.alpha_shape))
    frozen = space.freeze(g, 30)
    assert frozen(tokens, frozen.init_hidden(2)).logits.shape == (4, 2, 30)
    other = Genotype("hybrid", ("zero", "identity"), [[Edge("identity", 0)]], [1])
    with pytest.raises(GenotypeError, match="space 'hybrid'"):
        space.freeze(other, 30)
    two_edges = Genotype("darts_rnn", DARTS_RNN_OPS, [[Edge("tanh", 0)], [Edge("tanh", 0), Edge("relu", 1)]], [1, 2])
    with pytest.raises(GenotypeError, match="one edge per node"):
        space.freeze(two_edges, 30)


def test_tied_decoder_needs_equal_sizes():
    space = SPACES.get("darts_rnn")(DartsRNNConfig(emsize=8, nhid=16))
    with pytest.raises(ValueError, match="must equal nhid"):
        space.build_supernet(30)


def test_unknown_op_in_config_is_rejected():
    with pytest.raises(ValueError, match="unknown recurrent-cell op 'tanhh'"):
        SPACES.get("darts_rnn")(DartsRNNConfig(ops=["none", "tanhh"]))
