#!/usr/bin/env bash
# Set up .venv for the benchmark and the tests on a fresh machine.
# torch is installed first and pinned to the CPU wheel on this machine's disk: any other spec
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then  # already set up: keep it
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
# The editable install below serves Python edits as they are; it is redone (rebuilding the C++
# extensions, a minute or more) only when what it builds from or with has changed since.
stamp=.venv/.neft_kernels-install
inputs=$( (find scripts/setup.sh setup.py pyproject.toml MANIFEST.in csrc -type f -print0 | LC_ALL=C sort -z |
             xargs -0r sha256sum
           env | { grep -E '^(NEFT_KERNELS_BUILD_[A-Z]*|TORCH_CUDA_ARCH_LIST|CUDA_HOME|CUDA_PATH)=' || true; } |
             LC_ALL=C sort
           command -v nvcc || true
           .venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda)"
         ) | sha256sum)
built=neft_kernels._C_cpu  # what a build leaves (a clean of the tree removes it)
[ "${NEFT_KERNELS_BUILD_EXT:-1}" = 0 ] && built=neft_kernels
# -I: not from the source tree in the current directory, from the venv's install
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs" ] && (cd / && "$root/.venv/bin/python" -I -c "import $built") 2>/dev/null; then
  exit 0
fi
rm -f "$stamp"
# Python 3.12+ venvs come without setuptools, which the build below needs.
.venv/bin/pip install --quiet "setuptools>=64"
# No build isolation: the extensions compile against the torch installed above (an isolated
# build would fetch its own torch).
.venv/bin/pip install --quiet --no-build-isolation -e ".[test,bench]"
echo "$inputs" > "$stamp"
