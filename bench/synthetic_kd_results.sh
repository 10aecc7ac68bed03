#!/usr/bin/env bash
# DP distillation through synthetic text (Flemings & Annavaram 2024) and the paper's baselines on Yelp
# (../shared/data/yelp: dev.csv private training set, test.csv test set), each its own run tree at
# total epsilon 2, SmolLM2-135M teacher (DP-LoRA), student = every other teacher layer (15 of 30).
# Rows: pre-trained student (no training), DP-SGD student, DPKD (teacher eps 1 + DP-SGD student with
# KD eps 1), student on the synthetic text without KD, the method. Test perplexity (docs/RESULTS.md).
#
#   bench/synthetic_kd_results.sh [OUT]        SAMPLES=1000 EPOCHS=3 (CPU cuts; the paper: N, 14)
#   ROWS=dpkd,dpsgd bench/synthetic_kd_results.sh [OUT]   only these trees (two such jobs may share an
#                                                         OUT if their ROWS do not overlap)
#
# CPU cuts (configs/smollm2_yelp.yaml): 1,000 of dev.csv's reviews, 64-token context, 200 test texts,
# 1 teacher epoch; SAMPLES synthetic reviews of at most 64 new tokens; EPOCHS student epochs.
set -euo pipefail
OUT=${1:-runs/skd}
SAMPLES=${SAMPLES:-1000}
EPOCHS=${EPOCHS:-3}
PY=${PY:-.venv/bin/python}
DPC=${DPC:-.venv/bin/dpc}
BASE=(configs/smollm2_yelp.yaml "run.output_dir=$OUT" privacy.target_epsilon=2)
INIT=$OUT/student_init
# runs/skd/method was started before two defaults changed (issue 13) that none of its phases use; set
# METHOD_RESUME="distill.trainable=[bias,LayerNorm,norm,ln_,pooler,classifier,score] head_init.mean_noise_multiplier=20"
# to resume such a tree (a fresh OUT needs nothing).
METHOD_RESUME=${METHOD_RESUME:-}
ROWS=${ROWS:-pretrained,method,nokd,dpkd,dpsgd}
mkdir -p "$OUT"
want() { [[ ",$ROWS," == *",$1,"* ]]; }
# A tree is skipped when it is finished or not asked for.
done_() { [ -f "$OUT/$1/eval/results.json" ] || ! want "$1"; }

# The student's initialisation: every other layer of the pre-trained model (public weights).
[ -f "$INIT/config.json" ] || "$PY" - "$INIT" <<'PYEOF'
import sys
from dist_dpc.compress.distill import student_from_teacher
from dist_dpc.models import ModelConfig, load_tokenizer
from dist_dpc.models.loading import load_causal_lm
cfg = ModelConfig(name="smollm2", task="causal_lm")
tok = load_tokenizer(cfg, log=None)
student = student_from_teacher(load_causal_lm(cfg, tok, seed=0))
student.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1])
PYEOF
# 1. pre-trained student, no training
[ -f "$OUT/pretrained.json" ] || ! want pretrained || "$PY" bench/lm_perplexity.py "${BASE[@]}" run.name=pretrained --model "$INIT" \
    --json "$OUT/pretrained.json"
# 2. the method: DP teacher (0.95 of the budget), DP histogram (0.05), generation, KD on synthetic text
done_ method || "$DPC" pipeline "${BASE[@]}" run.name=method \
    "pipeline.phases=[teacher, histogram, generate, distill_synthetic, eval]" \
    "pipeline.budget_split={teacher: 0.95, histogram: 0.05}" histogram.samples=$SAMPLES \
    generate.max_new_tokens=64 generate.no_repeat_ngram_size=2 distill_synthetic.epochs=$EPOCHS \
    distill_synthetic.eval_every=20 $METHOD_RESUME
# 3. the student on the same synthetic text without KD (lambda = 0): imports the samples' cost
done_ nokd || "$DPC" pipeline "${BASE[@]}" run.name=nokd "pipeline.phases=[distill_synthetic, eval]" \
    "pipeline.budget_split={}" "distill_synthetic.samples=$OUT/method/generate" distill_synthetic.kd_weight=0 \
    distill_synthetic.epochs=$EPOCHS distill_synthetic.eval_every=20
# 4. DPKD: DP teacher at epsilon 1, then DP-SGD of the student with the token KD loss at epsilon 1
done_ dpkd || "$DPC" pipeline "${BASE[@]}" run.name=dpkd "pipeline.phases=[teacher, distill, eval]" \
    "pipeline.budget_split={teacher: 0.5, distill: 0.5}" distill.alpha=0.4 distill.temperature=1.0 \
    "distill.trainable=[layers, norm]" distill.lr=5e-4
# 5. DP-SGD student: DP fine-tuning of all its layers (the cut model needs more than adapters), epsilon 2
[ -f "$OUT/dpsgd/results.json" ] || ! want dpsgd || "$DPC" train "${BASE[@]}" run.name=dpsgd "model.name=$INIT" model.lora=null "model.trainable=[layers, norm]" train.lr=5e-4 \
    "privacy.public_model_dirs=[$INIT]"
for f in pretrained.json dpsgd/results.json dpkd/eval/results.json nokd/eval/results.json method/eval/results.json; do
  [ -f "$OUT/$f" ] || { echo "table: $OUT/$f is not there yet"; exit 0; }
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
def ev(tree, phase):
    rows = {r["phase"]: r for r in json.load(open(f"{out}/{tree}/eval/results.json"))["models"]}
    r = rows[phase]; return r["metrics"]["validation"]["perplexity"], r["epsilon"]
pre = json.load(open(f"{out}/pretrained.json"))
dpsgd = json.load(open(f"{out}/dpsgd/results.json"))
rows = [("pre-trained student (no training)", pre["perplexity"], None),
        ("DP-SGD student (all layers)", dpsgd["metrics"]["validation"]["perplexity"], dpsgd["epsilon"]),
        ("DPKD (teacher eps/2 + DP-SGD KD student eps/2)", *ev("dpkd", "distill")),
        ("synthetic text, no KD (lambda 0)", *ev("nokd", "distill_synthetic")),
        ("synthetic text + KD (the method)", *ev("method", "distill_synthetic")),
        ("(the method's DP teacher, 30 layers)", *ev("method", "teacher"))]
print("| model | test perplexity | epsilon |\n|---|---|---|")
for name, ppl, eps in rows:
    print(f"| {name} | {ppl:.2f} | {'-' if eps is None else f'{eps:.3f}'} |")
PYEOF
