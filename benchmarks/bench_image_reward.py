"""Batched vs one-by-one ImageReward throughput (small random model, CPU, one process).

    .venv/bin/python benchmarks/bench_image_reward.py [--images 64] [--batch-size 16] [--threads 2]

One-by-one is what the original package does (one forward per image). The model here is small
(ViT width 128 / depth 4 at 224 px, text tower 128 wide, 2 layers), so per-call overhead weighs
more than with ViT-L; on a GPU the gap is larger still.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastface.metrics.image_reward import ImageRewardScorer, VisionTowerConfig, preprocess_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the random checkpoint builder
from image_reward_builders import write_random_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="best of N, interleaved (shared machines are noisy)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    vision = VisionTowerConfig(width=128, depth=4, heads=4, patch_size=16, image_size=224)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 320, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = [f"a portrait of a person, style {i % 7}, oil painting" for i in range(args.images)]
    with tempfile.TemporaryDirectory() as d:
        write_random_checkpoint(d, vision=vision, text_hidden=128, text_layers=2, text_heads=4, text_intermediate=512)
        scorer = ImageRewardScorer(d, vision=vision, device="cpu", batch_size=args.batch_size)

    pixels = torch.stack([preprocess_image(im, vision.image_size) for im in images])
    scorer.score_tensors(pixels[:2], prompts[:2])  # warm-up

    def timed(fn) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    bs = args.batch_size
    run_batched = lambda: np.concatenate(  # noqa: E731
        [scorer.score_tensors(pixels[i : i + bs], prompts[i : i + bs]) for i in range(0, len(images), bs)]
    )
    run_single = lambda: np.concatenate(  # noqa: E731
        [scorer.score_tensors(pixels[i : i + 1], prompts[i : i + 1]) for i in range(len(images))]
    )
    times_b, times_s, times_e2e = [], [], []
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
        t, batched = timed(run_batched)
        times_b.append(t)
        t, single = timed(run_single)
        times_s.append(t)
        times_e2e.append(timed(lambda: scorer.score(images, prompts))[0])
    t_batched, t_single, t_batched_e2e = min(times_b), min(times_s), min(times_e2e)
    n = len(images)
    print(f"images={n} batch_size={bs} threads={args.threads} max|batched-single|={np.abs(batched - single).max():.2e}")
    print(f"model only:  batched {n / t_batched:8.1f} img/s   one-by-one {n / t_single:8.1f} img/s")
    print(f"end to end (incl. preprocessing) batched: {n / t_batched_e2e:8.1f} img/s")
    print(f"batched/one-by-one throughput ratio: {t_single / t_batched:.2f}x")


if __name__ == "__main__":
    main()
