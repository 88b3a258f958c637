"""Measure the opt-in AM2 branch skipping (``approximate_am2_skipping=True``).

AM2's min-max normalisation couples every guidance branch of an image, so the exact
method evaluates all three branches at each step. Skipping the branches DCG does not
weigh anyway saves UNet rows but changes the normalisation statistics. This prints,
per preset, the UNet rows per image and the image difference against the exact run.

    python benchmarks/bench_am2_skipping.py [--images 8] [--size 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fastface.pipeline import FastFacePipeline, load_faceid_adapter
from fastface.tiny import ensure_tiny_models


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tiny-root", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = ensure_tiny_models(args.tiny_root)
    pipe = FastFacePipeline.from_pretrained(models.sdxl, torch_dtype=torch.float32, default_guidance=1.0)
    load_faceid_adapter(pipe, models.adapter, image_encoder=models.image_encoder)
    rng = np.random.default_rng(0)
    ids = rng.normal(size=(args.images, models.id_embed_dim)).astype(np.float32)
    ids /= np.linalg.norm(ids, axis=1, keepdims=True)
    crops = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(args.images)]
    prompts = [f"pixel art; person {i} in a park" for i in range(args.images)]
    kw = dict(id_embeds=ids, face_crops=crops, seeds=list(range(args.images)), height=args.size, width=args.size,
              output_type="np")
    print(f"{'preset':8} {'rows/img exact':>15} {'rows/img approx':>16} {'time ratio':>11} "
          f"{'mean |Δ|':>10} {'max |Δ|':>9} {'Δ vs baseline':>14}")
    base = pipe(prompts, preset="baseline", **kw).images
    for preset in ("am2", "ff-am2"):
        t0 = time.perf_counter()
        exact = pipe(prompts, preset=preset, **kw)
        t1 = time.perf_counter()
        approx = pipe(prompts, preset=preset, approximate_am2_skipping=True, **kw)
        t2 = time.perf_counter()
        d = np.abs(exact.images - approx.images)
        print(f"{preset:8} {exact.metadata[0]['unet_rows']:>15} {approx.metadata[0]['unet_rows']:>16} "
              f"{(t2 - t1) / (t1 - t0):>11.2f} {d.mean():>10.2e} {d.max():>9.2e} "
              f"{np.abs(exact.images - base).mean():>14.2e}")


if __name__ == "__main__":
    main()
