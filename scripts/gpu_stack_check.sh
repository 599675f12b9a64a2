#!/usr/bin/env bash
# The test suite under the GPU machine's Python stack, on a machine without a GPU: the versions its
# image holds (.library/device/KINDS.md, 2026-11: Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# numpy 2.5.2, transformers 5.17.0, no trl) in a venv of their own (torch's CUDA wheel: about 5 GB),
# and a fresh clone of this repository built against that torch (_C_cuda too, where nvcc and its
# headers are). It finds version skew - APIs, builds, Triton's interpreter - before a GPU session's
# few minutes do. NUMPY="<2.4" runs triton 3.6's interpreter too (older interpreters cannot run
# the kernels with numpy >= 2.4: the triton backend then refuses CPU tensors and its tests skip).
# Usage: scripts/gpu_stack_check.sh [pytest args...]; the venv (VENV) is kept for later runs.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-/tmp/gpu-stack-venv}
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3.12}" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "accelerate==1.15.0" peft \
    pytest hypothesis pytest-benchmark tqdm matplotlib ruff "clang-format>=23,<24" "setuptools>=64" wheel ninja
fi
"$venv/bin/pip" install -q "numpy${NUMPY:-==2.5.2}"
clone=$(mktemp -d)
trap 'rm -rf "$clone"' EXIT
git clone -q "$repo" "$clone"
cd "$clone"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import torch, triton, numpy, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
