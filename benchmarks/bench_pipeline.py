"""Images/s and UNet rows per image of FastFacePipeline per preset and batch size, against the reference way.

    .venv/bin/python benchmarks/bench_pipeline.py [--presets ...] [--batch-sizes 1 2 4 8] [--images 8] [--repeats 2]
    .venv/bin/python benchmarks/bench_pipeline.py --sdxl-shapes        # GPU: full SDXL UNet shapes, fp16

Reference ("ref"): what the authors' implementation does — every step evaluates all
three guidance branches (``force_all_branches=True``) and images go one at a time.
Ours: only the branches each step needs (method-spec §5), ``batch`` images per UNet
call. Both run in this process on the same inputs; ratios are ours / reference.

Default: the tiny checkpoint (``tiny-hyper``) on CPU, so the numbers show scheduling
and batching effects on a toy UNet, not real throughput. ``--sdxl-shapes`` builds the
SDXL-base UNet and VAE from their configs (random weights, nothing downloaded) with
small text/image encoders and a FaceID-Plus-v2-shaped adapter, in float16.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

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


def sdxl_shaped_pipeline(device: str, dtype: torch.dtype):
    """FastFacePipeline with SDXL-base UNet/VAE shapes (random weights); encoders kept small (run once per call)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection)

    from fastface.pipeline import FastFacePipeline
    from fastface.tiny import build_tiny_tokenizer, faceid_plus_v2_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    vae = AutoencoderKL(**SDXL_VAE_CONFIG)
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
        adapter = faceid_plus_v2_state_dict(SDXL_UNET_CONFIG, clip_hidden=1280, id_dim=512, std=0.02,
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
    id_dim = pipe._faceid_projection().proj.net[0].proj.in_features
    ids = torch.nn.functional.normalize(torch.randn(count, id_dim, generator=g), dim=-1)
    null = pipe.null_clip_states()
    clip = torch.randn((count,) + tuple(null.shape[1:]), generator=g)
    prompts = [f"a photo of a person number {i}" for i in range(count)]
    return prompts, ids, clip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def main(argv=None) -> int:
    from fastface.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS.names())
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--images", type=int, default=8, help="images per measurement (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="image size (default: 64 tiny, 1024 SDXL)")
    parser.add_argument("--model", default="tiny-hyper", help="checkpoint for the default mode")
    parser.add_argument("--cache-dir", default=None, help="where tiny models are built (default: FASTFACE_CACHE)")
    parser.add_argument("--sdxl-shapes", action="store_true", help="SDXL-base UNet/VAE shapes, random weights, fp16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (robust when other jobs share the CPU; "
                             "meaningless on GPU)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if args.sdxl_shapes and torch.cuda.is_available() else "cpu")
    if args.sdxl_shapes:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe = sdxl_shaped_pipeline(device, dtype)
        size, label = args.size or 1024, f"SDXL shapes, {str(dtype).replace('torch.', '')}"
    else:
        from fastface.checkpoints import load_pipeline

        pipe = load_pipeline(args.model, steps=args.steps, device=device, cache_dir=args.cache_dir)
        size, label = args.size or pipe.checkpoint.size, f"{args.model}, float32"
    pipe.set_progress_bar_config(disable=True)
    inputs = make_inputs(pipe, args.images)

    print(f"# bench_pipeline: {label}, {size}x{size}, {args.steps} steps, {args.images} images, "
          f"best of {args.repeats}, {args.clock} clock; device {device}; {machine()}")
    header = f"{'preset':<9} {'mode':<5} {'batch':>5} {'images/s':>9} {'rows/img':>8} {'ratio':>6} {'rows ratio':>10}"
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        kwargs = dict(preset=preset, steps=args.steps, size=size, device=device, repeats=args.repeats,
                      clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        run_mode(pipe, (inputs[0][:1], inputs[1][:1], inputs[2][:1]), batch=1, force_all=True,
                 **dict(kwargs, repeats=1))  # warm-up
        ref_ips, ref_rows = run_mode(pipe, inputs, batch=1, force_all=True, **kwargs)
        print(f"{preset:<9} {'ref':<5} {1:>5} {ref_ips:>9.3f} {ref_rows:>8.1f} {1.0:>6.2f} {1.0:>10.2f}")
        for batch in args.batch_sizes:
            ips, rows = run_mode(pipe, inputs, batch=batch, force_all=False, **kwargs)
            print(f"{preset:<9} {'ours':<5} {batch:>5} {ips:>9.3f} {rows:>8.1f} {ips / ref_ips:>6.2f} "
                  f"{ref_rows / rows:>10.2f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
