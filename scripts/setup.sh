#!/usr/bin/env bash
# Set up .venv for the benchmark and the tests on a fresh machine.
# torch is installed first and pinned to the CPU wheel on this machine's disk: any other spec
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then  # already set up: keep it
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
# Python 3.12+ venvs come without setuptools, which the build below needs.
.venv/bin/pip install --quiet "setuptools>=64"
# No build isolation: the extensions compile against the torch installed above (an isolated
# build would fetch its own torch).
.venv/bin/pip install --quiet --no-build-isolation -e ".[test,bench]"
