"""Parity of fastface.metrics.image_reward with the original image-reward 1.5 package.

Run from the repository root with the project's venv:

    .venv/bin/python tools/ir_parity/parity.py [--venv /tmp/ir-venv] [--work /tmp/ir-parity] [--cases tiny vitl]

It (1) creates the original's venv if needed (setup_original_env.sh), (2) writes the fixture
images and (image, prompt) pairs to tests/data/image_reward/, (3) for each case writes random
weights from a fixed seed in the official ImageReward.pt + med_config.json layout (plus a local
bert-base-uncased/vocab.txt), (4) scores the pairs with the original (run_original.py, in its venv)
and with ours (here), and (5) records both, the tokens and the max abs diff in
tests/data/image_reward/parity_<case>.json. Exits 1 if any diff exceeds 1e-4.

Cases: ``vitl`` is the original as shipped (ViT-L/16 fixed; 2-layer text tower of width 768, which
its MLP(768) requires); ``tiny`` has the original build a 32-wide, 2-deep ViT through the same
code (run_original.py swaps create_vit's sizes) so that the normal test suite can regenerate it
in a second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fastface.metrics.image_reward import VIT_L16, VisionTowerConfig  # noqa: E402
from image_reward_builders import write_random_checkpoint  # noqa: E402

DATA = ROOT / "tests" / "data" / "image_reward"
TOLERANCE = 1e-4

# Parameters of each case; tests/test_image_reward.py regenerates the same weights from them.
CASES = {
    "tiny": dict(
        vision=VisionTowerConfig(width=32, depth=2, heads=4, patch_size=16, image_size=224),
        text_hidden=768, text_layers=1, text_heads=12, text_intermediate=256, seed=1,
    ),
    "vitl": dict(vision=VIT_L16, text_hidden=768, text_layers=2, text_heads=12, text_intermediate=1024, seed=0),
}  # fmt: skip

PROMPTS = [
    "a portrait of an old man, oil painting",
    "Cyberpunk style; person in the CITY at night, neon lighting, highly detailed, 8k, trending on artstation",
    "watercolor; a young woman reading a book in a café garden",
    "a photo of a child with a red hat and a dog on the beach at sunset, close up, soft light, sharp focus, "
    "masterpiece, by a famous artist, cinematic, realistic, beautiful, high quality, golden hour, bokeh, 35mm",
    "pixel art; boy walking (in the rain) — naïve style!",
    "",
]


def make_images(folder: Path, seed: int = 7) -> list[Path]:
    """Small PNGs in several modes and sizes, so that resize, crop and RGB conversion are exercised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def pattern(h: int, w: int, c: int) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y) + rng.uniform(0, 6)) for _ in range(c)]
        img = (np.stack(chans, -1) * 0.45 + 0.5) * 255 + rng.normal(0, 6, (h, w, c))
        return np.clip(img, 0, 255).astype(np.uint8)

    specs = [
        ("rgb_wide_downscale.png", "RGB", 240, 300),  # shorter side 240 -> 224 (antialiased bicubic)
        ("rgb_tall_upscale.png", "RGB", 90, 60),
        ("rgba.png", "RGBA", 80, 96),
        ("gray_exact224.png", "L", 224, 224),  # no resize at all
        ("palette.png", "P", 70, 70),
        ("rgb_odd_crop.png", "RGB", 57, 101),  # odd crop offsets (round-half-even)
    ]
    paths = []
    for name, mode, h, w in specs:
        if mode == "L":
            img = Image.fromarray(pattern(h, w, 1)[..., 0], "L")
        elif mode == "RGBA":
            img = Image.fromarray(pattern(h, w, 4), "RGBA")
        elif mode == "P":
            img = Image.fromarray(pattern(h, w, 3), "RGB").quantize(colors=16)
        else:
            img = Image.fromarray(pattern(h, w, 3), "RGB")
        path = folder / name
        img.save(path, optimize=True)
        paths.append(path)
    return paths


def pairs_for(images: list[Path]) -> list[tuple[str, str]]:
    """Each image with two prompts (relative names, as stored in pairs.json)."""
    return [(p.name, PROMPTS[(2 * i + k) % len(PROMPTS)]) for i, p in enumerate(images) for k in range(2)]


def run_case(name: str, venv: Path, work: Path, pairs: list[tuple[str, str]]) -> dict:
    import torch
    import transformers

    from fastface.metrics.image_reward import ImageRewardScorer

    params = CASES[name]
    ckpt_dir = write_random_checkpoint(work / name, **params)
    tok_dir = ckpt_dir / "bert-base-uncased"
    tok_dir.mkdir(exist_ok=True)
    shutil.copy(ckpt_dir / "vocab.txt", tok_dir / "vocab.txt")
    abs_pairs = [(str(DATA / "images" / img), prompt) for img, prompt in pairs]
    (work / "pairs.json").write_text(json.dumps(abs_pairs))

    cmd = [str(venv / "bin" / "python"), str(ROOT / "tools" / "ir_parity" / "run_original.py"),
           "--checkpoint-dir", str(ckpt_dir), "--pairs", str(work / "pairs.json"), "--out", str(work / f"{name}_original.json")]  # fmt: skip
    vision: VisionTowerConfig = params["vision"]
    if vision != VIT_L16:
        cmd += ["--vision-width", str(vision.width), "--vision-depth", str(vision.depth), "--vision-heads", str(vision.heads)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    t_original = time.time() - t0
    original = json.loads((work / f"{name}_original.json").read_text())

    t0 = time.time()
    scorer = ImageRewardScorer(ckpt_dir, vision=vision, device="cpu", batch_size=4)
    ours = scorer.score([p for p, _ in abs_pairs], [t for _, t in abs_pairs])
    t_ours = time.time() - t0
    our_ids = scorer.tokenize([t for _, t in abs_pairs])[0].tolist()

    diff = float(np.max(np.abs(ours - np.array(original["scores"]))))
    record = {
        "case": name,
        "params": {**{k: v for k, v in params.items() if k != "vision"}, "vision": asdict(vision)},
        "pairs": pairs,
        "original": {"scores": original["scores"], "versions": original["versions"], "seconds": round(t_original, 1)},
        "ours": {
            "scores": ours.tolist(),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
            "seconds": round(t_ours, 1),
        },
        "token_ids_equal": our_ids == original["token_ids"],
        "max_abs_diff": diff,
        "tolerance": TOLERANCE,
    }
    (DATA / f"parity_{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[{name}] original {original['versions']} vs ours transformers {transformers.__version__}")
    for (img, prompt), a, b in zip(pairs, original["scores"], ours):
        print(f"  {a:+.6f} {b:+.6f}  {img}  {prompt[:40]!r}")
    print(f"[{name}] max abs diff {diff:.3g} (tolerance {TOLERANCE}); tokens equal: {record['token_ids_equal']}")
    return record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=Path("/tmp/ir-venv"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ir-parity"))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()

    subprocess.run(["bash", str(ROOT / "tools" / "ir_parity" / "setup_original_env.sh"), str(args.venv)], check=True)
    images = make_images(DATA / "images")
    pairs = pairs_for(images)
    (DATA / "pairs.json").write_text(json.dumps(pairs, indent=1, ensure_ascii=False) + "\n")
    args.work.mkdir(parents=True, exist_ok=True)
    records = [run_case(name, args.venv, args.work, pairs) for name in args.cases]
    bad = [r["case"] for r in records if r["max_abs_diff"] > TOLERANCE or not r["token_ids_equal"]]
    if bad:
        print(f"PARITY FAILED for {bad}")
        return 1
    print("parity OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
