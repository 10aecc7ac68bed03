#!/usr/bin/env bash
# DP-LoRA fine-tune of SmolLM2-135M on the Yelp control-code data (dev.csv = private training set,
# test.csv = test set) at epsilon 2, with test perplexity before and after (docs/RESULTS.md).
# Cut to fit this 2-core CPU: 1,000 training examples (a seeded subset of dev.csv), 64-token context,
# expected batch 32, 1 epoch (31 DP steps), 200 test texts scored in 64-token windows of stride 32.
set -euo pipefail
OUT=${1:-runs/smollm2-yelp}
PY=${PY:-.venv/bin/python}
DPC=${DPC:-.venv/bin/dpc}
ARGS=(configs/smollm2_yelp.yaml "run.output_dir=$(dirname "$OUT")" "run.name=$(basename "$OUT")")
mkdir -p "$OUT"
[ -f "$OUT/before.json" ] || "$PY" bench/lm_perplexity.py "${ARGS[@]}" --json "$OUT/before.json"
[ -f "$OUT/results.json" ] || "$DPC" train "${ARGS[@]}"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
before = json.load(open(f"{out}/before.json"))
after = json.load(open(f"{out}/results.json"))
m = after["metrics"]["validation"]
print(f"test perplexity before {before['perplexity']:.2f}, after DP-LoRA {m['perplexity']:.2f} "
      f"(epsilon {after['epsilon']:.3f}, delta {after['delta']:.3g}, {after['steps']} steps, "
      f"{after['train_seconds'] / 60:.1f} min training; {m['tokens']} test tokens)")
PYEOF
