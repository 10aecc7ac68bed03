#!/usr/bin/env bash
# One DP teacher of the default recipe (epsilon 2) on a task's VALIDATION split, for choosing
# defaults without looking at any split docs/RESULTS.md reports on.
#
#   bench/val_teacher.sh TASK NAME [overrides...]      (OUT=runs/val_teacher by default)
#   TASK: yelp-stars | yelp-category | yelp-pair | sst2 (bench/sst2_val.py's carve: train.csv, val_long.csv)
#
# The model is scored on the validation split; results land in OUT/NAME/eval. Overrides come last
# and win (bench/val_prune.sh runs a pruning tree through this script).
set -euo pipefail
TASK=$1; NAME=$2; shift 2
OUT=${OUT:-runs/val_teacher}
DPC=${DPC:-.venv/bin/dpc}
PY=${PY:-.venv/bin/python}
source "$(dirname "$0")/task_data.sh"
task_data "$TASK" val

exec "$DPC" pipeline configs/recipe.yaml "run.output_dir=$OUT" "run.name=$NAME" "${DATA[@]}" \
  "pipeline.phases=[teacher,eval]" "pipeline.budget_split={}" privacy.target_epsilon=2 "$@"
