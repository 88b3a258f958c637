"""Images/s per metric, batched vs one by one, measured in one run (tiny random CLIP + aesthetic head, dlib, CPU).

    .venv/bin/python benchmarks/bench_metrics.py [--images 48] [--batch-size 16] [--size 256] [--device cpu]

The tiny CLIP is ~3000x smaller than ViT-L/14, so these numbers show the runner's
overheads and what batching buys per call, not real-model throughput. Face
metrics run dlib image by image in both modes (a fresh detection cache per run).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastface.metrics.aesthetic import save_tiny_aesthetic_head
from fastface.metrics.base import MetricInput
from fastface.metrics.clip_models import load_clip_model, save_tiny_clip
from fastface.metrics.common import FaceAnalysis
from fastface.metrics.runner import score_images

METRICS = ("clip", "ae", "fsc", "id", "ffc", "face_size")


def sample_inputs(count: int, size: int, seed: int = 0) -> list[MetricInput]:
    """Tom Hanks (from the insightface wheel) pasted at random places on noise, with stylistic prompts."""
    spec = importlib.util.find_spec("insightface")
    photo = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"
    face = np.asarray(Image.open(photo).convert("RGB"))
    rng = np.random.default_rng(seed)
    inputs = []
    for index in range(count):
        canvas = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size - face.shape[0], size=2)
        canvas[y : y + face.shape[0], x : x + face.shape[1]] = face
        prompt = f"style {index % 7}; person number {index} in a park"
        inputs.append(MetricInput(image=canvas, prompt=prompt, source_image=face, key=str(index)))
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from fastface.faces import get_face_backend

    with tempfile.TemporaryDirectory() as tmp:
        clip = load_clip_model(save_tiny_clip(Path(tmp) / "clip"), device=args.device)
        head = save_tiny_aesthetic_head(Path(tmp) / "head.pth", clip.embed_dim)
        backend = get_face_backend("dlib")
        inputs = sample_inputs(args.images, args.size)
        print(f"{args.images} images {args.size}x{args.size}, device {args.device}, torch threads {torch.get_num_threads()}")
        print(f"{'metric':<10} {'batched img/s':>14} {'one-by-one img/s':>17} {'speed-up':>9}")
        for metric in METRICS:
            rates = {}
            for batch_size in (args.batch_size, 1):
                options = dict(clip=clip, aesthetic_checkpoint=head, faces=FaceAnalysis(backend), progress=False)
                score_images(inputs[:2], [metric], batch_size=batch_size, **options)  # warm-up
                options["faces"] = FaceAnalysis(backend)  # no cached detections in the timed run
                start = time.perf_counter()
                rows = score_images(inputs, [metric], batch_size=batch_size, **options)
                rates[batch_size] = len(inputs) / (time.perf_counter() - start)
                errors = [r["error"] for r in rows if r["error"]]
                if errors:
                    raise RuntimeError(f"{metric}: {errors[0]}")
            print(f"{metric:<10} {rates[args.batch_size]:>14.1f} {rates[1]:>17.1f} {rates[args.batch_size] / rates[1]:>8.2f}x")


if __name__ == "__main__":
    main()
