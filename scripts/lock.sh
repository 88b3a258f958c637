#!/usr/bin/env bash
# Refresh requirements/lock.txt: every package of `.[all,test,gpu]` plus the default torch, pinned,
# for CPython 3.11 on Linux x86-64 (setup and CI install `.[all,test]` with it as constraints; the GPU
# image adds the `gpu` extra's onnxruntime-gpu at its pinned version). Run after changing pyproject.toml.
#   bash scripts/lock.sh            # resolve again, keeping pins where they still fit
#   bash scripts/lock.sh --upgrade  # move every pin to the newest release that fits
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_sources.sh
printf '%s\n' ${FASTFACE_DEFAULT_TORCH} > requirements/torch.in
export UV_CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
"$UV" pip compile pyproject.toml requirements/torch.in --extra all --extra test --extra gpu \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  "${UV_SOURCES[@]}" "$@" -o requirements/lock.txt
