"""The language-model wrapper around a recurrent cell (DARTS RNN; AWD-LSTM regularization).

embedding (word-level dropout ``dropoute``) -> locked dropout ``dropouti`` -> cell over time ->
locked dropout ``dropout`` -> decoder tied to the embedding (Press & Wolf 2017; Inan et al. 2017).
Tensor layout: tokens [T, B], states [B, H], sequences [T, B, H], logits [T, B, V].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from nas.layers import LockedDropout, embedded_dropout
from nas.losses import lm_cross_entropy
from nas.precision import mm
from nas.errors import ConfigError


class LMOutput(NamedTuple):
    """What :class:`RNNLanguageModel` returns.

    logits: [T, B, V] unnormalized next-token scores; hidden: [B, H] last state (for the next segment);
    raw_output: [T, B, H] cell outputs before output dropout (for temporal activation regularization);
    output: [T, B, H] after output dropout (for activation regularization);
    loss: mean next-token NLL in nats (scalar) when the forward got ``targets`` -- then ``logits`` is None.
    """

    logits: Optional[torch.Tensor]
    hidden: torch.Tensor
    raw_output: torch.Tensor
    output: torch.Tensor
    loss: Optional[torch.Tensor] = None


class RNNLanguageModel(nn.Module):
    """Word-level language model around a cell ``cell(x [T,B,E], h [B,H], weights) -> ([T,B,H], [B,H])``.

    Args:
        ntoken: vocabulary size V.
        cell: the recurrent cell module (supernet or frozen).
        ninp: embedding size E; must equal the cell's hidden size H (tied decoder, as in DARTS).
        dropout, dropouti, dropoute: output, embedding-output and word-level dropout probabilities.
        init_range: the tied embedding/decoder matrix ~ U(-r, r), decoder bias 0.  The DARTS reference code uses its
            INITRANGE = 0.04 for this matrix (rnn/model.py ``init_weights``), as for the cell; AWD-LSTM used 0.1.
    Raises:
        ValueError: if ``ninp`` differs from ``cell.nhid`` (the decoder is tied to the embedding).
    """

    def __init__(self, ntoken: int, cell: nn.Module, ninp: int, dropout: float = 0.0,
                 dropouti: float = 0.0, dropoute: float = 0.0, init_range: float = 0.04):
        super().__init__()
        if ninp != cell.nhid:
            raise ConfigError(f"emsize ({ninp}) must equal nhid ({cell.nhid}): the decoder is tied to the embedding")
        self.ntoken, self.ninp = ntoken, ninp
        self.dropout, self.dropouti, self.dropoute = dropout, dropouti, dropoute
        self.lockdrop = LockedDropout()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.cell = cell
        self.decoder = nn.Linear(ninp, ntoken)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -init_range, init_range)
        nn.init.zeros_(self.decoder.bias)
        #: dtype of the decoder's and the cell's products in training (None: the weights' own); see
        #: :func:`set_matmul_dtype`
        self.matmul_dtype: Optional[torch.dtype] = None

    def set_matmul_dtype(self, dtype: Optional[torch.dtype]) -> None:
        """Run the training passes' matrix products in ``dtype`` (config ``matmul_dtype``; :mod:`nas.precision`):
        the decoder's here, the cell's through its own ``set_matmul_dtype``.  Evaluation keeps the weights' dtype.

        Raises:
            ConfigError: if the cell has no lower-precision products (only the darts_rnn cell has them).
        """
        if not hasattr(self.cell, "set_matmul_dtype"):
            raise ConfigError(f"matmul_dtype: the {type(self.cell).__name__} cell does not support lower-precision "
                              "products (space=darts_rnn does); set matmul_dtype=null")
        self.cell.set_matmul_dtype(dtype)
        self.matmul_dtype = dtype

    def init_hidden(self, batch_size: int) -> torch.Tensor:
        """Zero state [B, H] on the model's device and dtype."""
        w = self.encoder.weight
        return w.new_zeros(batch_size, self.cell.nhid)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor,
                weights: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> LMOutput:
        """tokens [T, B] LongTensor, hidden [B, H], weights [E, K] edge weights (supernet only).

        In training with ``matmul_dtype`` set, the decoder's products take that dtype (:mod:`nas.precision`).
        With ``targets`` [T, B], the decoder and the cross-entropy run fused (:mod:`nas.losses`): the output
        carries ``loss`` and no logits, which saves the [T, B, V] logits' memory and about a third of the
        output layer's time.
        """
        emb = embedded_dropout(self.encoder, tokens, self.dropoute if self.training else 0.0)
        emb = self.lockdrop(emb, self.dropouti)
        raw_output, hidden = self.cell(emb, hidden, weights)
        output = self.lockdrop(raw_output, self.dropout)
        low = self.matmul_dtype if self.training else None
        if targets is not None:
            return LMOutput(None, hidden, raw_output, output, lm_cross_entropy(self.decoder, output, targets, low))
        if low is not None:
            logits = mm(output, self.decoder.weight.to(low).t()) + self.decoder.bias
            return LMOutput(logits, hidden, raw_output, output)
        return LMOutput(self.decoder(output), hidden, raw_output, output)
