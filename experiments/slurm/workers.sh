#!/bin/bash
# Bayesian optimization with 16 workers on SLURM (one job each, Hydra's submitit launcher), sharing one Optuna
# study on a PostgreSQL server that every node can reach.  Run from the repository root on the login node:
#   NAS_STORAGE=postgresql://nas@dbhost:5432/nas bash experiments/slurm/workers.sh
# See experiments/slurm/README.md (creating the database, following the study, a dead worker).
set -euo pipefail
: "${NAS_STORAGE:?set NAS_STORAGE to the PostgreSQL URL of the study, e.g. postgresql://nas@dbhost:5432/nas}"
STUDY=${STUDY:-ptb_bayesian_$(date +%Y%m%d_%H%M%S)}

python search.py -m hydra/launcher=slurm \
  hydra.launcher.partition="${PARTITION:-gpu}" hydra.launcher.timeout_min=720 \
  'worker=range(16)' \
  strategy=bayesian strategy.sampler=tpe strategy.trials="${TRIALS:-400}" strategy.trial_epochs=1 \
  strategy.storage="$NAS_STORAGE" strategy.study_name="$STUDY" \
  space.emsize=300 space.nhid=300 batch_size=64 progress=false
