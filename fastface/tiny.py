"""Tiny, deterministic stand-ins for SDXL, the FaceID-Plus-v2 adapter and CLIP-H.

Same classes and on-disk layouts as the real weights (a diffusers SDXL folder, an
adapter ``.bin`` in the original ``image_proj``/``ip_adapter`` key format with its
LoRA, a transformers CLIP-vision folder), random weights from a fixed seed. They are
written to disk and loaded back through the real loaders, so tests and the embedded
default exercise the production code path. They generate noise, not faces.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_VERSION = "1"  # bump when a builder changes, so cached folders are rebuilt
ADAPTER_FILE = "ip-adapter-faceid-plusv2_sdxl_tiny.bin"

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + pooled text (32)
    use_linear_projection=True,
    norm_num_groups=1,
)
VAE_CONFIG = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=1,
    sample_size=128,
)
TEXT_CONFIG = dict(
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-5,
    num_attention_heads=4,
    num_hidden_layers=5,
    vocab_size=514,
    projection_dim=32,
    hidden_act="gelu",
)
IMAGE_ENCODER_CONFIG = dict(
    hidden_size=32,
    image_size=32,
    patch_size=4,
    num_channels=3,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    projection_dim=32,
    hidden_act="quick_gelu",
)
ID_EMBED_DIM = 128  # dlib's descriptor width, so the offline face backend feeds the tiny adapter


@dataclass(frozen=True)
class TinyModels:
    sdxl: Path
    adapter: Path  # the adapter file
    image_encoder: Path

    @property
    def id_embed_dim(self) -> int:
        return ID_EMBED_DIM


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable mapping of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tiny_tokenizer(folder: Path) -> None:
    """A byte-level CLIP BPE tokenizer with no merges (vocab 514), built locally."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": 256 + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)


def build_tiny_sdxl(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny SDXL pipeline folder (UNet, VAE, two CLIP text encoders, tokenizers, DDIM trailing)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIG))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(Path(tmp) / "tok")
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tok")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_image_encoder(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """A tiny ``CLIPVisionModelWithProjection`` (image size 32) in the role of CLIP-H."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 10)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**IMAGE_ENCODER_CONFIG))
    model.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def faceid_plus_v2_state_dict(
    unet_config: dict, *, clip_hidden: int, id_dim: int = ID_EMBED_DIM, seed: int = 0, std: float = 0.1,
    lora_rank: int = 4, depth: int = 4, num_tokens: int = 4, heads: int = 4, dim_head: int = 16,
) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights in the original FaceID-Plus-v2 layout (``image_proj`` + ``ip_adapter`` with LoRA).

    Keys follow the IP-Adapter repo: ``ProjModelFaceIdPlus`` (``proj.*``, ``norm.*``,
    ``perceiver_resampler.*``) and per-attention-processor ``{i}.to_{q,k,v,out}_lora.*``
    plus ``{i}.to_{k,v}_ip.weight`` on the cross-attention ones. ``std`` 0.1 makes every
    FastFace mechanism act visibly on the tiny UNet.
    """
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale: float = std):
        return torch.randn(*shape, generator=g) * scale

    def ln(n):  # LayerNorm gains around 1, as trained ones are
        return 1.0 + w(n)

    cross = unet_config["cross_attention_dim"]
    embed = cross  # the resampler's width equals the UNet's cross-attention width (as in the real adapter)
    inner = dim_head * heads
    proj = {
        "proj.0.weight": w(id_dim * 2, id_dim), "proj.0.bias": w(id_dim * 2),
        "proj.2.weight": w(embed * num_tokens, id_dim * 2), "proj.2.bias": w(embed * num_tokens),
        "norm.weight": ln(embed), "norm.bias": w(embed),
        "perceiver_resampler.proj_in.weight": w(embed, clip_hidden), "perceiver_resampler.proj_in.bias": w(embed),
        "perceiver_resampler.proj_out.weight": w(cross, embed), "perceiver_resampler.proj_out.bias": w(cross),
        "perceiver_resampler.norm_out.weight": ln(cross), "perceiver_resampler.norm_out.bias": w(cross),
    }
    for i in range(depth):
        p = f"perceiver_resampler.layers.{i}."
        proj.update({
            p + "0.norm1.weight": ln(embed), p + "0.norm1.bias": w(embed),
            p + "0.norm2.weight": ln(embed), p + "0.norm2.bias": w(embed),
            p + "0.to_q.weight": w(inner, embed), p + "0.to_kv.weight": w(inner * 2, embed),
            p + "0.to_out.weight": w(embed, inner),
            p + "1.0.weight": ln(embed), p + "1.0.bias": w(embed),
            p + "1.1.weight": w(embed * 4, embed), p + "1.3.weight": w(embed, embed * 4),
        })
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    ip: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        hidden = attn.to_q.out_features
        in_k = attn.to_k.in_features
        for proj_name, d_in, d_out in (("to_q", hidden, hidden), ("to_k", in_k, hidden), ("to_v", in_k, hidden),
                                       ("to_out", hidden, hidden)):
            ip[f"{i}.{proj_name}_lora.down.weight"] = w(lora_rank, d_in)
            ip[f"{i}.{proj_name}_lora.up.weight"] = w(d_out, lora_rank)
        if name.endswith("attn2.processor"):
            # Unit-scale identity keys/values: the identity attention then dominates enough
            # for every FastFace mechanism to change the tiny model's images visibly.
            ip[f"{i}.to_k_ip.weight"] = w(hidden, cross, scale=1.0)
            ip[f"{i}.to_v_ip.weight"] = w(hidden, cross, scale=1.0)
    return {"image_proj": proj, "ip_adapter": ip}


def build_tiny_faceid_adapter(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny FaceID-Plus-v2 adapter ``.bin`` (torch.save of the original two-part dict)."""
    sd = faceid_plus_v2_state_dict(dict(UNET_CONFIG), clip_hidden=IMAGE_ENCODER_CONFIG["hidden_size"], seed=seed + 20)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path


def default_tiny_root() -> Path:
    from fastface.cache import tiny_models_dir

    return tiny_models_dir(TINY_VERSION)


def ensure_tiny_models(root: str | os.PathLike | None = None, *, seed: int = 0) -> TinyModels:
    """Build the tiny models once under ``root`` (atomically: built in a temp folder, then renamed)."""
    root = Path(root) if root is not None else default_tiny_root()
    target = root / f"seed{seed}"
    models = TinyModels(target / "sdxl", target / "adapter" / ADAPTER_FILE, target / "image_encoder")
    if (target / "COMPLETE").exists():
        return models
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    build_tiny_sdxl(tmp / "sdxl", seed=seed)
    build_tiny_image_encoder(tmp / "image_encoder", seed=seed)
    build_tiny_faceid_adapter(tmp / "adapter" / ADAPTER_FILE, seed=seed)
    (tmp / "COMPLETE").write_text(TINY_VERSION)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first; theirs is equally valid
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return models
