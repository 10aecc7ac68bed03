#!/usr/bin/env bash
# docs/RESULTS.md "Privacy audit": `dpc audit` (white-box gradient canaries, one run) of the default
# recipe's DP-SGD settings (configs/recipe.yaml: batch 512, 6 epochs, AdamW, per-layer clipping, Poisson)
# on SST-2's training-set size (N = 67,349; only N is used, no example is read into the audit),
# at epsilon 1, 2, 4, 8 and without privacy; 1,000 canaries, 95 % confidence.
#
#   bench/audit_results.sh [OUT] [overrides...]        (WORLD=2 ZERO=2: under torchrun on two ranks)
set -euo pipefail
OUT=${1:-runs/audit}; shift || true
EXTRA=("$@")
PY=${PY:-.venv/bin/python}
WORLD=${WORLD:-1}
ZERO=${ZERO:-0}
BASE=(configs/recipe.yaml run.output_dir=$OUT data.task=sst2 data.data_dir=../shared/data/glue
      train.zero_stage=$ZERO wandb.mode=offline)
run() {
  if [ "$WORLD" = 1 ]; then "$PY" -m dist_dpc.cli audit "${BASE[@]}" "$@" "${EXTRA[@]}"
  else "$PY" -m torch.distributed.run --nproc_per_node "$WORLD" -m dist_dpc.train --phase audit "${BASE[@]}" "$@" "${EXTRA[@]}"; fi
}
for eps in 1 2 4 8; do run run.name=eps$eps privacy.target_epsilon=$eps; done
run run.name=nonprivate privacy.enabled=false
"$PY" - "$OUT" <<'PY'
import json, sys, pathlib
import numpy as np
from dist_dpc.privacy.audit import audit_lower_bound
out = pathlib.Path(sys.argv[1])
# The audit reports its configured test (audit.test, default f_dp); the other test is computed here
# from the same scores and coins, for comparison only (reporting the better of the two would be a
# selection the confidence does not cover).
print("| claimed epsilon | epsilon_lb, f-DP test (95 %) | best test: statistic, guesses / correct | ceiling "
      "| epsilon_lb, (epsilon, delta) test | its ceiling | sigma | q | steps |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for name in ["eps1", "eps2", "eps4", "eps8", "nonprivate"]:
    a = json.loads((out / f"{name}-audit" / "audit" / "audit.json").read_text())
    r = json.loads((out / f"{name}-audit" / "audit" / "results.json").read_text())
    best = max(a["tests"], key=lambda t: t["epsilon_lb"])
    other = audit_lower_bound({k: np.asarray(v) for k, v in a["scores"].items()}, np.asarray(a["inclusion"], bool),
                              a["delta"], a["confidence"], [t for t in sorted({t["fraction"] for t in a["tests"]}
                                                                              | set(a["dropped_fractions"]))],
                              test="one_run")
    claimed = "non-private" if a["claimed_epsilon"] is None else f"{a['claimed_epsilon']:.3f}"
    print(f"| {claimed} | {a['epsilon_lb']:.3f} | {best['score']}, {best['guesses']} / {best['correct']} | "
          f"{a['ceiling']:.2f} | {other['epsilon_lb']:.3f} | {other['ceiling']:.2f} | {a['noise_multiplier']:.3f} | "
          f"{a['sample_rate']:.5f} | {r['steps']} |")
PY
