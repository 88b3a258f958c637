#!/usr/bin/env bash
# Set up FastFace in ./.venv from the lock file and run the main job (the smoke evaluation on
# tiny built-in models).
#   bash scripts/setup.sh                 # install + run the smoke evaluation
#   bash scripts/setup.sh --install-only  # install only (what CI does before the tests)
# Installs with uv (taken from PATH or bootstrapped from PyPI into .tools/), or with pip and
# the lock as constraints where uv cannot be had (FASTFACE_INSTALLER=pip forces that); both
# write bytecode at install time.
# Torch: the lock pins torch==2.14.1 / torchvision==0.29.1; FASTFACE_TORCH="torch==X torchvision==Y"
# installs another build (for your CUDA) and keeps every other pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
source scripts/_sources.sh
LOCK=requirements/lock.txt
CONSTRAINTS="$LOCK"
TORCH="${FASTFACE_TORCH:-$FASTFACE_DEFAULT_TORCH}"
if [ -n "${FASTFACE_TORCH:-}" ]; then
  # torch's own pins (CUDA libraries, triton) belong to the default build: drop them.
  CONSTRAINTS="$(mktemp)"
  bash scripts/lock-without-torch.sh "$LOCK" > "$CONSTRAINTS"
fi
start=$(date +%s)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -n "$UV" ] && [ "${FASTFACE_INSTALLER:-uv}" = uv ]; then
  # --compile-bytecode: uv leaves .py files uncompiled, and where PYTHONDONTWRITEBYTECODE is set
  # (as on CI) every process — each Ray worker, each flow subprocess — would compile torch,
  # diffusers and prefect again: `import fastface.pipeline` took 40 s of CPU instead of 14 s.
  # shellcheck disable=SC2086
  "$UV" pip install -q --compile-bytecode --python .venv/bin/python "${UV_SOURCES[@]}" -c "$CONSTRAINTS" \
    $TORCH -e ".[all,test]"
else
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q -c "$CONSTRAINTS" $TORCH -e ".[all,test]"
fi
echo "fastface installed in .venv ($(( $(date +%s) - start )) s)"
if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME="${PREFECT_HOME:-$PWD/runs/.prefect}"
mkdir -p "$PREFECT_HOME"
exec .venv/bin/fastface evaluate --config configs/smoke.yaml --root runs/smoke
