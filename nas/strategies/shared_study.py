"""Calls into an Optuna study that other workers share, made safe against what those workers do meanwhile.

Another worker can change a trial under this one's feet: a worker paused longer than ``grace_period`` (a
scheduler's suspend, SIGSTOP, a swapping machine) finds its running trial marked FAIL by whoever looked
(``optuna.storages.fail_stale_trials``); two workers can draw the same genotype at the same moment.  Optuna then
raises (``ValueError: Cannot tell a FAIL trial``, ``UpdateFinishedTrialError``).  The functions here turn each
such state into a defined outcome, never a traceback (issue 16, cases r03 and r04):

* a finished result for a trial that was failed meanwhile is kept: added to the study as a new COMPLETE trial
  with the same params and distributions (:func:`record_result`), once, however often it is retried;
* a worker restarted with ``resume=`` takes its own interrupted trial back (:func:`own_trials`), so it goes on from
  that trial's checkpoint instead of leaving it to go stale;
* random search never draws a genotype the study already holds and ends when every genotype is evaluated
  (:func:`unseen_choice`), counted over every worker's trials.

User attributes this module reads and writes on the study's trials: ``proposed`` (its params are complete),
``worker`` (host and run dir of the worker that proposed it), ``train_tokens`` (the training tokens its result
cost, a pruned trial's included; summed for a study-wide ``budget_tokens``), ``pruned_at`` (the epoch a PRUNED trial
was stopped at), ``evaluated`` (a FAIL trial whose training ran and gave no
finite value: its genotype counts as evaluated), ``replaces`` (the number of the failed trial whose result this
COMPLETE trial carries), ``duplicate_of`` (a FAIL trial that drew a genotype another worker drew first), ``over_budget`` (a FAIL trial asked
after other workers had filled the study's budget: nothing trained, see ``BayesianStrategy._beyond_budget``).
"""
from __future__ import annotations

import logging
import math
import socket
from typing import Optional

import numpy as np

from nas.genotype import enumerate_decisions, sample_decisions

log = logging.getLogger(__name__)

#: enumerate the unseen genotypes (instead of rejection sampling) in spaces up to this size
ENUMERATE_UP_TO = 100_000


def worker_id(run_dir: str) -> str:
    """``host:run dir``: which worker proposed a trial (a restarted worker knows its own trials by it)."""
    return f"{socket.gethostname()}:{run_dir}"


def _finished_error():
    import optuna

    # Optuna raises ValueError ("Cannot tell a FAIL trial.") when it sees the state first, and
    # UpdateFinishedTrialError when another worker finished the trial between its check and its write
    return (ValueError, optuna.exceptions.UpdateFinishedTrialError)


def record_result(study, trial, value: Optional[float], train_tokens: int) -> int:
    """Finish ``trial`` (an ``optuna.trial.Trial`` of ``study``) with ``value``, whatever another worker did to it.

    ``value``: a float, or a list of floats (a study of several objectives).  None or non-finite: the trial ends FAIL (``evaluated`` set, so its genotype is not drawn again).
    A finite value for a trial still RUNNING is told as usual.  If another worker marked the trial FAIL
    meanwhile (its heartbeat was late: this worker was paused), the result is kept: a new COMPLETE trial with the
    trial's params, distributions and user attributes plus ``replaces`` is added, logged as one line; if such a
    replacement exists already (this call retried after a crash) nothing is added.  A trial found COMPLETE
    already (told before this process was killed) is left as it is.
    Args: ``train_tokens``: the result's cost (user attribute ``train_tokens``).
    Returns: the number of the study trial that holds the result (the replacement's, when one was added).
    Raises: ValueError / UpdateFinishedTrialError only if the trial is still RUNNING after Optuna refused it.
    """
    import optuna

    State = optuna.trial.TrialState
    # several objectives: a list of values, finite only when every one is
    finite = value is not None and all(v is not None and math.isfinite(v)
                                       for v in (value if isinstance(value, (list, tuple)) else [value]))
    try:
        trial.set_user_attr("train_tokens", int(train_tokens))
        if finite:
            study.tell(trial, value)
        else:
            trial.set_user_attr("evaluated", True)
            study.tell(trial, state=State.FAIL)
        return trial.number
    except _finished_error():
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == State.RUNNING:  # refused for another reason: not ours to hide
            raise
    if frozen.state == State.COMPLETE or not finite:
        if frozen.state != State.COMPLETE:
            log.info("trial %d of the study had been marked failed already; it failed here too (value %s)",
                     frozen.number, value)
        return frozen.number
    # FAIL (or PRUNED) by another worker: keep the result as a new trial with the same decisions
    existing = replacement_of(study, frozen.number)
    if existing is None:
        attrs = {**frozen.user_attrs, "train_tokens": int(train_tokens), "replaces": frozen.number}
        study.add_trial(optuna.trial.create_trial(params=frozen.params, distributions=frozen.distributions,
                                                  values=list(value) if isinstance(value, (list, tuple))
                                                  else [value], user_attrs=attrs))
        existing = replacement_of(study, frozen.number)
        log.warning("trial %d of the study was marked failed by another worker while this one was paused (no "
                    "heartbeat within grace_period); its finished result (value %s) is recorded as new trial %d",
                    frozen.number, value, existing)
    return existing


def record_pruned(study, trial, epoch: int, train_tokens: int) -> int:
    """Finish ``trial`` as PRUNED at ``epoch`` (user attributes ``pruned_at`` and ``train_tokens``, its cost so far).
    A trial another worker marked FAIL meanwhile (this one was paused past the grace period) stays FAIL: a pruned
    result is no result to keep (one log line).  Returns the trial's number."""
    import optuna

    try:
        trial.set_user_attr("train_tokens", int(train_tokens))
        trial.set_user_attr("pruned_at", int(epoch))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except _finished_error():
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == optuna.trial.TrialState.RUNNING:
            raise
        log.info("trial %d of the study was %s already when it was pruned at epoch %d", frozen.number,
                 frozen.state.name, epoch)
    return trial.number


def replacement_of(study, number: int) -> Optional[int]:
    """The number of the COMPLETE trial that carries failed trial ``number``'s result, or None."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("replaces") == number:
            return t.number
    return None


def spent_tokens(study) -> int:
    """Training tokens of every result in the study (COMPLETE and PRUNED trials and evaluated FAIL ones), each
    counted once (a failed trial whose result was re-added holds no ``train_tokens`` of its own)."""
    import optuna

    State = optuna.trial.TrialState
    return sum(int(t.user_attrs.get("train_tokens", 0))
               for t in study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.FAIL)))


def own_trials(study, me: str, recorded: set) -> list:
    """This worker's trials that its ``trials.jsonl`` does not record (``recorded``: the ``study_trial`` numbers it
    does): what a killed incarnation of this worker left, newest last."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("worker") == me and t.number not in recorded]


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def holds(trial) -> Optional[str]:
    """``"done"`` for a trial whose genotype is evaluated (COMPLETE, PRUNED -- the pruner has judged it --, or FAIL
    with ``evaluated``), ``"running"`` for one being trained (RUNNING with complete params), else None (a dead
    worker's or a discarded trial)."""
    import optuna

    State = optuna.trial.TrialState
    if trial.state in (State.COMPLETE, State.PRUNED) or (trial.state == State.FAIL and trial.user_attrs.get("evaluated")):
        return "done"
    if trial.state == State.RUNNING and trial.user_attrs.get("proposed"):
        return "running"
    return None


def taken(trials) -> tuple:
    """``(done, running)``: the keys of the genotypes the study has evaluated and of those being trained now,
    not evaluated yet (:func:`holds`)."""
    done = {_key(t.params) for t in trials if holds(t) == "done"}
    running = {_key(t.params) for t in trials if holds(t) == "running"}
    return done, running - done


def unseen_choice(space, size: int, trials, rng: np.random.Generator):
    """A draw of ``space``'s active decisions (a dict; :func:`nas.genotype.sample_decisions`, each decision uniform)
    restricted to the genotypes the study neither evaluated nor is training (:func:`taken`); ``"wait"`` when the only
    ones left are being trained by other workers (one may die and its genotype come free); None when every genotype
    of the space (``size``) is evaluated.

    Rejection sampling while most of the space is free, else (spaces up to :data:`ENUMERATE_UP_TO`) a uniform draw
    from the enumerated rest (:func:`nas.genotype.enumerate_decisions`).
    """
    done, running = taken(trials)
    used = done | running
    if len(used) >= size:
        return "wait" if running else None
    if len(used) <= size // 2 or size > ENUMERATE_UP_TO:
        while True:
            choice = sample_decisions(space, lambda name, choices: choices[rng.integers(len(choices))])
            if _key(choice) not in used:
                return choice
    free = [c for c in enumerate_decisions(space) if _key(c) not in used]
    return free[rng.integers(len(free))]
