#!/usr/bin/env bash
# Print requirements/lock.txt without the pins that belong to the default torch build (torch,
# torchvision, triton, the CUDA libraries): constraints for installing every other pin next to
# another torch (your CUDA, or a base image's). Used by scripts/setup.sh (FASTFACE_TORCH) and
# infra/Dockerfile.
set -euo pipefail
grep -v -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]*|cuda-[a-z-]*)==' "${1:-$(dirname "$0")/../requirements/lock.txt}"
