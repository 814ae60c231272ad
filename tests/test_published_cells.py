"""The published genotypes (nas/genotypes/*.json) are the cells of the papers, edge by edge.

Expected data written out by hand from the DARTS reference code's ``rnn/genotypes.py`` (github.com/quark0/darts;
Liu et al. 2019, Fig. 5 / Table 2 for DARTS, Pham et al. 2018 for ENAS): node ``i`` (1-based; node 0 is the
cell's input node computed from x_t and h_{t-1}) is ``op(node input)``; the cell's output is the mean of the
``concat`` nodes.  Each list below is the reference's ``recurrent`` list in order, so entry ``i - 1`` is node ``i``.
"""
import pytest

from nas.published import load_published

CELLS = {
    # DARTS_V1 (first order, PTB; the paper's Table 2 "DARTS (first order)" cell)
    "darts_v1": ([("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3), ("relu", 4), ("identity", 1), ("relu", 5),
                  ("relu", 1)], [1, 2, 3, 4, 5, 6, 7, 8]),
    # DARTS_V2 (second order, PTB; the code's default DARTS, Table 2's 55.7 test ppl)
    "darts_v2": ([("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2), ("sigmoid", 5),
                  ("tanh", 3), ("relu", 5)], [1, 2, 3, 4, 5, 6, 7, 8]),
    # ENAS (11 nodes; its output averages the nodes no other node reads: 2, 5, 6, 9, 10, 11)
    "enas": ([("tanh", 0), ("tanh", 1), ("relu", 1), ("tanh", 3), ("tanh", 3), ("relu", 3), ("relu", 4),
              ("relu", 7), ("relu", 8), ("relu", 8), ("relu", 8)], [2, 5, 6, 9, 10, 11]),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_published_genotype_is_the_reference_cell_edge_by_edge(name):
    edges, concat = CELLS[name]
    g = load_published(name)
    assert g.space == "darts_rnn" and g.steps == len(edges)
    for node, (expected, got) in enumerate(zip(edges, g.nodes), start=1):
        assert len(got) == 1, f"{name} node {node}: the recurrent cells keep one edge per node"
        assert (got[0].op, got[0].input) == expected, f"{name} node {node}"
    assert list(g.concat) == concat
