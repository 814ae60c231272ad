"""Data parallelism under ``torchrun``: one process per device, each on its own shard of every batch.

``torchrun --nproc_per_node=N search.py ...`` (or ``train.py``) starts N copies of the script with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init` joins them into one
``torch.distributed`` process group (:func:`backend`: gloo on CPU; with CUDA, NCCL for CUDA tensors).
What the engines do with it (PyTorch distributed data parallelism, Li et al., VLDB 2020, sec. 2-3):

* every batch of B columns is split into N shards of B/N columns, rank r taking columns [r B/N, (r+1) B/N)
  (:func:`shard_columns`); B must be divisible by N;
* the gradients of the weights *and* of α (first and second order: the virtual step's training gradient, the
  held-out gradients and the finite-difference terms) are averaged over the ranks (:func:`average_`), so every
  rank applies the same update and holds the same weights, α and genotype, checked at every genotype export
  (:func:`check_same`);
* the supernet's BatchNorm normalizes in training with the statistics of the whole global batch, and updates its
  running statistics with them (:func:`global_batch_norm`, a differentiable all-reduce), and dropout masks are drawn for the global batch
  on every rank from the same random stream, each rank keeping its own rows (:func:`shard_mask`).  With equal
  shards (losses are means over equal token counts) a run then computes what one process computes on the
  global batch, up to float rounding in the sums;
* only rank 0 writes files (run dir, logs, TensorBoard, checkpoints); a checkpoint holds the hidden states of
  the global batch (:func:`gather_columns`), so a run resumes under any world size that divides the batch.

The standard DDP wrapper (``torch.nn.parallel.DistributedDataParallel``) is not used: it averages gradients that ``.backward()`` accumulates into ``.grad``, while DARTS's hypergradient and the virtual
step of the second-order update come from ``torch.autograd.grad`` (never accumulated); one mechanism averages
both.  Without ``torchrun`` (or with one process) every function here is the identity / a no-op.
"""
from __future__ import annotations

import datetime
import logging
import os
import warnings
from typing import List, NamedTuple, Optional, Sequence

import torch

from nas.errors import ConfigError

log = logging.getLogger(__name__)

# torch 2.13 deprecates the differentiable collectives of torch.distributed.nn for _functional_collectives, whose
# all_gather has no backward; global_batch_norm needs one, and would warn at every call
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
                        category=FutureWarning)

#: seconds a collective waits for the other ranks before failing (torchrun also stops the rest when one dies)
TIMEOUT_S = 600


class World(NamedTuple):
    """This process's place in the data-parallel group: ``rank`` in [0, ``size``), ``local_rank`` on its node."""

    rank: int
    size: int
    local_rank: int


_world: Optional[World] = None


def launched() -> Optional[World]:
    """The :class:`World` that ``torchrun``'s environment describes when it started more than one process, else
    None (reads the environment only; see :func:`init`)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init() -> Optional[World]:
    """Join ``torchrun``'s process group (once per process); returns the :class:`World`, or None without torchrun.

    Raises:
        RuntimeError: the rendezvous fails (torch's message).
    """
    global _world
    world = launched()
    if world is None or _world is not None:
        return _world
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend(), timeout=datetime.timedelta(seconds=TIMEOUT_S))
    _world = world
    return world


def backend() -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA and NCCL are present (CPU tensors over gloo, CUDA ones over NCCL), else
    ``gloo``."""
    import torch.distributed as dist

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def world() -> Optional[World]:
    """The initialized :class:`World`, or None in a single-process run."""
    return _world


def rank() -> int:
    """This process's rank (0 in a single-process run)."""
    return _world.rank if _world else 0


def is_writer() -> bool:
    """True on the one process that writes the run's files: rank 0, or the only process."""
    return rank() == 0


def size() -> int:
    """Number of data-parallel processes (1 in a single-process run)."""
    return _world.size if _world else 1


def device_for(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA ``device`` becomes this process's own GPU ``cuda:LOCAL_RANK`` (made current)."""
    if _world is None or device.type != "cuda":
        return device
    device = torch.device("cuda", _world.local_rank)
    torch.cuda.set_device(device)
    return device


def check_divisible(value: int, what: str) -> None:
    """Raise ConfigError unless ``value`` (a batch size) splits into equal shards over torchrun's processes (reads
    the environment: usable before :func:`init`)."""
    world = launched()
    if world is not None and value % world.size:
        raise ConfigError(f"{what}={value} does not split over {world.size} torchrun processes: each rank takes an "
                          f"equal shard of every batch, so {what} must be a multiple of {world.size}")


def shard_columns(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``t`` along ``dim`` (default: the batch columns of a batchified split [T, B])."""
    if _world is None:
        return t
    b = t.size(dim) // _world.size
    return t.narrow(dim, _world.rank * b, b).contiguous()


def gather_columns(t: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
    """The whole batch from every rank's shard ``t`` (rows along ``dim``; a hidden state [B/N, H] -> [B, H]).

    A collective: every rank must call it.  None stays None."""
    if _world is None or t is None:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(_world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def shard_rows(t: Optional[torch.Tensor], dim: int = 0) -> Optional[torch.Tensor]:
    """This rank's rows of a whole-batch tensor (the inverse of :func:`gather_columns`); None stays None."""
    return t if t is None else shard_columns(t, dim)


def average_(tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """Average ``tensors`` in place over the ranks (one all-reduce of their concatenation); Nones are skipped.

    A collective: every rank must call it with tensors of the same shapes in the same order."""
    if _world is None:
        return
    import torch.distributed as dist

    present = [t for t in tensors if t is not None]
    if not present:
        return
    flat = torch.cat([t.reshape(-1) for t in present])
    dist.all_reduce(flat)
    flat.div_(_world.size)
    offset = 0
    for t in present:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def mean_values(values: Sequence[float]) -> List[float]:
    """The mean over the ranks of each float in ``values`` (float64, over gloo; a collective)."""
    return _reduce_values(values, mean=True)


def sum_values(values: Sequence[float]) -> List[float]:
    """The sum over the ranks of each float in ``values`` (float64, over gloo; a collective)."""
    return _reduce_values(values, mean=False)


def _reduce_values(values, mean: bool) -> List[float]:
    if _world is None:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    if mean:
        t /= _world.size
    return t.tolist()


def any_rank(flag: Optional[int]) -> Optional[int]:
    """The largest of the ranks' ``flag`` (e.g. a pending signal number), None when no rank has one; so that every
    rank takes the same decision (a collective)."""
    if _world is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([flag or 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def check_same(value: str, what: str) -> None:
    """Raise RuntimeError unless every rank holds the same ``value`` (e.g. a genotype's text): the guard against
    ranks exporting different architectures.  A collective."""
    if _world is None:
        return
    import torch.distributed as dist

    values: list = [None] * _world.size
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        raise RuntimeError(f"data-parallel ranks disagree on the {what}: " +
                           "; ".join(f"rank {r}: {v}" for r, v in enumerate(values)))


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if _world is not None:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a picklable value; a collective)."""
    if _world is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_mask(like: torch.Tensor, shape: Sequence[int], batch_dim: int, draw) -> torch.Tensor:
    """A random mask for this rank's rows: ``draw(like, global_shape)`` for the whole batch (``shape`` with its
    ``batch_dim`` times the world size), then this rank's rows.  Every rank draws the same global mask from the
    same random stream, so a data-parallel run sees the masks of the single-process run on the global batch."""
    if _world is None:
        return draw(like, tuple(shape))
    full = list(shape)
    full[batch_dim] *= _world.size
    return draw(like, tuple(full)).narrow(batch_dim, _world.rank * shape[batch_dim], shape[batch_dim])


def global_batch_norm(s: torch.Tensor, running_mean: Optional[torch.Tensor] = None,
                      running_var: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5) -> torch.Tensor:
    """BatchNorm without affine parameters, ``nn.BatchNorm1d(H, affine=False)`` semantics, over the *global* batch.

    s: this rank's rows [B/N, H] (single process: the batch [B, H]).  ``running_mean`` / ``running_var`` [H]: the
    running statistics (None: none kept).  Training: normalize with the batch's mean and biased variance and, when
    running statistics are given, update them in place with ``momentum`` (the unbiased variance, as torch's
    BatchNorm does: r <- (1 - m) r + m b).  Evaluation (``training=False``): normalize with the running statistics
    alone, so a row's output does not depend on its batch mates (Ioffe & Szegedy 2015, sec. 3.1; torch's BatchNorm1d
    in eval mode).
    Under torchrun the training statistics are those of the global batch: one differentiable all-gather
    (``torch.distributed.nn.functional.all_gather``) of each rank's mean and sum of squared deviations, combined
    exactly (Chan et al. 1979: M2 = Σ M2_r + b Σ (mean_r - mean)²), so the statistics, the running-statistics
    update and the gradients flowing back to every rank's rows are those of one process on the whole batch.
    Raises:
        ValueError: ``training=False`` without running statistics.
    """
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("BatchNorm in evaluation mode needs running statistics")
        return torch.nn.functional.batch_norm(s, running_mean, running_var, training=False, eps=eps)
    if _world is None:
        return torch.nn.functional.batch_norm(s, running_mean, running_var, training=True, momentum=momentum,
                                              eps=eps)
    from torch.distributed.nn.functional import all_gather

    b = s.size(0)
    mean_r = s.mean(0)
    m2_r = (s - mean_r).pow(2).sum(0)
    parts = torch.stack(all_gather(torch.stack([mean_r, m2_r])))  # [N, 2, H]
    means, m2s = parts[:, 0], parts[:, 1]
    mean = means.mean(0)
    m2 = m2s.sum(0) + b * (means - mean).pow(2).sum(0)
    n = b * _world.size
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(m2.detach() / (n - 1), alpha=momentum)
    return (s - mean) * torch.rsqrt(m2 / n + eps)
