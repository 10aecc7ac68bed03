#!/usr/bin/env bash
# One DPIMP tree of the default recipe (epsilon 4, importing its source's cost) on a task's
# VALIDATION split, for choosing the pruning defaults without looking at any split docs/RESULTS.md
# reports on. SOURCE: a DP teacher trained on the same task's training split, e.g.
# runs/val_teacher/sst2-NAME/teacher/model from bench/val_teacher.sh (whose eval scored it on the
# same split, which gives the gap).
#
#   bench/val_prune.sh TASK NAME SOURCE [overrides...]     (OUT=runs/val_prune by default)
#   TASK: yelp-stars | yelp-category | yelp-pair | sst2;  unstructured 50 %, 2 rounds unless overridden
#
# bench/val_teacher.sh with the prune phase instead of the teacher (later overrides win).
set -euo pipefail
TASK=$1; NAME=$2; SOURCE=$3; shift 3
OUT=${OUT:-runs/val_prune} exec "$(dirname "$0")/val_teacher.sh" "$TASK" "$NAME" \
  "pipeline.phases=[prune,eval]" privacy.target_epsilon=4 prune.method=unstructured \
  prune.target_sparsity=0.5 prune.rounds=2 "prune.source=$SOURCE" "$@"
