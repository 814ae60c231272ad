"""A straightforward DARTS recurrent cell, written like the paper's equations (one edge, one op at a time).

Used only by tests, to pin the optimized :class:`nas.spaces.darts_rnn.DartsCell` (which fuses the op
mixture, batches predecessors and precomputes the input projection) to the plain computation.
It reads the parameters of a DartsCell and draws dropout masks in the same order, so both see the same
randomness when seeded identically.
"""
import torch

from nas.layers import dropout_mask
from nas.ops import cell_activation


def reference_forward(cell, inputs, hidden, weights=None):
    """inputs [T, B, E], hidden [B, H], weights [E_edges, K] -> (outputs [T, B, H], last [B, H])."""
    T, B = inputs.shape[:2]
    H, E = cell.nhid, cell.ninp
    x_mask = h_mask = None
    if cell.training and cell.dropoutx > 0:
        x_mask = dropout_mask(inputs, (B, E), cell.dropoutx)
    if cell.training and cell.dropouth > 0:
        h_mask = dropout_mask(inputs, (B, H), cell.dropouth)
    outs, h = [], hidden
    for t in range(T):
        x = inputs[t] if x_mask is None else inputs[t] * x_mask
        hp = h if h_mask is None else h * h_mask
        ch = torch.cat([x, hp], dim=-1) @ cell.W0
        c0, h0 = torch.sigmoid(ch[:, :H]), torch.tanh(ch[:, H:])
        s0 = h + c0 * (h0 - h)
        if cell.batchnorm:
            s0 = _bn(s0)
        states = [s0]
        if cell.genotype is None:
            offset = 0
            for i in range(cell.steps):
                s = torch.zeros_like(s0)
                for j in range(i + 1):
                    sj = states[j]
                    chj = (sj if h_mask is None else sj * h_mask) @ cell.Ws[i]
                    c, hh = torch.sigmoid(chj[:, :H]), chj[:, H:]
                    for k, name in enumerate(cell.ops):
                        f = cell_activation(name)
                        if f is None:
                            continue
                        s = s + weights[offset + j, k] * (sj + c * (f(hh) - sj))
                offset += i + 1
                if cell.batchnorm:
                    s = _bn(s)
                states.append(s)
        else:
            for i, node in enumerate(cell.genotype.nodes):
                (edge,) = node
                sj = states[edge.input]
                chj = (sj if h_mask is None else sj * h_mask) @ cell.Ws[i]
                c, hh = torch.sigmoid(chj[:, :H]), chj[:, H:]
                states.append(sj + c * (cell_activation(edge.op)(hh) - sj))
        h = sum(states[c] for c in cell.concat) / len(cell.concat)
        outs.append(h)
    return torch.stack(outs), h


def _bn(s, eps=1e-5):
    mean = s.mean(0, keepdim=True)
    var = ((s - mean) ** 2).mean(0, keepdim=True)
    return (s - mean) / torch.sqrt(var + eps)
