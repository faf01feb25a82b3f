#!/usr/bin/env bash
# Create .venv and install exegpt with its test extras. Idempotent.
# torch is pinned first so pip takes the CPU build where one is offered (never CUDA here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
TORCH_SPEC=${EXEGPT_TORCH_SPEC:-torch==2.13.0}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet "$TORCH_SPEC"
fi
.venv/bin/pip install --quiet -e '.[test]'
