#!/usr/bin/env bash
# docs/RESULTS.md rows for one task with the default recipe: a standard non-private fine-tune, the
# recipe without privacy, the DP teacher (epsilon 2 of a tree's 4) and its DPKD student, then
# structured / unstructured / 2:4 DPIMP from the DP teacher, each its own run tree at total epsilon 4.
#
#   bench/recipe_results.sh TASK [OUT] [overrides...]
#   TASK: sst2 | yelp-stars | yelp-category | yelp-pair          ROWS=standard,recipe,dp,... (default: all but dpkd)
#
# Yelp tasks are built first by bench/yelp_tasks.py (train/val from dev.csv, test = test.csv); every
# number reported is on the test split (SST-2: its dev set), which no choice was made on.
set -euo pipefail
TASK=$1; shift
OUT=${1:-runs/recipe/$TASK}; shift || true
EXTRA=("$@")
DPC=${DPC:-.venv/bin/dpc}
PY=${PY:-.venv/bin/python}
ROWS=${ROWS:-standard,recipe,dp,structured,unstructured,two-four}
source "$(dirname "$0")/task_data.sh"
task_data "$TASK" test

BASE=(configs/recipe.yaml run.output_dir=$OUT "${DATA[@]}")
TEACHER=$OUT/dp/teacher/model
want() { [[ ",$ROWS," == *",$1,"* ]]; }
run() { name=$1; shift; want "$name" || return 0
        [ -f "$OUT/$name/eval/results.json" ] && { echo "== $name: done"; return; }
        echo "== $name: $*"; "$DPC" pipeline "${BASE[@]}" run.name=$name "$@" "${EXTRA[@]}"; }

# The reference a user would run without privacy: full fine-tuning, lr 5e-5, batch 32, 2 epochs, the model's own
# dropout (as from_pretrained gives it).
run standard pipeline.phases=[teacher,eval] pipeline.budget_split={} privacy.enabled=false model.lora=null \
    model.dropout=null model.freeze_embeddings=false train.lr=5e-5 train.batch_size=32 train.micro_batch_size=32 train.epochs=2 \
    train.lr_schedule=constant train.warmup_steps=0 head_init.centre_pooler=false head_init.probe_epochs=0
# The recipe without clipping or noise.
run recipe pipeline.phases=[teacher,eval] pipeline.budget_split={} privacy.enabled=false
# DP teacher (epsilon 2 of 4) and its DPKD student (the rest), one tree.
run dp pipeline.phases=[teacher,distill,eval] "pipeline.budget_split={teacher: 0.5, distill: 0.5}"
# Another DPKD student of the DP teacher above, its own tree importing the teacher's cost (not in the
# default ROWS: after a change of the distill defaults, ROWS=dpkd measures the new student alone).
run dpkd pipeline.phases=[distill,eval] pipeline.budget_split={} distill.teacher=$TEACHER
# DPIMP from the DP teacher, each tree importing its cost.
run structured pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=structured prune.target_layers=3 \
    prune.rounds=3 prune.source=$TEACHER
run unstructured pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=unstructured \
    prune.target_sparsity=0.5 prune.rounds=2 prune.source=$TEACHER
run two-four pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=2:4 prune.rounds=1 prune.source=$TEACHER
"$PY" bench/recipe_table.py "$OUT"
