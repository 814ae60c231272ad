"""Typed config schemas, stored in Hydra's ConfigStore.

Every YAML file in ``conf/`` lists one of these schemas first in its defaults, so the composed config is
type-checked and in struct mode: a misspelled key or override is an error, never a new key.  Defaults live
here (and in each space's / strategy's own schema); YAML presets only override.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from nas.diagnostics import DiagnosticsConfig


@dataclass
class DatasetConfig:
    """``dataset=ptb|wikitext2|sst2``: which corpus and where it is.

    root: folder holding ``train.txt valid.txt test.txt`` (or its parent holding ``ptb/``...); a relative
    path is taken from the launch directory, once: the run's config.yaml holds it absolute (nas.engine.paths).
    null: ``$NAS_DATA/<folder>``, then the download cache.
    download: fetch from the public location (SHA-256 checked) when the files are not found.
    """

    name: str = "ptb"
    #: the task this dataset is for (a name in nas.tasks.TASKS: language_modeling, classification); null: the
    #: dataset's task before this key existed (sst2: classification, any other: language_modeling)
    task: Optional[str] = None
    root: Optional[str] = None
    download: bool = False
    cache_dir: Optional[str] = None
    #: sentence datasets (sst2) only: the part of the training set held out for α (search) and model
    #: selection (retraining), as a fraction in (0, 1); GLUE dev is then the test split
    holdout: float = 0.05
    #: sentence datasets only: seed of the held-out draw (a data seed, independent of ``seed``)
    split_seed: int = 0
    #: sentence datasets only: what is held out: ``sentence`` (whole sentences with their own phrases, so that no
    #: held-out row lies inside a training row; conf/dataset/sst2.yaml), ``row`` (random rows, mostly phrases of
    #: training sentences); null: the split of a run config saved before this key existed (``row``;
    #: nas.data.sentences.load_sst2)
    holdout_by: Optional[str] = None
    #: sentence datasets only: words seen fewer times in the training part map to <unk>
    min_freq: int = 1


@dataclass
class LMRunConfig:
    """What search and retraining share: data, device, seed, optimizer and regularization settings."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    space: Any = MISSING
    seed: int = 0
    #: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``, ``cuda:1`` ...
    device: str = "auto"
    epochs: int = 50
    batch_size: int = 256
    eval_batch_size: int = 10
    bptt: int = 35
    #: variable-length bptt is capped at bptt + this (DARTS --max_seq_len_delta; ``awd_lstm`` sampler only)
    max_seq_len_delta: int = 20
    lr: float = 20.0
    weight_decay: float = 5e-7
    clip: float = 0.25
    #: activation regularization α·mean(h²) on the dropped output (AWD-LSTM sec. 4.6)
    ar_alpha: float = 0.0
    #: temporal activation regularization β·mean((h_t - h_{t-1})²) on the raw output
    tar_beta: float = 1e-3
    #: cap on training segments per epoch (null: the whole split) -- for quick presets only
    limit_train_batches: Optional[int] = None
    #: cap on evaluation segments (null: the whole split, which exact perplexity needs)
    limit_eval_batches: Optional[int] = None
    log_every: int = 50
    #: torch intra-op threads (null: torch's default, cut to the cores other processes leave free at the start;
    #: give a number for runs that must match bit for bit: the thread count changes the floats)
    num_threads: Optional[int] = None
    #: with ``num_threads: null`` on a CPU: count the free cores again every this many seconds and follow them (a
    #: neighbour that starts or ends during the run; nas.engine.common.FreeCoreWatch); 0: decided once at the start.
    #: Compiled runs keep the start's count (a new count would compile again)
    threads_recheck_seconds: float = 30.0
    #: show a tqdm progress bar
    progress: bool = True
    #: CPU only: keep large freed blocks in glibc's heap (mallopt) so every pass does not page-fault its
    #: tensors in again (1.5x faster search steps at emsize 64; see nas.engine.common.tune_cpu_allocator)
    tune_cpu_allocator: bool = True
    #: compile the cell's time step with torch.compile (needs a C++ compiler on CPU, Triton on CUDA): 2-3x
    #: faster cells once compiled; the first compile of each shape takes about a minute on 2 cores, later
    #: runs reuse Inductor's on-disk cache
    compile: bool = False
    #: continue the run in this run dir from its checkpoint, with its own config.yaml (only num_threads,
    #: threads_recheck_seconds, progress, device, nan_policy and checkpoint_every may be set anew); see
    #: nas.engine.resume
    resume: Optional[str] = None
    #: write the resume checkpoint every this many steps, and at each epoch end (0: epoch ends only)
    checkpoint_every: int = 200
    #: a NaN/inf loss or gradient: ``stop`` (clear error, the last good checkpoint kept), ``rollback``
    #: (reload the last checkpoint, halve the weights' learning rate, go on; at most 8 times) or ``reload_best``
    #: (train.py, language models: DARTS rnn/train.py -- reload best.pt's weights and optimizer state, same lr,
    #: go on from the epoch after the best; at most 8 times without a new best)
    nan_policy: str = "stop"
    #: torch.use_deterministic_algorithms(True) (and cuBLAS's deterministic workspace on CUDA); CPU runs with
    #: the same seed and threads are bit-identical without it
    deterministic: bool = False
    #: floating-point precision of weights, α and activations: float32, or float64 for numerical checks (e.g. a
    #: torchrun run against one process, where float32 rounding grows through training)
    dtype: str = "float32"
    #: the dtype of the training passes' matrix products (null: ``dtype``, as the reference code); ``bfloat16``:
    #: products on bf16-rounded inputs, with weights, gradient sums, optimizer and evaluation in ``dtype`` (a
    #: named speed option: 2.1-2.7x faster products on a CPU with AVX512-BF16 (Zen 4), refused on hardware without
    #: bf16 products; second order's finite-difference passes stay in ``dtype``; nas.precision; space=darts_rnn's
    #: language model only)
    matmul_dtype: Optional[str] = None


@dataclass
class SearchConfig(LMRunConfig):
    """``search.py``: a one-shot search (weights on train, α on the held-out split)."""

    strategy: Any = MISSING
    #: training segment lengths: ``darts_search`` (bptt w.p. 0.95, else bptt/2, no noise: DARTS rnn/train_search.py)
    #: or ``awd_lstm`` (N(bptt or bptt/2, 5), at least 5, capped: the retraining's); see nas.data.sample_seq_len
    seq_len_sampler: str = "darts_search"
    #: the weights' optimizer: ``sgd`` (DARTS) or ``adam`` (the sentence classifiers).  The second-order
    #: update's virtual step is an SGD step with ξ = lr either way (DARTS eq. 6; with Adam an approximation)
    optimizer: str = "sgd"
    #: collapse diagnostics of a one-shot search and DARTS-ES (nas.diagnostics; black-box strategies ignore them)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    #: a label that tells apart the workers of one shared study in a sweep (``python search.py -m
    #: hydra/launcher=workers worker=range(4) strategy.storage=...``: four jobs, four workers); it changes nothing else
    worker: int = 0


@dataclass
class TrainConfig(LMRunConfig):
    """``train.py``: retrain a genotype from scratch and report test perplexity (DARTS sec. 3.3 / A.2.2).

    ``space`` gives the model sizes and dropouts; the cell itself comes from ``arch``.
    """

    #: a published genotype name (darts_v1, darts_v2, enas), a genotype JSON file, or a search run dir
    arch: str = MISSING
    #: ``ntasgd``: SGD, then averaged SGD once the non-monotone trigger fires (AWD-LSTM sec. 3, DARTS);
    #: ``sgd``: never average; ``asgd``: averaged SGD from the first step; ``adam``: Adam (sentence classifiers)
    optimizer: str = "ntasgd"
    #: training segment lengths: ``awd_lstm`` (DARTS rnn/train.py, AWD-LSTM sec. 4.1) or ``darts_search``
    seq_len_sampler: str = "awd_lstm"
    #: non-monotone interval: switch when valid loss is worse than the best of all but the last ``nonmono``
    nonmono: int = 5
    #: batch size of the test split (DARTS / AWD-LSTM: 1, one long sequence)
    test_batch_size: int = 1
    #: bptt of the evaluation passes (null: ``bptt``); exact perplexity does not depend on it
    eval_bptt: Optional[int] = None


#: the range of every numeric setting with one (keys absent from a config, e.g. another space's, are skipped):
#: ``(low, low_open, high, high_open)``; ``None`` bounds are unbounded, and a null value is allowed where the
#: schema's type is Optional.  Checked by :func:`check_ranges` before a run writes anything.
RANGES = {
    "epochs": (1, False, None, False), "batch_size": (1, False, None, False), "eval_batch_size": (1, False, None, False),
    "bptt": (1, False, None, False), "max_seq_len_delta": (0, False, None, False), "lr": (0, True, None, False),
    "weight_decay": (0, False, None, False), "clip": (0, True, None, False), "ar_alpha": (0, False, None, False),
    "tar_beta": (0, False, None, False), "limit_train_batches": (1, False, None, False),
    "limit_eval_batches": (1, False, None, False), "log_every": (1, False, None, False),
    "test_batch_size": (1, False, None, False), "eval_bptt": (1, False, None, False),
    "space.emsize": (1, False, None, False), "space.nhid": (1, False, None, False), "space.steps": (1, False, None, False),
    "space.nodes": (2, False, None, False), "space.k": (1, False, None, False), "space.heads": (1, False, None, False),
    "space.init_range": (0, True, None, False),
    **{f"space.{d}": (0, False, 1, True) for d in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute", "dropouta")},
    "strategy.arch_lr": (0, True, None, False), "strategy.arch_weight_decay": (0, False, None, False),
    "strategy.alpha_init_std": (0, False, None, False), "strategy.fd_epsilon": (0, True, None, False),
    # issue 19's strategies: gdas's temperatures, the parameter penalty, evolution's sizes, the pruners' rungs
    "strategy.tau_max": (0, True, None, False), "strategy.tau_min": (0, True, None, False),
    "strategy.param_penalty": (0, False, None, False), "strategy.population": (1, False, None, False),
    "strategy.sample_size": (1, False, None, False), "strategy.min_resource": (1, False, None, False),
    "strategy.reduction_factor": (2, False, None, False), "strategy.min_early_stopping_rate": (0, False, None, False),
    # issue 20: the collapse diagnostics and the cap on parameter-free ops
    "space.max_parameter_free": (0, False, None, False), "diagnostics.every": (1, False, None, False),
    "diagnostics.hessian_batches": (1, False, None, False), "diagnostics.hessian_tol": (0, True, None, False),
    "diagnostics.hessian_max_matvecs": (1, False, None, False), "diagnostics.decided_margin": (0, False, 1, False),
    "diagnostics.parameter_free_share": (0, False, 1, False), "diagnostics.early_stop.window": (1, False, None, False),
    "diagnostics.early_stop.delta": (1, False, None, False), "diagnostics.early_stop.factor": (0, True, None, False),
    "diagnostics.early_stop.start_epoch": (1, False, None, False),
}


def _in_range(value, low, low_open, high, high_open) -> bool:
    """Whether ``value`` lies in the range; never for nan or ±inf (an infinite lr, temperature or penalty is no
    setting: it turns the first step's numbers into nan)."""
    return (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def check_ranges(cfg) -> None:
    """Refuse a numeric setting outside its range (:data:`RANGES`): a negative ``clip`` would run gradient ascent to
    the end and report success, a negative ``lr`` or a dropout of 1.5 would fail deep inside torch with a traceback.

    Raises:
        ConfigError: naming every key out of range, its value and the range.
    """
    from omegaconf import OmegaConf

    from nas.errors import ConfigError

    bad = []
    for key, (low, low_open, high, high_open) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent, null (Optional), or not numeric
        if not _in_range(value, low, low_open, high, high_open):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
            finite = "" if math.isfinite(value) else "finite and "
            bad.append(f"{key}={value} (must be {finite}{' and '.join(x for x in (lo, hi) if x)})")
    betas = OmegaConf.select(cfg, "strategy.arch_betas", default=None, throw_on_missing=False)
    if betas is not None and not all(0 <= b < 1 for b in betas):
        bad.append(f"strategy.arch_betas={list(betas)} (each must be >= 0 and < 1)")
    if bad:
        raise ConfigError(f"out of range: {'; '.join(bad)}")


def register_configs() -> None:
    """Store the schemas (idempotent).  Importing the spaces and strategies registers theirs."""
    import nas.spaces  # noqa: F401
    import nas.strategies  # noqa: F401

    cs = ConfigStore.instance()
    cs.store(name="search_schema", node=SearchConfig)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="schema/dataset", name="dataset", node=DatasetConfig)


register_configs()
