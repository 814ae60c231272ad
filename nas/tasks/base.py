"""The Task interface: what the engine's loops need to know about a learning problem, and the task registry.

A *task* (language modelling, sentence classification, ...) owns everything that depends on the kind of data:
its splits (including the one α is trained on), the training batches and the α batches with a resumable
position, one weight update, evaluation (the metric, its direction, the loss beside it), the cost unit (training
tokens), the epoch figures and what a run reports.  The engine (:mod:`nas.engine.search`, :mod:`nas.engine.train`,
:mod:`nas.engine.blackbox`) writes each loop once against this interface and the strategy interface; it never
asks which task it runs.  The pattern follows fairseq's task registry (a task builds its datasets and criterion
and is looked up by name).

A run config names its task through its dataset: ``dataset.task`` (``conf/dataset/<name>.yaml``).  Adding a task
is one module that registers a :class:`Task` subclass in :data:`TASKS` plus one ``conf/dataset`` yaml (the CPU-sized
settings in ``conf/tuning/`` are chosen by the dataset *group*: a dataset given only as ``dataset.name=...`` keeps the
default group's, ptb's).
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import torch

from nas.errors import ConfigError
from nas.registry import Registry

#: task name -> :class:`Task` subclass (``dataset.task`` in a run config)
TASKS = Registry("task")


class Batch(NamedTuple):
    """One BPTT segment: tokens [T, B], targets [T, B], the incoming (detached) hidden state [B, H]."""

    data: torch.Tensor
    targets: torch.Tensor
    hidden: torch.Tensor

    def inputs(self) -> tuple:
        """The model's positional inputs: ``model(data, hidden, weights=..., targets=...)``."""
        return (self.data, self.hidden)


class SentenceInputs(NamedTuple):
    """One classification batch: tokens [T, B] right-padded, targets (labels) [B], lengths [B]."""

    data: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor

    def inputs(self) -> tuple:
        """The model's positional inputs: ``model(data, lengths, weights=..., targets=...)``."""
        return (self.data, self.lengths)


class Step(NamedTuple):
    """One training step's data: the weights' batch, the α batch (None when retraining), the factor the configured
    learning rate is scaled by for this step (language models: ``seq_len / bptt``, AWD-LSTM sec. 4.1), and the
    step's size in the task's own unit, for its position (language models: the segment's rows)."""

    train: Any
    alpha: Any = None
    lr_factor: float = 1.0
    size: int = 0


class StepResult(NamedTuple):
    """What one weight update returns: the raw training loss (nats per target), what the loop carries to the next
    step (a language model's hidden state [B, H]; None otherwise), and the step's counts for the epoch figures."""

    loss: float
    carry: Any = None
    tokens: int = 0
    correct: int = 0
    count: int = 0


class Task:
    """A learning problem the engine searches and retrains on (subclass and register in :data:`TASKS`).

    Class attributes:
        name: the registry name, recorded in genotypes and in ``metrics.json`` (``task``); title: in words.
        kind: the suffix of the resume checkpoint's kind (``search_<kind>``, ``train_<kind>``).
        metric: the model-selection metric (``ppl``, ``accuracy``); reported as ``valid_<metric>`` etc.
        direction: ``minimize`` or ``maximize`` the metric.
        bar_counter: the ``state`` counter the progress bar counts (``tokens`` or ``step``).
        data_parallel: runs under torchrun (data parallel); reload_best: supports ``nan_policy=reload_best``;
        compiles: supports ``compile=true``.
        scalar_tags: TensorBoard scalar tags this task writes beyond :data:`nas.engine.tb.SCALAR_TAGS`.
        model_kwargs: the space factories' keywords this task's models need (e.g. ``num_classes``).
    """

    name: str = ""
    #: what the task is, in words, for messages ("sentence classification")
    title: str = ""
    kind: str = ""
    metric: str = ""
    direction: str = "minimize"
    bar_counter: str = "step"
    data_parallel: bool = False
    reload_best: bool = False
    compiles: bool = False
    scalar_tags: tuple = ()
    model_kwargs: tuple = ()
    #: counters this task adds to a run's ``state`` (reported in ``metrics.json`` as ``train_<name>``)
    counters: tuple = ()

    # -- configuration ----------------------------------------------------------------------------------------
    def check(self, cfg, space, job: str) -> None:
        """Refuse (ConfigError) what this task cannot run; ``job``: ``search`` or ``retraining``."""
        import inspect

        factory = space.build_supernet if job == "search" else space.freeze
        params = inspect.signature(factory).parameters
        missing = [key for key in self.model_kwargs if key not in params]
        if missing:
            raise ConfigError(self.unfit_space(cfg, missing))
        if cfg.compile and not self.compiles:
            raise ConfigError(f"compile=true: the {self.name} models have no compiled path; set compile=false")

    def unfit_space(self, cfg, missing: list) -> str:
        """The message of :meth:`check` for a space whose factories lack the keywords ``missing``."""
        return (f"space={cfg.space.name} cannot build a model for dataset={cfg.dataset.name} (task {self.name}: its "
                f"models take {', '.join(missing)}); choose a space that can, e.g. space=hybrid")

    def record_origin(self, genotype, cfg):
        """``genotype`` recording this task and the run's dataset (``train.py arch=`` takes them from it)."""
        return genotype.with_origin(self.name, cfg.dataset.name)

    # -- data ------------------------------------------------------------------------------------------------
    def prepare(self, cfg, device, alpha_split: Optional[str] = None, retrain: bool = False):
        """Load and check the splits; ``alpha_split`` names the one α is trained on (None when retraining).
        Raises nas.data.DataError for missing, malformed or too small data."""
        raise NotImplementedError

    def model_args(self, data) -> dict:
        """Keyword arguments of ``space.build_supernet`` / ``space.freeze`` besides the vocabulary size ``ntoken``
        (e.g. ``num_classes``); ``best.pt`` stores them, :func:`nas.engine.train.load_trained` passes them back."""
        raise NotImplementedError

    def describe(self, data) -> str:
        """A few words on the data for the start-of-run log line."""
        return ""

    # -- training --------------------------------------------------------------------------------------------
    def objective(self, cfg):
        """The weights' training objective ``f(model output, targets) -> loss`` (language models: cross-entropy +
        AR + TAR); the strategies use it for the weights (the virtual step of second-order DARTS), α is trained on the
        output's ``loss``."""
        raise NotImplementedError

    def position(self, cfg, data, np_rng, search: bool):
        """A new loop position (epoch 1, batch 0): where the loop is, all that a resume needs besides the weights,
        the optimizers and the random states.  It has ``epoch`` and ``batch`` (1-based epoch, steps done in it; the
        engine sets ``epoch`` for ``nan_policy=reload_best``), ``partial`` (the meter's figures of the epoch so far),
        ``advance(step, result, alpha_carry, partial)`` (after each step: the :class:`Step`, its :class:`StepResult`,
        what ``strategy.step`` returned -- a language model's α-batch hidden state, None when retraining -- and the
        meter's ``partial``), ``next_epoch()``, ``snapshot() -> dict`` (merged into the checkpoint) and
        ``restore(ckpt)``.  ``np_rng`` is the run's numpy generator (seeded; its state is restored by the engine only
        if the position snapshots it)."""
        raise NotImplementedError

    def batches(self, cfg, data, model, position, np_rng, search: bool) -> Iterator[Step]:
        """The rest of the current epoch's steps from ``position`` (the engine advances it after each step, before
        asking for the next).  A step's ``train`` and ``alpha`` batches are what the strategies take: they have
        ``inputs()`` (the model's positional inputs) and ``targets``; the model is called
        ``model(*batch.inputs(), weights, targets)`` and returns an output whose ``loss`` is the mean loss of the
        batch (α is trained on that loss, DARTS eq. 3-4) and, for a model that carries state across steps, ``hidden``
        (:class:`Batch`, :class:`SentenceInputs`)."""
        raise NotImplementedError

    def alpha_batches(self, cfg, data, model, n: int) -> list:
        """The first ``n`` batches of the α split, the same at every call, for the collapse diagnostics' Hessian of
        the validation loss (:mod:`nas.diagnostics`); empty: this task offers none (no eigenvalue is computed)."""
        return []

    def weight_step(self, model, optimizer, batch, cfg, weights=None) -> StepResult:
        """One weight update on ``batch`` (gradient clipped to ``cfg.clip``).
        Raises nas.errors.NonFiniteLossError when the loss or the gradient is NaN/inf (nothing updated then)."""
        raise NotImplementedError

    def meter(self, state: dict, writer, bar, log_every: int, partial):
        """The training-epoch meter, starting from ``partial`` (a resumed epoch).  The engine calls
        ``record_step(result, scalars)`` after each step; the meter must add 1 to ``state["step"]``, the step's cost to
        ``state["tokens"]`` and to each of :attr:`counters`, log the step's figures and ``scalars`` ({tag: value}) to
        TensorBoard (every ``log_every`` steps) and advance the progress ``bar``.  It also gives ``partial`` (the
        epoch so far, for the checkpoint), ``value`` (the epoch's training metric) and ``figures()`` (its history
        entries, e.g. ``{"train_ppl": ...}``)."""
        raise NotImplementedError

    def progress_bar(self, cfg, data, desc: str, state: dict):
        """A tqdm bar over the whole run, advanced to ``state`` (a resumed run)."""
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, model, data, split: str, cfg, weights=None, max_batches: Optional[int] = None):
        """Score ``split`` (``valid``, or ``score``: the split random_ws ranks paths on).  The result has the
        attribute :attr:`metric`, ``loss`` (mean cross-entropy, nats) and ``accuracy`` (fraction of predictions,
        tokens or sentences, whose top-1 class is the target; None where not counted)."""
        raise NotImplementedError

    def test(self, model, data, cfg):
        """Score the test split (the final report of a retraining)."""
        raise NotImplementedError

    def value(self, result) -> float:
        """The metric's value in an evaluation result."""
        return getattr(result, self.metric)

    def best_state(self, result) -> dict:
        """An epoch's validation figures as a retraining's ``state["best"]`` keeps them (with ``epoch``)."""
        return {self.metric: self.value(result), "loss": result.loss, "accuracy": result.accuracy}

    def selection_key(self, figures: dict) -> tuple:
        """Retraining keeps the epoch whose :meth:`best_state` has the largest key (default: the better metric,
        then the lower loss)."""
        value = figures[self.metric]
        return (value if self.direction == "maximize" else -value, -figures["loss"])

    def valid_figures(self, result) -> dict:
        """The validation figures of an epoch's history record (the metric, accuracy and cross-entropy)."""
        return {f"valid_{self.metric}": self.value(result), "valid_accuracy": result.accuracy,
                "valid_loss": result.loss}

    def best_figures(self, result) -> dict:
        """What ``best.pt`` records of its validation result (default: the history's :meth:`valid_figures`)."""
        return self.valid_figures(result)

    def test_metrics(self, cfg, data, valid, test, best_checkpoint: str) -> dict:
        """The task's own entries of a retraining's ``metrics.json`` besides ``test_<metric>`` and ``test_loss``."""
        return {}

    def fmt(self, value: float) -> str:
        """The metric's value for the log."""
        return f"{value:.4g}"

    # -- a tiny example, for tests and first tries ---------------------------------------------------------------
    def example(self, folder: str) -> list:
        """Write a tiny synthetic dataset of this task into ``folder`` and return the config overrides that run on it
        (dataset, its root, a space that builds this task's models); the registry-parametrized tests run every task's
        example through search, retraining and a black-box strategy."""
        raise NotImplementedError


#: the task of a dataset whose config does not name one (a run config saved before ``dataset.task`` existed)
LEGACY_TASKS = {"sst2": "classification"}


def task_name(cfg) -> str:
    """The task a run config names: ``dataset.task``, else the one its dataset had before that key existed."""
    return cfg.dataset.get("task") or LEGACY_TASKS.get(cfg.dataset.name, "language_modeling")


def make_task(cfg) -> Task:
    """The task of a run config.  Raises ConfigError for an unknown ``dataset.task``."""
    name = task_name(cfg)
    if name not in TASKS:
        raise ConfigError(f"dataset.task={name!r}; valid: {', '.join(TASKS.names())}")
    return TASKS.get(name)()
