#!/usr/bin/env bash
# Set up a virtualenv in .venv and run the offline demo: build a tiny random Stable Diffusion
# model, train a 2-vector embedding on the bundled sample images, and load the result into a
# PyTorch diffusers pipeline. Needs only python3 (3.11 or 3.12) and pip; no GPU, no Hub access.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1
.venv/bin/python scripts/demo.py "$@"
