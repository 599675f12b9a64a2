#!/usr/bin/env bash
# One GPU session's checks, in order of value: build, the GPU tests, the benchmark (ops, host time,
# training steps), the model-shape table, a profile of the eager host path. Usage:
# scripts/gpu_check.sh OUTDIR [bench args...]. Every log lands in OUTDIR as it is written, so a
# run cut short still leaves what it finished; eight files at most (the device tool
# returns no more). Wheels under build/wheels (pytest-xdist, execnet) are installed first where
# present: the GPU machine has no registry to fetch them from. The whole run fits GPU_CHECK_BUDGET
# seconds (default 570: one device call may run 600): each step's timeout (the *_TIMEOUT variables,
# in seconds) is its own limit or what is left, whichever is less, so a slow step cuts the later ones
# short instead of the call losing them. pip runs verbose: setup.log keeps why an extension failed.
set -u
out=${1:?usage: scripts/gpu_check.sh OUTDIR [bench args...]}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
end=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))
limit() { local left=$((end - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
log="$out/setup.log"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  >"$log" 2>&1
t0=$SECONDS
ls build/wheels/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps build/wheels/*.whl >>"$log" 2>&1
python3 -m pip install -v --no-build-isolation --no-deps -e . >>"$log" 2>&1 || { tail -50 "$log"; exit 1; }
echo "install: $((SECONDS - t0)) s"; t0=$SECONDS
# setup.py builds the CUDA extension as optional: say at once whether it exists, and why not
python3 -c "from neft_kernels import _C_cuda; print('_C_cuda ABI', _C_cuda.ABI_VERSION)" 2>&1 \
  || grep -iE "error|failed" "$log" | head -20
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_WORKERS:-8}" || echo "")
# every gpu-marked test (none is also marked slow: that mark goes on the Triton interpreter's CPU runs)
timeout $(limit ${GPU_TESTS_TIMEOUT:-240}) python3 -m pytest -q -rfEs --tb=short $workers -m gpu \
  -p no:cacheprovider >"$out/tests-gpu.log" 2>&1
echo "gpu tests: rc=$? $((SECONDS - t0)) s"; grep -E "^(FAILED|ERROR)| passed| failed" "$out/tests-gpu.log" | tail -25
t0=$SECONDS
timeout $(limit ${BENCH_TIMEOUT:-240}) python3 -m neft_kernels.bench --no-progress --json "$out/bench.json" "$@" \
  >"$out/bench.txt" 2>&1
echo "bench: rc=$? $((SECONDS - t0)) s"; tail -30 "$out/bench.txt"; t0=$SECONDS
# the model-shape table one model at a time, each printed as it finishes (a timeout keeps the rest)
timeout $(limit ${MODELS_TIMEOUT:-200}) python3 - <<'PY' >"$out/models.txt" 2>&1
import torch
from neft_kernels.bench import models
from neft_kernels.bench.harness import compile_settings
for name in models.MODEL_SHAPES:
    with compile_settings():
        rows = models.run(torch.device("cuda"), [torch.float32, torch.bfloat16], models=[name], progress=False)
    print(models.table(rows), flush=True)
PY
echo "models: rc=$? $((SECONDS - t0)) s"; t0=$SECONDS
# where an eager call's host time goes (each piece timed alone, then torch's profiler over 300 calls),
# and its GPU time by kernel
timeout $(limit ${PROFILE_TIMEOUT:-210}) python3 - <<'PY' >"$out/host-profile.txt" 2>&1
import torch
from torch.profiler import ProfilerActivity, profile
from neft_kernels import noisy_embedding
from neft_kernels.bench import host
try:
    print(host.breakdown_table(host.breakdown(torch.device("cuda"), (2, 16, 64, 1000))), flush=True)
except Exception as err:  # the profile below still runs
    print(f"breakdown failed: {err!r}", flush=True)
weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
ids = torch.randint(0, 1000, (2, 16), device="cuda")
mask = torch.ones_like(ids)
mask[0, 8:] = 0
for _ in range(50):
    noisy_embedding(ids, weight, 5.0, seed=1, attention_mask=mask)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
    for _ in range(300):
        noisy_embedding(ids, weight, 5.0, seed=1, attention_mask=mask)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
print(prof.key_averages(group_by_stack_n=4).table(sort_by="self_cpu_time_total", row_limit=15))
# GPU time of each kernel of an eager bf16 forward with a mask, per backend: the scales launch
# against the rows one (what overlapping or fusing them could save), at a small and a large width
calls = 50
for backend in ("cuda", "triton"):
    for b, l, d, v in ((8, 2048, 576, 49152), (8, 1024, 4096, 32000)):
        try:
            w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
            ids = torch.randint(0, v, (b, l), device="cuda")
            mask = (torch.arange(l, device="cuda")[None] < torch.linspace(l // 2, l, b, device="cuda")[:, None]).long()
            for _ in range(10):
                noisy_embedding(ids, w, 5.0, seed=1, attention_mask=mask, backend=backend)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    noisy_embedding(ids, w, 5.0, seed=1, attention_mask=mask, backend=backend)
                torch.cuda.synchronize()
            print(f"== {backend} {b},{l},{d},{v} bf16 with a mask: GPU us per call, by kernel", flush=True)
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
                if e.device_time_total > 0:
                    print(f"{e.key[:90]:<90} {e.device_time_total / calls:9.2f} x{e.count / calls:.0f}", flush=True)
        except Exception as err:
            print(f"{backend} {b},{l},{d},{v}: {err!r}", flush=True)
# The backward with the pads one id (a quarter of the tokens in one run, summed in order by one
# block per column chunk) against the same batch with the pads' ids spread: is that run exposed?
from neft_kernels.backends import module
from neft_kernels.bench.impls import padded_batch
from neft_kernels.bench.measure import interleaved_times
for d, v in ((576, 49152), (4096, 128256)):
    try:
        ids, mask = padded_batch(8, 2048, v, torch.Generator().manual_seed(0))
        spread = torch.where(mask == 0, torch.randint(0, v, ids.shape), ids)
        grad = torch.randn(8 * 2048, d, device="cuda", dtype=torch.bfloat16)
        fns = {}
        for name, batch in (("pads one id", ids), ("pads spread", spread)):
            flat = batch.view(-1).cuda()
            fns[f"F.embedding, {name}"] = lambda flat=flat: torch.ops.aten.embedding_dense_backward(
                grad, flat, v, -1, False)
            for backend in ("cuda", "triton"):
                fns[f"{backend}, {name}"] = lambda flat=flat, b=backend: module(b).backward(grad, flat, v, None, False)
        times = interleaved_times(fns, torch.device("cuda"), reps=7, inner=5)
        print(f"== backward alone, 8x2048 padded, d={d}, V={v}, bf16, ms (median of 7): "
              + ", ".join(f"{k} {sorted(t)[3] * 1e3:.4f}" for k, t in times.items()), flush=True)
    except Exception as err:
        print(f"backward alone d={d}: {err!r}", flush=True)
# GPU time alone (graph replay) of the cuda forward with one scale, of its scales kernels alone and
# of both, with the launches overlapped (sm_90) and, in a second process, in order
# (NEFT_KERNELS_CUDA_PDL=0): what programmatic dependent launch saves
import os, subprocess, sys
GRAPH_TIMES = r"""
import torch
from neft_kernels import _C_cuda, noisy_embedding
from neft_kernels.backends import module
from neft_kernels.bench.measure import graph_ms
print("cuda launches overlap (programmatic dependent launch):", _C_cuda.overlaps_launches(0), flush=True)
for b, l, d, v in ((8, 2048, 576, 49152), (8, 1024, 4096, 32000), (1, 32768, 1152, 262144)):
    try:
        w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, v, (b, l), device="cuda")
        mask = (torch.arange(l, device="cuda")[None] < torch.linspace(l // 2, l, b, device="cuda")[:, None]).long()
        pos = (torch.arange(l, device="cuda") % 4096)[None].expand(b, l) if b == 1 else None
        side = {"position_ids": pos} if b == 1 else {"attention_mask": mask}
        times = {"rows alone": graph_ms(lambda: noisy_embedding(ids, w, 5.0, seed=1, backend="cuda")),
                 "scales alone": graph_ms(lambda: module("cuda").token_scales(
                     l, b * l, 5.0, d, side.get("attention_mask"), side.get("position_ids"), None,
                     device=torch.device("cuda"))),
                 "both": graph_ms(lambda: noisy_embedding(ids, w, 5.0, seed=1, backend="cuda", **side))}
        print(f"== cuda {b},{l},{d},{v} bf16 {next(iter(side))}, graph ms: "
              + ", ".join(f"{k} {t:.4f}" if t is not None else f"{k} -" for k, t in times.items()), flush=True)
    except Exception as err:
        print(f"graph times {b},{l},{d},{v}: {err!r}", flush=True)
"""
try:
    exec(GRAPH_TIMES)
except Exception as err:  # no CUDA extension: nothing to time
    print(f"graph times: {err!r}", flush=True)
try:
    in_order = subprocess.run([sys.executable, "-c", GRAPH_TIMES], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "NEFT_KERNELS_CUDA_PDL": "0"})
    print("-- the same with NEFT_KERNELS_CUDA_PDL=0:\n" + in_order.stdout + in_order.stderr[-1000:], flush=True)
except subprocess.TimeoutExpired as err:
    print(f"-- the same with NEFT_KERNELS_CUDA_PDL=0: {err!r}\n" + (err.stdout or b"").decode(), flush=True)
PY
echo "host profile: rc=$? $((SECONDS - t0)) s"
