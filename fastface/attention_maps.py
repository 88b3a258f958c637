"""Identity-attention maps (the paper's Fig. 5/6), captured from the processors that generate.

:class:`AttentionMapRecorder` is handed to the pipeline (``pipe(..., attention_recorder=rec)``);
the attention processors of :mod:`fastface.attention` pass it the identity-attention
probabilities each layer uses at each step (after AM where AM is active), so nothing here
recomputes attention. It keeps, per UNet part and step, the conditional branch's map
(ε(text, id), the last rows of the batch) averaged over heads and over the layers of that part,
per identity token. :func:`render_grid` draws presets side by side; ``fastface attention-maps``
does both from the command line.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fastface.face_backends import FACE_BACKENDS
from fastface.presets import TABLE_IP_ADAPTER_SCALE

MAP_PARTS = ("down", "up")


@dataclass
class AttentionMapRecorder:
    """Receives ``record(layer, part, step, probs, num_images)`` from the attention processors.

    ``probs`` is ``[B, heads, L, T]`` with B = branches × images (branch-major); the last
    ``num_images`` rows are the fully conditioned branch. ``latent_hw`` gives the aspect ratio
    of the latent, so that L = h·w of each layer can be folded back into a map.
    """

    latent_hw: tuple[int, int] = (1, 1)
    parts: tuple[str, ...] = MAP_PARTS
    _maps: dict[tuple[str, int], list] = field(default_factory=dict)

    def record(self, layer: str, part: str, step: int, probs: Any, num_images: int) -> None:
        if part not in self.parts:
            return
        cond = probs[-num_images:].float().mean(dim=1)  # [N, L, T], mean over heads
        n, length, tokens = cond.shape
        h, w = self._fold(length)
        self._maps.setdefault((part, step), []).append(
            cond.transpose(1, 2).reshape(n, tokens, h, w).detach().cpu())

    def _fold(self, length: int) -> tuple[int, int]:
        lh, lw = self.latent_hw
        h = round(math.sqrt(length * lh / lw))
        if h <= 0 or length % h:
            raise ValueError(f"cannot fold {length} positions into a {lh}:{lw} map")
        return h, length // h

    def maps(self) -> dict[tuple[str, int], np.ndarray]:
        """``(part, step) → [N, T, H, W]``: mean over the part's layers, each upsampled to the part's finest map."""
        import torch
        import torch.nn.functional as F

        out = {}
        for key, layers in self._maps.items():
            h = max(m.shape[-2] for m in layers)
            w = max(m.shape[-1] for m in layers)
            stacked = torch.stack([F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
                                   if m.shape[-2:] != (h, w) else m for m in layers])
            out[key] = stacked.mean(dim=0).numpy()
        return out


@dataclass(frozen=True)
class GridLayout:
    """Where each map sits in :func:`render_grid`'s image: rows (preset, token) × columns (part, step)."""

    rows: tuple[tuple[str, int], ...]
    columns: tuple[tuple[str, int], ...]
    cell: int
    left: int
    top: int

    def box(self, row: int, column: int) -> tuple[int, int, int, int]:
        x = self.left + column * self.cell
        y = self.top + row * self.cell
        return x + 1, y + 1, x + self.cell - 1, y + self.cell - 1


def render_grid(maps: dict[str, dict[tuple[str, int], np.ndarray]], *, image: int = 0,
                tokens: Sequence[int] | None = None, cell: int = 72) -> tuple[Any, GridLayout]:
    """A PNG-ready grid: one row per (preset, identity token), one column per (UNet part, step).

    Colours share one scale per column and token across presets (viridis), so a preset that
    scales the map (AM1's ×1.5) shows brighter, not just differently shaped.
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    presets = list(maps)
    columns = sorted({key for m in maps.values() for key in m}, key=lambda k: (MAP_PARTS.index(k[0]), k[1]))
    n_tokens = next(iter(next(iter(maps.values())).values())).shape[1]
    tokens = list(range(n_tokens)) if tokens is None else [int(t) for t in tokens]
    rows = [(p, t) for p in presets for t in tokens]
    left, top = 150, 28
    layout = GridLayout(tuple(rows), tuple(columns), cell, left, top)
    canvas = Image.new("RGB", (left + cell * len(columns), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    cmap = colormaps["viridis"]
    for c, (part, step) in enumerate(columns):
        draw.text((left + c * cell + 4, 8), f"{part} s{step}", fill="black")
        for t in tokens:
            values = [maps[p][(part, step)][image, t] for p in presets if (part, step) in maps[p]]
            lo, hi = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
            for r, (preset, token) in enumerate(rows):
                if token != t or (part, step) not in maps[preset]:
                    continue
                m = maps[preset][(part, step)][image, t]
                scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
                rgb = (cmap(scaled)[..., :3] * 255).astype(np.uint8)
                x1, y1, x2, y2 = layout.box(r, c)
                canvas.paste(Image.fromarray(rgb).resize((x2 - x1, y2 - y1), Image.NEAREST), (x1, y1))
    for r, (preset, token) in enumerate(rows):
        draw.text((6, top + r * cell + cell // 2 - 6), f"{preset} / token {token}", fill="black")
    return canvas, layout


def capture_attention_maps(pipe: Any, *, prompt: str, id_embed: np.ndarray, face_crop: np.ndarray,
                           presets: Sequence[str], seed: int = 0, steps: int | None = None, size: int | None = None,
                           ip_adapter_scale: float = TABLE_IP_ADAPTER_SCALE, lora_scale: float = 1.0) -> dict[str, dict]:
    """Generate once per preset (same seed, so the same noise) and return each preset's recorded maps."""
    height = width = size or pipe.default_sample_size * pipe.vae_scale_factor
    out = {}
    for preset in presets:
        recorder = AttentionMapRecorder(latent_hw=(height, width))
        pipe(prompt, id_embeds=[id_embed], face_crops=[face_crop], preset=preset, seeds=[seed],
             num_inference_steps=steps or 4, height=height, width=width, ip_adapter_scale=ip_adapter_scale,
             lora_scale=lora_scale, output_type="np", attention_recorder=recorder)
        out[preset] = recorder.maps()
    return out


# -- the `fastface attention-maps` subcommand --------------------------------------------------
def add_attention_maps_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="hyper", help="checkpoint name (`fastface models`; default: %(default)s)")
    parser.add_argument("--face", required=True, action="append",
                        help="identity photo (repeat for several photos of one person)")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--preset", action="append", required=True, help="preset to show (repeat: one row each)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None, help="image height = width (default: the model's)")
    parser.add_argument("--ip-adapter-scale", type=float, default=TABLE_IP_ADAPTER_SCALE)
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--token", type=int, action="append", default=None,
                        help="identity token(s) to show (default: all)")
    parser.add_argument("--face-backend", choices=FACE_BACKENDS.names(), default=None,
                        help="identity embedder (default: insightface for real models, dlib for tiny-*)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cache-dir", default=None)


def run_attention_maps(args: argparse.Namespace) -> int:
    from fastface.cache import identities_dir
    from fastface.checkpoints import check_steps, find_weights, get_checkpoint
    from fastface.cli import cached_pipeline
    from fastface.faces import backend_for_embedding_width, get_face_backend, prepare_identity

    checkpoint = get_checkpoint(args.model)
    steps = None
    for preset in args.preset:  # unknown presets and schedules that do not fit fail before anything loads
        steps = check_steps(checkpoint, preset, args.steps)
    backend_name = backend_for_embedding_width(checkpoint.id_embed_dim, args.face_backend,
                                               model=f"model {checkpoint.name!r}", option="--face-backend")
    faces = [Path(f) for f in args.face]
    for face in faces:
        if not face.is_file():
            raise FileNotFoundError(f"face photo {face} not found")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    find_weights(checkpoint, steps=steps, cache_dir=args.cache_dir)
    identity = prepare_identity(faces if len(faces) > 1 else faces[0], get_face_backend(backend_name),
                                cache_dir=identities_dir(args.cache_dir))
    pipe = cached_pipeline(checkpoint.name, device=args.device, dtype=args.dtype, lora_scale=args.lora_scale,
                           steps=steps, cache_dir=args.cache_dir)
    maps = capture_attention_maps(pipe, prompt=args.prompt, id_embed=identity.embedding, face_crop=identity.crop_bgr,
                                  presets=args.preset, seed=args.seed, steps=steps, size=args.size or checkpoint.size,
                                  ip_adapter_scale=args.ip_adapter_scale, lora_scale=args.lora_scale)
    grid, layout = render_grid(maps, tokens=args.token)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"{out}: {len(layout.rows)} rows (preset × token) × {len(layout.columns)} columns (part × step)")
    return 0


__all__ = ["AttentionMapRecorder", "GridLayout", "capture_attention_maps", "render_grid"]
