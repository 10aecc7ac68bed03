#!/usr/bin/env bash
# Every row of docs/RESULTS.md, one run tree per released model (each at total epsilon 4: the DP
# teacher's cost is imported into the trees built on it). Usage: bench/sst2_results.sh [OUT] [overrides...]
set -euo pipefail
OUT=${1:-runs/results}; shift || true
DPC=${DPC:-.venv/bin/dpc}
CFG=configs/sst2_compress.yaml
TEACHER=$OUT/teacher/teacher/model
run() { name=$1; shift; [ -f "$OUT/$name/eval/results.json" ] && { echo "== $name: done"; return; }
        echo "== $name: $*"; "$DPC" pipeline $CFG run.output_dir=$OUT run.name=$name "$@" "${EXTRA[@]}"; }
EXTRA=("$@")
# DP teacher (epsilon 2 of the 4) and its DPKD student (the remaining budget), one tree.
run teacher
# DP-SGD-only student: the same 3-layer init from the DP teacher, no distillation term.
run baseline pipeline.phases=[distill,eval] pipeline.budget_split={} distill.alpha=0 distill.teacher=$TEACHER
# The same two students with the last teacher layer in place of layer 4 (the head reads the last
# layer; structured pruning keeps it too -- docs/RESULTS.md), each in its own tree on the DP teacher.
run kd-last pipeline.phases=[distill,eval] pipeline.budget_split={} distill.layer_map=[0,2,5] distill.teacher=$TEACHER
run baseline-last pipeline.phases=[distill,eval] pipeline.budget_split={} distill.alpha=0 distill.layer_map=[0,2,5] \
    distill.teacher=$TEACHER
# DPIMP from the DP teacher: structured to 3 layers, unstructured 50 %, 2:4.
run structured pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=structured prune.target_layers=3 \
    prune.rounds=3 prune.epochs=1 prune.source=$TEACHER
run unstructured pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=unstructured \
    prune.target_sparsity=0.5 prune.rounds=2 prune.epochs=0.5 prune.source=$TEACHER
run two-four pipeline.phases=[prune,eval] pipeline.budget_split={} prune.method=2:4 prune.rounds=1 prune.epochs=0.5 \
    prune.source=$TEACHER
# Non-private reference (no guarantee at all): the teacher's recipe without clipping or noise.
run nonprivate pipeline.phases=[teacher,eval] pipeline.budget_split={} privacy.enabled=false
.venv/bin/python bench/results_table.py "$OUT"
