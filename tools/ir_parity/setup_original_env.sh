#!/usr/bin/env bash
# Create a separate virtual environment that runs the original `image-reward` 1.5 package.
# Usage: bash tools/ir_parity/setup_original_env.sh [VENV_DIR]   (default /tmp/ir-venv)
#
# image-reward 1.5 is pinned to an old stack: its BLIP code imports helpers that
# transformers 5 removed (transformers.file_utils, modeling_utils.apply_chunking_to_forward),
# timm 0.6.x's old module layout, fairscale, and at package import time also
# `clip` (OpenAI CLIP, on PyPI as openai-clip), diffusers, accelerate and datasets (ReFL.py).
# torch is pinned to the 2.14.1 wheel that lies on this machine's disk.
set -euo pipefail
VENV="${1:-/tmp/ir-venv}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import ImageReward, torch; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
    echo "original env ready: $VENV"; exit 0
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -q --disable-pip-version-check"
$PIP "pip<25" "setuptools>=77.0.3,<81" wheel
$PIP torch==2.14.1 torchvision==0.29.1 "numpy<2"
# fairscale is an sdist whose setup.py imports torch: build it against the torch above.
$PIP --no-build-isolation fairscale==0.4.13
# torch/torchvision repeated so that the resolver cannot swap them for other (downloaded) builds.
$PIP image-reward==1.5 torch==2.14.1 torchvision==0.29.1 \
    transformers==4.36.2 tokenizers==0.15.2 huggingface-hub==0.20.3 timm==0.6.13 \
    diffusers==0.25.1 accelerate==0.25.0 datasets==2.16.1 "fsspec<=2023.10.0" \
    openai-clip==1.0.1 ftfy regex "numpy<2" "setuptools>=77.0.3,<81" "pyarrow<18"  # clip imports pkg_resources (gone in setuptools 81); pyarrow 18+ needs numpy 2
"$VENV/bin/python" -c "import ImageReward, transformers; print('original env ready:', transformers.__version__)"
