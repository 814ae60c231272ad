"""Matrix products in a lower precision (config ``matmul_dtype``): a named option, off by default.

With ``matmul_dtype=bfloat16`` the training passes of a language model run their matrix products (the cell's
projections and the decoder) on bfloat16 inputs: weights are rounded once per forward pass, activations once per
product, the product accumulates in float32 inside the GEMM (as torch's bf16 kernels do) and its result, rounded to
bfloat16, comes back in the run's ``dtype``.  Everything else -- the weights themselves, their gradients' sums
across products, the optimizer, α, the elementwise cell ops, softmax and the loss -- stays in ``dtype``.  This is
mixed-precision training in the sense of Micikevicius et al. 2018 (sec. 3: fp32 master weights, low-precision
products), with bfloat16 (Kalamkar et al. 2019) so that no loss scaling is needed.

Evaluation (the model in ``eval()`` mode: validation, test perplexity) always runs in ``dtype``: reported
perplexities are those of the trained weights, exactly computed.

Why: on a CPU with AVX512-BF16 (a 2-core Zen 4 EPYC) bf16 products measured 2.1-2.7x the fp32 ones at the
paper's shapes, and a retraining step at 850 units 1.81x faster (experiments/README.md, "Matrix products in
bfloat16").  That is the CPU's doing, not the option's: on a 2-core Xeon with AVX512-BF16 whose AMX was not
available (2026-12-02) bf16 products ran at half the fp32 peak and the same step was slower than in fp32, so
``experiments/benchmark.py --matmul-dtype bfloat16`` is how to tell for a machine.  On GPUs it is not measured
yet.  Where the hardware lacks them torch emulates bf16 products about 100x slower than fp32, so runs refuse the
option there (:func:`check_matmul_dtype`).  The DARTS reference code runs fp32 throughout, so the paper presets
keep ``matmul_dtype: null``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from nas.errors import ConfigError

log = logging.getLogger(__name__)

#: config value -> torch dtype.  Only bfloat16: float16 products would need loss scaling (its range stops at 6e-8,
#: where small gradients' products underflow), which this option does not do.
MATMUL_DTYPES = {"bfloat16": torch.bfloat16}


def native_support(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices in hardware: a GPU of compute capability 8.0 or later; a CPU
    when it has AVX512-BF16 or AMX tiles (``torch.cpu``'s checks).  Without them, torch's CPU bf16 products are
    emulated: measured 0.8-1.3 GFLOP/s against 114 GFLOP/s in float32 on a 2-core AVX2 EPYC (2026-12-02)."""
    if device.type == "cuda":  # bf16 tensor cores from compute capability 8.0 (Ampere); older GPUs emulate
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True  # other backends: their own kernels decide


def check_matmul_dtype(name: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """:func:`parse_matmul_dtype`, and refuse a dtype ``device`` has no hardware products for (a run 100x slower
    than float32 is never what the option is for).

    Raises:
        ConfigError: for an unknown name, or a device without native products in that dtype.
    """
    dtype = parse_matmul_dtype(name)
    if dtype is not None and not native_support(dtype, device):
        what = (f"this CPU has {torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16 or AMX"
                if device.type == "cpu" else f"{device} has no native {name} products")
        raise ConfigError(f"matmul_dtype={name}: {what}, so {name} matrix products would be emulated, far slower than "
                          "float32 (measured 100x on an AVX2 CPU); set matmul_dtype=null")
    if dtype is not None and device.type == "cpu" and not torch.cpu._is_amx_tile_supported():
        log.info("matmul_dtype=%s on a CPU with AVX512-BF16 and no AMX: whether it is faster than float32 depends on "
                 "the CPU (a retraining step measured 1.81x faster on a Zen 4 EPYC, slower on a Xeon without AMX); "
                 "python experiments/benchmark.py --matmul-dtype %s tells for this one", name, name)
    return dtype


def parse_matmul_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``matmul_dtype`` config value -> torch dtype (None: products in the run's own dtype).

    Raises:
        ConfigError: for a name not in :data:`MATMUL_DTYPES`.
    """
    if name is None:
        return None
    if name not in MATMUL_DTYPES:
        hint, lower = "", str(name).lower()
        if lower in ("float16", "half", "fp16"):
            hint = "; float16 is not offered: its products would need loss scaling"
        elif "bf" in lower:
            hint = "; did you mean bfloat16?"
        raise ConfigError(f"matmul_dtype={name!r}; valid: null (the run's dtype), {', '.join(MATMUL_DTYPES)}{hint}")
    return MATMUL_DTYPES[name]


def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w`` computed in ``w``'s dtype, returned in ``a``'s: a [..., K], w [K, N] -> [..., N].

    When the dtypes agree this is a plain ``a @ w``; otherwise ``a`` is rounded to ``w.dtype`` for the product
    (``w`` is the weight, already rounded once per forward pass by the caller)."""
    if a.dtype == w.dtype:
        return a @ w
    return (a.to(w.dtype) @ w).to(a.dtype)


def addmm(bias: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``bias + a @ w`` with the product as in :func:`mm`: bias [B, N], a [B, K], w [K, N] -> [B, N]."""
    if a.dtype == w.dtype:
        return torch.addmm(bias, a, w)
    return bias + (a.to(w.dtype) @ w).to(a.dtype)


@contextmanager
def full_precision(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every module of ``model`` runs its products in the weights' own dtype.

    For computations that lower-precision products would spoil: second-order DARTS's finite-difference
    Hessian-vector product (Liu et al. 2019, eq. 7-8) evaluates ∇α L_train at w ± εv with ε‖v‖ = 0.01, a
    perturbation of about 1e-5 per weight at the paper size, below half a bfloat16 unit of a weight of 0.04
    (1.6e-4): w + εv and w - εv would round to the same products and the difference would be rounding noise.
    """
    saved = [(m, m.matmul_dtype) for m in model.modules() if getattr(m, "matmul_dtype", None) is not None]
    for m, _ in saved:
        m.matmul_dtype = None
    try:
        yield
    finally:
        for m, dtype in saved:
            m.matmul_dtype = dtype


def set_matmul_dtype(model: torch.nn.Module, name: Optional[str]) -> None:
    """Apply config ``matmul_dtype`` to a model: its ``set_matmul_dtype`` gets the torch dtype.

    Raises:
        ConfigError: for an unknown name, or a model (space) whose products do not support it.
    """
    dtype = parse_matmul_dtype(name)
    if dtype is None:
        return
    if not hasattr(model, "set_matmul_dtype"):
        raise ConfigError(f"matmul_dtype={name}: {type(model).__name__} ({type(getattr(model, 'cell', model)).__name__})"
                          " does not support lower-precision products; it is implemented for space=darts_rnn's "
                          "language model. Set matmul_dtype=null")
    model.set_matmul_dtype(dtype)
