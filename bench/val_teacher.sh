#!/usr/bin/env bash
# One DP teacher of the default recipe (epsilon 2) on a task's VALIDATION split, for choosing
# defaults without looking at any split docs/RESULTS.md reports on.
#
#   bench/val_teacher.sh TASK NAME [overrides...]      (OUT=runs/val_teacher by default)
#   TASK: yelp-stars | yelp-category | yelp-pair | sst2 (bench/sst2_val.py's carve: train.csv, val_long.csv)
#
# The model is scored on the validation split; results land in OUT/NAME/eval.
set -euo pipefail
TASK=$1; NAME=$2; shift 2
OUT=${OUT:-runs/val_teacher}
DPC=${DPC:-.venv/bin/dpc}
PY=${PY:-.venv/bin/python}
YELP=${YELP:-runs/yelp_tasks}
SST2_VAL=${SST2_VAL:-runs/val13_sst2}

stars="['Review Stars: 1.0', 'Review Stars: 2.0', 'Review Stars: 3.0', 'Review Stars: 4.0', 'Review Stars: 5.0']"
categories="['Business Category: Arts & Entertainment', 'Business Category: Bars', 'Business Category: Beauty & Spas', \
'Business Category: Event Planning & Services', 'Business Category: Grocery', 'Business Category: Health & Medical', \
'Business Category: Home & Garden', 'Business Category: Hotels & Travel', 'Business Category: Restaurants', \
'Business Category: Shopping']"
case $TASK in
  sst2)
    [ -f "$SST2_VAL/val_long.csv" ] || "$PY" bench/sst2_val.py ../shared/data/glue "$SST2_VAL"
    DATA=(data.task=csv "data.train_file=$SST2_VAL/train.csv" "data.eval_file=$SST2_VAL/val_long.csv"
          data.max_length=48 "data.label_names=['0','1']") ;;
  yelp-*)
    [ -f "$YELP/stars/train.csv" ] || "$PY" bench/yelp_tasks.py ../shared/data/yelp "$YELP"
    name=${TASK#yelp-}
    DATA=(data.task=csv "data.train_file=$YELP/$name/train.csv" "data.eval_file=$YELP/$name/val.csv" data.max_length=64)
    case $name in
      stars) DATA+=("data.label_names=$stars") ;;
      category) DATA+=("data.label_names=$categories") ;;
      pair) DATA+=(data.text_pair_column=category "data.label_names=['mismatch', 'match']") ;;
      *) echo "unknown task $TASK" >&2; exit 2 ;;
    esac ;;
  *) echo "unknown task $TASK (sst2, yelp-stars, yelp-category, yelp-pair)" >&2; exit 2 ;;
esac

exec "$DPC" pipeline configs/recipe.yaml "run.output_dir=$OUT" "run.name=$NAME" "${DATA[@]}" \
  "pipeline.phases=[teacher,eval]" "pipeline.budget_split={}" privacy.target_epsilon=2 "$@"
