#!/usr/bin/env bash
# Set up FastFace in ./.venv and run the main job (the smoke evaluation on tiny built-in models).
#   bash scripts/setup.sh                 # install + run the smoke evaluation
#   bash scripts/setup.sh --install-only  # install only (what CI does before the tests)
# Torch: FASTFACE_TORCH (default "torch==2.14.1 torchvision==0.29.1") — set it to match your CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${FASTFACE_TORCH:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install -q -e ".[all,test]"
if [ "${1:-}" = "--install-only" ]; then
  echo "fastface installed in .venv"
  exit 0
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="${PREFECT_HOME:-$PWD/runs/.prefect}"
mkdir -p "$PREFECT_HOME"
exec .venv/bin/fastface evaluate --config configs/smoke.yaml --root runs/smoke
