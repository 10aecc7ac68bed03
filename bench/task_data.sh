# Sourced by the bench scripts: `task_data TASK SPLIT` sets DATA, the data.* overrides of a task.
#   TASK: sst2 | yelp-stars | yelp-category | yelp-pair
#   SPLIT: test (what docs/RESULTS.md reports on: SST-2's dev set, the Yelp tasks' test.csv) or
#          val (for choosing defaults: bench/sst2_val.py's val_long.csv, the Yelp tasks' val.csv)
# Yelp tasks are built first by bench/yelp_tasks.py (train/val from dev.csv, test = test.csv).
YELP=${YELP:-runs/yelp_tasks}
SST2_VAL=${SST2_VAL:-runs/val13_sst2}
PY=${PY:-.venv/bin/python}

task_data() {
  local task=$1 split=$2 name
  local stars="['Review Stars: 1.0', 'Review Stars: 2.0', 'Review Stars: 3.0', 'Review Stars: 4.0', 'Review Stars: 5.0']"
  local categories="['Business Category: Arts & Entertainment', 'Business Category: Bars', 'Business Category: Beauty & Spas', \
'Business Category: Event Planning & Services', 'Business Category: Grocery', 'Business Category: Health & Medical', \
'Business Category: Home & Garden', 'Business Category: Hotels & Travel', 'Business Category: Restaurants', \
'Business Category: Shopping']"
  case $task:$split in
    sst2:test) DATA=(data.task=sst2 data.data_dir=../shared/data/glue data.max_train_samples=20000 data.max_length=48) ;;
    sst2:val)
      [ -f "$SST2_VAL/val_long.csv" ] || "$PY" bench/sst2_val.py ../shared/data/glue "$SST2_VAL"
      DATA=(data.task=csv "data.train_file=$SST2_VAL/train.csv" "data.eval_file=$SST2_VAL/val_long.csv"
            data.max_length=48 "data.label_names=['0','1']") ;;
    yelp-*:test|yelp-*:val)
      [ -f "$YELP/stars/train.csv" ] || "$PY" bench/yelp_tasks.py ../shared/data/yelp "$YELP"
      name=${task#yelp-}
      DATA=(data.task=csv "data.train_file=$YELP/$name/train.csv" "data.eval_file=$YELP/$name/$split.csv" data.max_length=64)
      case $name in
        stars) DATA+=("data.label_names=$stars") ;;
        category) DATA+=("data.label_names=$categories") ;;
        pair) DATA+=(data.text_pair_column=category "data.label_names=['mismatch', 'match']") ;;
        *) echo "unknown task $task" >&2; return 2 ;;
      esac ;;
    *) echo "unknown task $task or split $split (sst2, yelp-stars, yelp-category, yelp-pair; test, val)" >&2; return 2 ;;
  esac
}
