"""Images/s and UNet rows per image of FastFacePipeline per preset and batch size, against the reference way.

    .venv/bin/python benchmarks/bench_pipeline.py [--presets ...] [--batch-sizes 1 2 4 8] [--images 8] [--repeats 2]
    .venv/bin/python benchmarks/bench_pipeline.py --sdxl-shapes        # GPU: full SDXL UNet shapes, fp16
    .venv/bin/python benchmarks/bench_pipeline.py --tables overhead --presets am1 am2 ff-am2 --size 256 \
        --threads 1 --clock cpu                                           # AM overhead on a shared CPU

Reference ("ref"): what the authors' implementation does — every step evaluates all
three guidance branches (``force_all_branches=True``) and images go one at a time.
Ours: only the branches each step needs (method-spec §5), ``batch`` images per UNet
call. Both run in this process on the same inputs; ratios are ours / reference.

Default: the tiny checkpoint (``tiny-hyper``) on CPU, so the numbers show scheduling
and batching effects on a toy UNet, not real throughput. ``--sdxl-shapes`` builds the
SDXL-base UNet and VAE from their configs (random weights, nothing downloaded) with
small text/image encoders and a FaceID-Plus-v2-shaped adapter, in float16 (``--dtype``).

Three tables (``--tables``; default: all three with ``--sdxl-shapes``, else ``throughput``):

- ``throughput``: images/s per preset and batch size, ours against the reference way.
- ``overhead``: the cost of attention manipulation inside the UNet. The UNet and its
  ``attn2`` modules are timed with forward hooks (CUDA events on a GPU); each AM preset runs
  against the identity AM (our processor with ``f(A) = A``: the cost of the transforms) and
  against diffusers' own processor (``am=None``: also the cost of computing the identity
  attention explicitly), with the same branch layout (all three branches where AM2 couples
  them), one image, repeats interleaved, medians. ``UNet vs X`` is the whole-UNet ratio;
  ``attn2 vs X`` = (attn2[AM] − attn2[X]) ÷ UNet[X], the same quantity measured only where
  AM changes anything, hence with far less noise on a shared machine.
- ``batch``: a batch of 4 images against the same 4 images one at a time, whole pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

SDXL_UNET_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default", "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_VAE_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4, "force_upcast": True,
}


def sdxl_shaped_pipeline(device: str, dtype: torch.dtype, *, unet_config: dict = SDXL_UNET_CONFIG,
                         vae_config: dict = SDXL_VAE_CONFIG):
    """FastFacePipeline with SDXL-base UNet/VAE shapes (random weights); encoders kept small (run once per call).

    The UNet and VAE are built on ``device`` directly (initialising 2.6 B parameters on a CPU takes minutes).
    Other configs (a scaled-down SDXL layout) let the tests run this path on a CPU.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection)

    from fastface.pipeline import FastFacePipeline
    from fastface.tiny import build_tiny_tokenizer, faceid_plus_v2_state_dict

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    text = dict(vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513, num_hidden_layers=2,
                num_attention_heads=8, intermediate_size=1024)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, projection_dim=768, **text))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280, **text))
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, image_size=224, patch_size=14, num_hidden_layers=1, num_attention_heads=16,
        intermediate_size=1024, projection_dim=1024))
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(Path(tmp) / "tok")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tok")
        adapter = faceid_plus_v2_state_dict(unet_config, clip_hidden=1280, id_dim=512, std=0.02,
                                            heads=20, dim_head=64)
        torch.save(adapter, Path(tmp) / "adapter.bin")
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="trailing")
        pipe = FastFacePipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                force_zeros_for_empty_prompt=True)
        pipe.register_modules(image_encoder=image_encoder,
                              feature_extractor=CLIPImageProcessor(size=224, crop_size=224))
        pipe.to(device, dtype)
        pipe.load_ip_adapter(tmp, subfolder=None, weight_name="adapter.bin", image_encoder_folder=None)
    return pipe


def make_inputs(pipe, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    id_dim = pipe.id_embedding_width
    ids = torch.nn.functional.normalize(torch.randn(count, id_dim, generator=g), dim=-1)
    null = pipe.null_clip_states()
    clip = torch.randn((count,) + tuple(null.shape[1:]), generator=g)
    prompts = [f"a photo of a person number {i}" for i in range(count)]
    return prompts, ids, clip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Timer:
    """Total seconds between pre- and post-forward hooks of some modules (CUDA events on a GPU)."""

    def __init__(self, device: str, clock: Callable[[], float]):
        self.cuda, self.clock, self.marks = device.startswith("cuda"), clock, []

    def mark(self, *_) -> None:
        if self.cuda:
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(self.clock())

    def total(self) -> float:
        pairs = zip(self.marks[::2], self.marks[1::2])
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in pairs) / 1000
        return sum(b - a for a, b in pairs)


@contextlib.contextmanager
def unet_timer(unet, device: str, clock: Callable[[], float]) -> Iterator[dict[str, float]]:
    """Seconds spent in ``unet.forward`` and, within it, in the ``attn2`` (cross-attention) modules.

    Forward hooks; on CUDA they record events (no synchronisation inside the run), elsewhere
    they read ``clock``. The dict is filled when the block exits.
    """
    timers = {"unet": _Timer(device, clock), "attn2": _Timer(device, clock)}
    modules = [("unet", unet)] + [("attn2", m) for name, m in unet.named_modules() if name.endswith(".attn2")]
    handles = []
    for kind, module in modules:
        handles += [module.register_forward_pre_hook(timers[kind].mark),
                    module.register_forward_hook(timers[kind].mark)]
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    sync(device)
    result.update({kind: t.total() for kind, t in timers.items()})


IDENTITY_AM_NAME = "identity"


def am_overhead(pipe, inputs, *, preset: str, steps: int, size: int, device: str, repeats: int,
                clock: Callable[[], float], baselines: tuple[str, ...] = ("identity", "none")) -> dict | None:
    """UNet seconds of one image with the preset's AM and with each baseline, same branch layout.

    ``identity``: our processor with ``f(A) = A`` (AM1 with s = p = 1); ``none``: diffusers'
    processor. Runs are interleaved (rotating order) so that load from other jobs hits every
    variant alike; medians over ``repeats``. Besides the whole-UNet ratio, the overhead is
    estimated from the ``attn2`` modules alone, ``(attn2[AM] − attn2[base]) / UNet[base]``:
    AM changes nothing else in the UNet, and timing only the part that changes keeps the noise
    of the unchanged 90 % out of the figure.
    """
    from fastface.attention import AMConfig
    from fastface.presets import get_preset

    am = get_preset(preset).am
    if am is None:
        return None
    couple = any(am.couples_branches(i) for i in range(steps))
    variants = {"am": {}}
    if "identity" in baselines:
        variants["identity"] = {"am": AMConfig(transform="scale_power", name=IDENTITY_AM_NAME),
                                "force_all_branches": couple}
    if "none" in baselines:
        variants["none"] = {"am": None, "force_all_branches": couple}
    prompts, ids, clip = inputs
    times: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    rows: dict[str, list[int]] = {}
    order = list(variants)
    for r in range(repeats):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            with unet_timer(pipe.unet, device, clock) as t:
                out = pipe(prompts[:1], id_embeds=ids[:1], clip_states=clip[:1], preset=preset, seeds=[0],
                           num_inference_steps=steps, height=size, width=size, output_type="latent",
                           **variants[name])
            rows[name] = out.metadata[0]["unet_rows_per_step"]
            times[name].append(t)
    if len({tuple(v) for v in rows.values()}) != 1:
        raise RuntimeError(f"branch layouts differ between the AM runs of {preset}: {rows}")
    med = {k: {part: statistics.median(t[part] for t in v) for part in ("unet", "attn2")} for k, v in times.items()}
    res = {"rows": sum(rows["am"]), "median": med}
    for base in variants.keys() - {"am"}:
        res[f"unet_vs_{base}"] = med["am"]["unet"] / med[base]["unet"] - 1
        res[f"attn2_vs_{base}"] = (med["am"]["attn2"] - med[base]["attn2"]) / med[base]["unet"]
    return res


def batch_speedup(pipe, inputs, *, preset: str, steps: int, size: int, device: str, repeats: int,
                  clock: Callable[[], float], batch: int = 4) -> tuple[float, float]:
    """Median seconds per image: ``batch`` images one at a time, and in one batch (interleaved repeats)."""
    prompts, ids, clip = (x[:batch] for x in inputs)
    if len(prompts) < batch:
        raise ValueError(f"--images must be at least {batch} for the batch table")
    single, together = [], []
    for r in range(repeats):
        for mode in (("single", "batch") if r % 2 == 0 else ("batch", "single")):
            sync(device)
            start = clock()
            chunks = [slice(i, i + 1) for i in range(batch)] if mode == "single" else [slice(0, batch)]
            for c in chunks:
                pipe(prompts[c], id_embeds=ids[c], clip_states=clip[c], preset=preset,
                     seeds=list(range(batch))[c], num_inference_steps=steps, height=size, width=size,
                     output_type="np")
            sync(device)
            (single if mode == "single" else together).append((clock() - start) / batch)
    return statistics.median(single), statistics.median(together)


def run_mode(pipe, inputs, *, preset, batch, steps, size, device, force_all, repeats, clock=time.perf_counter
             ) -> tuple[float, float]:
    """Best-of-``repeats`` images per second of ``clock`` and the UNet rows per image, over every input image."""
    prompts, ids, clip = inputs
    best, rows = 0.0, 0.0
    for _ in range(repeats):
        total_rows = 0
        sync(device)
        start = clock()
        for i in range(0, len(prompts), batch):
            out = pipe(prompts[i:i + batch], id_embeds=ids[i:i + batch], clip_states=clip[i:i + batch],
                       preset=preset, seeds=list(range(i, i + len(prompts[i:i + batch]))),
                       num_inference_steps=steps, height=size, width=size, output_type="np",
                       force_all_branches=force_all)
            total_rows += out.metadata[0]["unet_rows"] * len(out.metadata)
        sync(device)
        best = max(best, len(prompts) / (clock() - start))
        rows = total_rows / len(prompts)
    return best, rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> int:
    from fastface.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS.names())
    parser.add_argument("--tables", nargs="+", choices=("throughput", "overhead", "batch"), default=None,
                        help="default: all three with --sdxl-shapes, throughput otherwise")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                        help="throughput table (default: 1 2 4 8; 1 4 with --sdxl-shapes)")
    parser.add_argument("--images", type=int, default=None,
                        help="images per throughput measurement (default: 8; 4 with --sdxl-shapes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="throughput: best of N; overhead and batch: median of N interleaved (default: 2; 3 for "
                             "overhead)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="image size (default: 64 tiny, 1024 SDXL)")
    parser.add_argument("--model", default="tiny-hyper", help="checkpoint for the default mode")
    parser.add_argument("--cache-dir", default=None, help="where tiny models are built (default: FASTFACE_CACHE)")
    parser.add_argument("--sdxl-shapes", action="store_true", help="SDXL-base UNet/VAE shapes, random weights, fp16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float16 on CUDA, float32 elsewhere")
    parser.add_argument("--baselines", nargs="+", choices=("identity", "none"), default=["identity", "none"],
                        help="overhead table: what AM is compared with (default: both)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (robust when other jobs share the CPU; "
                             "meaningless on GPU)")
    args = parser.parse_args(argv)

    args.tables = args.tables or (["throughput", "overhead", "batch"] if args.sdxl_shapes else ["throughput"])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.sdxl_shapes:
        pipe = sdxl_shaped_pipeline(device, dtype)
        size, label = args.size or 1024, "SDXL shapes"
    else:
        from fastface.checkpoints import load_pipeline

        pipe = load_pipeline(args.model, steps=args.steps, device=device, dtype=dtype, cache_dir=args.cache_dir)
        size, label = args.size or pipe.checkpoint.size, args.model
    label += f", {str(dtype).replace('torch.', '')}"
    batch_sizes = args.batch_sizes or ([1, 4] if args.sdxl_shapes else [1, 2, 4, 8])
    images = args.images or (4 if args.sdxl_shapes else 8)
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(pipe, max(images, 4 if "batch" in args.tables else 1))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    common = dict(steps=args.steps, size=size, device=device, clock=clock)

    print(f"# bench_pipeline: {label}, {size}x{size}, {args.steps} steps; {args.clock} clock; device {device}; "
          f"{machine()}")
    if "throughput" in args.tables:
        repeats = args.repeats or 2
        print(f"\n## throughput: {images} images, best of {repeats}; ratio = images/s ÷ reference "
              f"(all branches, one image at a time)")
        header = (f"{'preset':<9} {'mode':<5} {'batch':>5} {'images/s':>9} {'rows/img':>8} {'ratio':>6} "
                  f"{'rows ratio':>10}")
        print(header)
        print("-" * len(header))
        for preset in args.presets:
            kwargs = dict(common, preset=preset, repeats=repeats)
            few = tuple(x[:1] for x in inputs)
            run_mode(pipe, few, batch=1, force_all=True, **dict(kwargs, repeats=1))  # warm-up
            some = tuple(x[:images] for x in inputs)
            ref_ips, ref_rows = run_mode(pipe, some, batch=1, force_all=True, **kwargs)
            print(f"{preset:<9} {'ref':<5} {1:>5} {ref_ips:>9.3f} {ref_rows:>8.1f} {1.0:>6.2f} {1.0:>10.2f}")
            for batch in batch_sizes:
                ips, rows = run_mode(pipe, some, batch=batch, force_all=False, **kwargs)
                print(f"{preset:<9} {'ours':<5} {batch:>5} {ips:>9.3f} {rows:>8.1f} {ips / ref_ips:>6.2f} "
                      f"{ref_rows / rows:>10.2f}")
            sys.stdout.flush()
    if "overhead" in args.tables:
        repeats = args.repeats or 3
        bases = tuple(args.baselines)
        print(f"\n## AM overhead in the UNet: one image, {size}x{size}, median of {repeats} interleaved runs "
              f"(after a warm-up run); seconds of UNet per image; same branch layout for every variant")
        print("# UNet: AM ÷ baseline − 1 over the whole UNet; attn2: (attn2[AM] − attn2[baseline]) ÷ UNet[baseline]")
        header = f"{'preset':<9} {'rows':>4} {'UNet AM':>9} {'attn2 AM':>9}"
        for base in bases:
            header += f" {'UNet ' + base:>13} {'attn2 ' + base:>14} {'UNet vs ' + base:>16} {'attn2 vs ' + base:>17}"
        print(header)
        print("-" * len(header))
        pipe(inputs[0][:1], id_embeds=inputs[1][:1], clip_states=inputs[2][:1], preset="ff-am2", seeds=[0],
             num_inference_steps=args.steps, height=size, width=size, output_type="latent")  # warm-up
        for preset in args.presets:
            res = am_overhead(pipe, inputs, preset=preset, repeats=repeats, baselines=bases, **common)
            if res is None:
                print(f"{preset:<9} (no AM)")
                continue
            m = res["median"]
            line = f"{preset:<9} {res['rows']:>4} {m['am']['unet']:>9.4f} {m['am']['attn2']:>9.4f}"
            for base in bases:
                line += (f" {m[base]['unet']:>13.4f} {m[base]['attn2']:>14.4f} {res['unet_vs_' + base]:>+16.1%} "
                         f"{res['attn2_vs_' + base]:>+17.1%}")
            print(line)
            sys.stdout.flush()
    if "batch" in args.tables:
        repeats = args.repeats or 2
        print(f"\n## batch of 4 against 4 single images: whole pipeline, seconds per image, median of {repeats} "
              f"interleaved")
        header = f"{'preset':<9} {'4 singles':>9} {'batch 4':>9} {'speed-up':>8} {'images/s b4':>11}"
        print(header)
        print("-" * len(header))
        for preset in args.presets:
            single, together = batch_speedup(pipe, inputs, preset=preset, repeats=repeats, **common)
            print(f"{preset:<9} {single:>9.4f} {together:>9.4f} {single / together:>7.2f}x {1 / together:>11.3f}")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
