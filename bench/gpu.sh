#!/usr/bin/env bash
# The GPU bench on one H100/H200, offline, in under 8 minutes, writing JSON.
#
#   bench/gpu.sh wheels        # here (with the package registry): the wheels the GPU image lacks -> .whl/
#   bench/gpu.sh run [OUT]     # there: install them from .whl/ (no network), run the bench -> OUT/gpu_bench.json
#   bench/gpu.sh capacity [OUT]  # there, a second call: how far each mode's batch grows in the GPU's memory
#                                # (BERT-base and GPT-2-medium, ZeRO 2, fitted at B and 2B) -> OUT/gpu_capacity.json
#
# The GPU image has torch, transformers, peft and accelerate (Python 3.12); it lacks DeepSpeed (sdist only
# on PyPI: built here into a pure-Python wheel, its ops JIT-compiled there if needed), Opacus, hjson and
# pydantic (pytest too, in case). What runs: first tests/privacy/test_device_noise.py (the CUDA noise
# sampler's draws and one DP step whose noise is rebuilt from the key), then bench/dp_step.py at the GPU
# shapes (BERT-base classifier, GPT-2-medium and a 1B Llama causal LM; bf16), ZeRO 2 and 3, one rank,
# with the cost model's bound next to each ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
case ${1:-run} in
  wheels)
    PY=${PY:-.venv/bin/python}
    mkdir -p "$WHEELS"
    # --no-deps: exactly these, one version each (the image has the rest).
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" opacus==1.6.0 hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
        typing-inspection==0.4.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8
    ls -la "$WHEELS" ;;
  run|capacity)
    OUT=${2:-${OUT:-bench}}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, transformers, deepspeed, opacus; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'deepspeed', deepspeed.__version__, 'opacus', opacus.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
    if [ "$1" = capacity ]; then
      timeout 540 python3 bench/dp_step.py --models bert,gpt2 --stages 2 --batch-capacity --child-timeout 120 \
          --json "$OUT/gpu_capacity.json" 2>&1 | tee "$OUT/gpu_capacity.log"
      exit 0
    fi
    # The device noise sampler first (about a minute): the bench's DP rows draw their noise with it.
    DS_ACCELERATOR=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/privacy/test_device_noise.py 2>&1 \
        | tee "$OUT/gpu_tests.txt" || true
    # 3 shapes x 2 stages x (non-DP, flat, per_layer) + Opacus on BERT, each a fresh process with its own
    # warm-up: about 6 minutes estimated for the first 14 processes, so the 20 may reach the timeout (420 s,
    # after the tests' two minutes at most) and lose Llama's last ZeRO-3 rows. The JSON is rewritten after
    # every stage, so a run cut short keeps what it measured; one failed mode is recorded and the rest go on.
    timeout 420 python3 bench/dp_step.py --models bert,gpt2,llama --stages 2,3 --child-timeout 150 \
        --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log" ;;
  *) echo "usage: bench/gpu.sh wheels | run [OUT] | capacity [OUT]" >&2; exit 2 ;;
esac
