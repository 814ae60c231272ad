"""Decoder + cross-entropy in one pass over vocabulary chunks, without materializing the logits.

A word-level LM's output layer dominates its memory and, on CPU, much of its time: for PTB at batch 256 and
bptt 35 the logits alone are 8960 x 10000 fp32 = 358 MB, and softmax, its gradient and the logits each get
their own buffer.  :func:`linear_cross_entropy` computes the mean negative log-likelihood of
``softmax(h W^T + b)`` and, in the same pass, its gradients, a block of rows at a time, so at most one
[rows, V] block of logits lives at once (it stays in cache) and backward is three products, no softmax.
It is exact: the same values and gradients as ``F.cross_entropy(F.linear(h, W, b), y)`` up to float
rounding (tests pin them to 1e-5).  The trick is the one of fused "linear cross-entropy" kernels
(the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024), written here with PyTorch operations only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nas.precision import mm

#: rows per block: 256 x V=10000 fp32 logits = 10 MB, which stays in L3 cache (1.1x faster products than 1024)
DEFAULT_BLOCK_ROWS = 256


def _logits(h, weight, bias):
    """h [N, D] @ weight [V, D]^T + bias [V], the product in ``weight``'s dtype (:mod:`nas.precision`)."""
    if h.dtype != weight.dtype:
        logits = mm(h, weight.t())
        return logits if bias is None else logits.add_(bias)
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats: logits [T, B, V], targets [T, B] -> scalar."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, block_rows, matmul_dtype=None):
        n = h.size(0)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # the products' weight: rounded to matmul_dtype once (nas.precision.mm rounds each block of rows)
        w_mm = weight if matmul_dtype is None else weight.to(matmul_dtype)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if (need_b and bias is not None) else None
        total = h.new_zeros((), dtype=torch.float64)
        for start in range(0, n, block_rows):
            hb = h[start:start + block_rows]
            yb = targets[start:start + block_rows]
            logits = _logits(hb, w_mm, bias)
            yb1 = yb.unsqueeze(1)
            target_logit = logits.gather(1, yb1).squeeze(1)
            # softmax in place of the logits; NLL = -log p_target.  Where p_target underflows (a target
            # logit ~88+ nats below the row's best) the NLL is taken from an exact logsumexp instead.
            probs = torch.softmax(logits, dim=1)
            del logits
            p_target = probs.gather(1, yb1).squeeze(1)
            nll = -torch.log(p_target)
            tiny = p_target < 1e-30
            if tiny.any():
                rows = tiny.nonzero().squeeze(1)
                lse = torch.logsumexp(_logits(hb[rows], w_mm, bias), dim=1)
                nll[rows] = lse - target_logit[rows]
            total += nll.sum(dtype=torch.float64)
            if need_h or need_w or need_b:
                # d(mean NLL)/d logits = (softmax - onehot) / n
                probs.scatter_add_(1, yb1, probs.new_full((yb.numel(), 1), -1.0))
                if matmul_dtype is None:
                    if need_h:
                        torch.mm(probs, weight, out=grad_h[start:start + block_rows]).div_(n)
                    if need_w:
                        grad_w.addmm_(probs.t(), hb, alpha=1.0 / n)
                else:  # products in matmul_dtype, summed over blocks in h's dtype
                    probs_mm = probs.to(matmul_dtype)
                    if need_h:
                        grad_h[start:start + block_rows] = (probs_mm @ w_mm).to(h.dtype).div_(n)
                    if need_w:
                        grad_w.add_(probs_mm.t() @ hb.to(matmul_dtype), alpha=1.0 / n)
                if grad_b is not None:
                    grad_b.add_(probs.sum(0), alpha=1.0 / n)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_out  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         targets: torch.Tensor, block_rows: int = DEFAULT_BLOCK_ROWS,
                         matmul_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of the linear decoder ``h W^T + b`` against ``targets``.

    Args:
        h: [N, D] decoder inputs; weight: [V, D]; bias: [V] or None; targets: [N] class ids in [0, V).
        block_rows: rows of logits computed at once (memory O(block_rows * V) instead of O(N * V)).
        matmul_dtype: None, or the dtype of the three products (logits, grad h, grad W) on inputs rounded to it;
            softmax, the NLL and the sums over blocks stay in h's dtype (config ``matmul_dtype``, :mod:`nas.precision`).
    Returns:
        scalar tensor, equal to ``F.cross_entropy(F.linear(h, weight, bias), targets)``.
    Raises:
        ValueError: for mismatched shapes or an empty batch.
    The gradients are computed in the forward pass, for the inputs that require grad, and scaled in
    backward; the result cannot be differentiated twice (use the logits path for double backward).
    """
    if h.dim() != 2 or targets.shape != h.shape[:1] or weight.size(1) != h.size(1) or h.size(0) == 0:
        raise ValueError(f"linear_cross_entropy: h {tuple(h.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)} do not fit (h [N, D], weight [V, D], targets [N], N > 0)")
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        with torch.no_grad():
            return _LinearCrossEntropy.forward(_NoGrad, h, weight, bias, targets, block_rows, matmul_dtype)
    return _LinearCrossEntropy.apply(h, weight, bias, targets, block_rows, matmul_dtype)


class _NoGrad:
    """Stands in for ``ctx`` when no gradient is needed."""

    needs_input_grad = (False,) * 6

    @staticmethod
    def save_for_backward(*_):
        pass


def lm_cross_entropy(decoder: nn.Linear, output: torch.Tensor, targets: torch.Tensor,
                     matmul_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Mean next-token NLL of a decoder over ``output`` [T, B, D] against ``targets`` [T, B] (fused; products in
    ``matmul_dtype`` if given)."""
    return linear_cross_entropy(output.reshape(-1, output.size(-1)), decoder.weight, decoder.bias,
                                targets.reshape(-1), matmul_dtype=matmul_dtype)


def lm_nll(out, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL (nats) of an LMOutput: its fused ``loss`` when the forward got the targets,
    else the cross-entropy of its ``logits`` [T, B, V] against ``targets`` [T, B]."""
    return out.loss if out.loss is not None else nll(out.logits, targets)
