#!/usr/bin/env bash
# One GPU session's checks, in order of value: build, the quick GPU tests, the benchmark (ops, host
# time, the model-shape table, training steps), then the slow GPU tests. Usage:
# scripts/gpu_check.sh OUTDIR [bench args...]. Every log lands in OUTDIR as it is written, so a run
# cut short still leaves what it finished. Wheels under build/wheels (pytest-xdist, execnet) are
# installed first where present: the GPU machine has no registry to fetch them from.
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR [bench args...]}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  >"$out/env.txt" 2>&1
t0=$SECONDS
ls build/wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps build/wheels/*.whl >"$out/wheels.log" 2>&1
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 || { tail -50 "$out/install.log"; exit 1; }
echo "install: $((SECONDS - t0)) s"; t0=$SECONDS
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_WORKERS:-6}" || echo "")
# the gpu-marked set is large (the spec grid on every CUDA backend): the quick part first, then the slow
timeout ${GPU_TESTS_TIMEOUT:-150} python3 -m pytest -q -rfEs $workers -m "gpu and not slow" -p no:cacheprovider \
  >"$out/tests-gpu.log" 2>&1
echo "gpu tests: rc=$? $((SECONDS - t0)) s"; tail -25 "$out/tests-gpu.log"; t0=$SECONDS
timeout ${BENCH_TIMEOUT:-240} python3 -m neft_kernels.bench --no-progress --json "$out/bench.json" --csv "$out/bench.csv" \
  --plot "$out/bench.png" "$@" >"$out/bench.txt" 2>&1
echo "bench: rc=$? $((SECONDS - t0)) s"; tail -30 "$out/bench.txt"; t0=$SECONDS
# the model-shape table one model at a time, each written as it finishes (a timeout keeps the rest)
timeout ${MODELS_TIMEOUT:-200} python3 - "$out" <<'PY' >"$out/models.txt" 2>&1
import json, sys, torch
from neft_kernels.bench import models
from neft_kernels.bench.harness import compile_settings
records = []
for name in models.MODEL_SHAPES:
    with compile_settings():
        rows = models.run(torch.device("cuda"), [torch.float32, torch.bfloat16], models=[name], progress=False)
    print(models.table(rows), flush=True)
    records += rows
    open(f"{sys.argv[1]}/models.json", "w").write(json.dumps(records, indent=1) + "\n")
PY
echo "models: rc=$? $((SECONDS - t0)) s"; t0=$SECONDS
timeout ${GPU_SLOW_TIMEOUT:-120} python3 -m pytest -q -rfEs $workers -m "gpu and slow" -p no:cacheprovider \
  >"$out/tests-gpu-slow.log" 2>&1
echo "gpu slow tests: rc=$? $((SECONDS - t0)) s"; tail -15 "$out/tests-gpu-slow.log"; t0=$SECONDS
# CPU coverage is CI's: here only the quick CPU set, as a smoke test of the GPU machine's install
timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -rfEs $workers -m "not gpu and not slow" -p no:cacheprovider \
  >"$out/tests.log" 2>&1
echo "other tests: rc=$? $((SECONDS - t0)) s"; tail -15 "$out/tests.log"
