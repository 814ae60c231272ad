"""The DARTS recurrent cell as the DARTS reference code computes it, written for the tests from that code's semantics.

Source: quark0/darts, rnn/model.py (``DARTSCell._compute_init_state``, ``DARTSCell.cell``) and rnn/model_search.py
(``DARTSCellSearch.cell``): per time step

    [c0; h0] = [x ⊙ mx ; h ⊙ mh] W0,   s0 = h + σ(c0) (tanh(h0) - h),   s0 <- BN(s0)
    node i:  s_i = BN( Σ_{j<i} Σ_{k ≠ none} p[e(j,i), k] (s_j + σ(c_j) (f_k(h_j) - s_j)) ),  [c_j; h_j] = (s_j ⊙ mh) W_i
    output:  mean of the last N states

with one ``torch.nn.BatchNorm1d(H, affine=False)`` shared by s0 and every node (so its running statistics are updated
at every call, in this order), masks only in training, and the frozen cell taking one (op, input) edge per node.

Nothing here comes from ``nas``: the activations, the masks (given by the caller), the BatchNorm (torch's module)
and the loops are written out, so a test comparing :class:`nas.spaces.darts_rnn.DartsCell` with this can fail when
the product's semantics drift (e.g. BatchNorm normalizing with batch statistics in evaluation).
"""
import torch

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda x: x}


def reference_forward(W0, Ws, inputs, hidden, *, ops=None, probs=None, edges=None, concat=None,
                      x_mask=None, h_mask=None, bn=None):
    """Run the cell over time.

    Args:
        W0: [E + H, 2H]; Ws: N tensors [H, 2H]; inputs [T, B, E]; hidden [B, H].
        Supernet: ``ops`` (names, one per column of ``probs``) and ``probs`` [N(N+1)/2, K] (edge ``j -> i`` of node
        i = 1..N is row i(i-1)/2 + j).  Frozen: ``edges`` [(op, input node)] per node.
        concat: the output nodes (default: the last N, i.e. 1..N).
        x_mask [B, E], h_mask [B, H]: dropout masks (training), or None.
        bn: a ``torch.nn.BatchNorm1d(H, affine=False)`` (its train/eval mode decides the statistics), or None.
    Returns:
        (outputs [T, B, H], last state [B, H]).
    """
    H = hidden.size(1)
    N = len(edges) if edges is not None else len(Ws)
    concat = list(concat) if concat is not None else list(range(1, N + 1))
    outs, h = [], hidden
    for t in range(inputs.size(0)):
        x = inputs[t] if x_mask is None else inputs[t] * x_mask
        hp = h if h_mask is None else h * h_mask
        ch = torch.cat([x, hp], dim=-1).mm(W0)
        c0, h0 = torch.sigmoid(ch[:, :H]), torch.tanh(ch[:, H:])
        s0 = h + c0 * (h0 - h)
        if bn is not None:
            s0 = bn(s0)
        states = [s0]
        if edges is None:
            offset = 0
            for i in range(N):
                s = torch.zeros_like(s0)
                for j in range(i + 1):
                    sj = states[j]
                    chj = (sj if h_mask is None else sj * h_mask).mm(Ws[i])
                    c, hh = torch.sigmoid(chj[:, :H]), chj[:, H:]
                    for k, name in enumerate(ops):
                        if name == "none":
                            continue
                        s = s + probs[offset + j, k] * (sj + c * (ACTIVATIONS[name](hh) - sj))
                offset += i + 1
                if bn is not None:
                    s = bn(s)
                states.append(s)
        else:
            for i, (name, j) in enumerate(edges):
                sj = states[j]
                chj = (sj if h_mask is None else sj * h_mask).mm(Ws[i])
                c, hh = torch.sigmoid(chj[:, :H]), chj[:, H:]
                states.append(sj + c * (ACTIVATIONS[name](hh) - sj))
        h = torch.stack([states[i] for i in concat]).mean(0)
        outs.append(h)
    return torch.stack(outs), h


def bernoulli_mask(shape, p, generator, dtype=torch.float64):
    """An inverted-dropout mask: Bernoulli(1 - p) / (1 - p) (the reference's ``mask2d`` semantics)."""
    return (torch.rand(shape, generator=generator, dtype=dtype) < 1 - p).to(dtype) / (1 - p)
