"""ImageReward (Xu et al., 2023) on transformers' BLIP blocks: batched, and equal to the original.

The original ``image-reward`` 1.5 package scores with BLIP: a ViT-L/16 image encoder, a BERT
text encoder whose layers cross-attend to the image tokens, and an MLP on the text [CLS]
state; the reward is normalised as ``(r - 0.16717) / 1.03334``. Here the two towers are
``transformers.models.blip``'s ``BlipVisionModel`` and ``BlipTextModel`` (the latter is a port
of BLIP's ``med.py``), loaded from the official ``ImageReward.pt`` through an explicit key map
(:func:`map_original_key`). Prompts are padded to the original's fixed length (35), so
batching gives the same numbers as scoring one image at a time.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from fastface.metrics.base import MetricInput, MetricResult, MetricSpec, register_metric

HUB_ID = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_HUB_ID = "bert-base-uncased"  # what the original's BLIP tokenizer loads
ENV_PATH = "FASTFACE_IMAGEREWARD_PATH"

# Reward normalisation of the original (ImageReward.py: self.mean / self.std).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
PROMPT_MAX_LENGTH = 35  # the original tokenises with padding="max_length", truncation, max_length=35
# BLIP normalises with CLIP's statistics.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
VISION_LAYER_NORM_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the original's MLP(768): 768 -> 1024 -> 128 -> 64 -> 16 -> 1


@dataclass(frozen=True)
class VisionTowerConfig:
    """Size of the ViT image encoder. The official checkpoint is ViT-L/16 at 224 px."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "patch_size", "image_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"VisionTowerConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"VisionTowerConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionTowerConfig.image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)


VIT_L16 = VisionTowerConfig()
TINY_VISION = VisionTowerConfig(width=32, depth=2, heads=4, patch_size=8, image_size=32)


# ----------------------------------------------------------------------------- key mapping

# Original ``ImageReward.pt`` key (regex) -> our key (template). BLIP's ViT follows timm's names;
# transformers' BlipVisionModel renames them. BlipTextModel keeps med.py's names.
_KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), template)
    for pattern, template in (
        (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
        (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
        (r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.embeddings.patch_embedding.\1"),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm1.\2"),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.(weight|bias)$", r"vision.encoder.layers.\1.layer_norm2.\2"),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"vision.encoder.layers.\1.self_attn.qkv.\2"),
        (
            r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$",
            r"vision.encoder.layers.\1.self_attn.projection.\2",
        ),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"vision.encoder.layers.\1.mlp.\2.\3"),
        (r"^blip\.visual_encoder\.norm\.(weight|bias)$", r"vision.post_layernorm.\1"),
        (r"^blip\.text_encoder\.(embeddings\.(?:word_embeddings|position_embeddings|LayerNorm)\..+)$", r"text.\1"),
        (r"^blip\.text_encoder\.(encoder\.layer\.\d+\..+)$", r"text.\1"),
        (r"^mlp\.layers\.(\d+)\.(weight|bias)$", r"head.layers.\1.\2"),
    )
)
# Parts of the original checkpoint that scoring does not use (BLIP's ITC projections, a buffer).
_UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


def map_original_key(key: str) -> str | None:
    """Our parameter name for an original ``ImageReward.pt`` key; None for keys scoring does not use."""
    if _UNUSED_KEYS.search(key):
        return None
    for pattern, template in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(template, key)
    raise KeyError(f"unrecognised ImageReward checkpoint key {key!r}; is this an ImageReward.pt state dict?")


def map_original_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original ImageReward state dict to this module's parameter names."""
    mapped = {}
    for key, tensor in state_dict.items():
        new = map_original_key(key)
        if new is not None:
            mapped[new] = tensor
    return mapped


# ----------------------------------------------------------------------------- model


class RewardHead(nn.Module):
    """The original's MLP (dropouts kept only so that the ``layers.<i>`` indices match)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        w = HEAD_WIDTHS
        self.layers = nn.Sequential(
            nn.Linear(input_size, w[0]),
            nn.Dropout(0.2),
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.1),
            nn.Linear(w[2], w[3]),
            nn.Linear(w[3], w[4]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _vision_config(vision: VisionTowerConfig):
    from transformers.models.blip import BlipVisionConfig

    return BlipVisionConfig(
        hidden_size=vision.width,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.depth,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu",  # exact (erf) GELU, as timm's nn.GELU
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def _text_config(med: dict, encoder_width: int):
    """BlipTextConfig from the original's med_config.json (a BertConfig); BLIP overrides encoder_width."""
    from transformers.models.blip import BlipTextConfig

    kind = med.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise ValueError(f"med_config position_embedding_type={kind!r} is not supported; ImageReward uses 'absolute'")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in med]
    if missing:
        raise ValueError(f"med_config.json lacks {missing}; it should be ImageReward's BERT config")
    return BlipTextConfig(
        vocab_size=int(med["vocab_size"]),
        hidden_size=int(med["hidden_size"]),
        encoder_hidden_size=encoder_width,  # BLIP_Pretrain: encoder_config.encoder_width = vision_width
        intermediate_size=int(med["intermediate_size"]),
        num_hidden_layers=int(med["num_hidden_layers"]),
        num_attention_heads=int(med["num_attention_heads"]),
        max_position_embeddings=int(med.get("max_position_embeddings", 512)),
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.0)),
        attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.0)),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,  # generation-only ids; unset so the config does not warn about the vocabulary
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False (bidirectional)
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head; ``forward`` returns normalised rewards, shape (B,)."""

    def __init__(self, med_config: dict, vision: VisionTowerConfig = VIT_L16) -> None:
        super().__init__()
        from transformers.models.blip import BlipTextModel, BlipVisionModel

        self.vision_tower = vision
        self.vision = BlipVisionModel(_vision_config(vision))
        self.text = BlipTextModel(_text_config(med_config, vision.width), add_pooling_layer=False)
        self.head = RewardHead(int(med_config["hidden_size"]))

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        features = text.last_hidden_state[:, 0, :].float()  # the original casts to float before the MLP
        rewards = self.head(features.to(self.head.layers[0].weight.dtype)).float().squeeze(-1)
        return (rewards - REWARD_MEAN) / REWARD_STD

    @classmethod
    def from_original_state_dict(
        cls, state_dict: dict[str, torch.Tensor], med_config: dict, vision: VisionTowerConfig = VIT_L16
    ) -> "ImageRewardModel":
        """Build on the meta device (no random init: ViT-L would spend seconds on it) and take the
        checkpoint's tensors; the one non-persistent buffer is rebuilt."""
        with torch.device("meta"):
            model = cls(med_config, vision)
        model.load_original_state_dict(state_dict, assign=True)
        emb = model.text.embeddings
        emb.position_ids = torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1))
        still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if still_meta:
            raise RuntimeError(f"ImageRewardModel tensors left uninitialised after loading: {still_meta}")
        return model.eval()

    def load_original_state_dict(self, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load an original ``ImageReward.pt`` state dict; every parameter must be present with its shape."""
        mapped = map_original_state_dict(state_dict)
        own = self.state_dict()
        missing = sorted(set(own) - set(mapped))
        # The original BERT has no token-type embeddings; BlipTextModel has none either.
        if missing:
            raise ValueError(
                f"ImageReward checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}; "
                f"does its vision tower match {self.vision_tower} and its text tower med_config.json?"
            )
        unexpected = sorted(set(mapped) - set(own))
        if unexpected:
            raise ValueError(
                f"ImageReward checkpoint has {len(unexpected)} parameters this model lacks, e.g. {unexpected[:3]}; "
                f"is the vision tower {self.vision_tower} (depth) and med_config.json (num_hidden_layers) right?"
            )
        wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in mapped.items() if v.shape != own[k].shape]
        if wrong:
            key, got, want = wrong[0]
            raise ValueError(
                f"ImageReward checkpoint parameter {key!r} has shape {got}, the model expects {want} "
                f"({len(wrong)} mismatches); check the vision tower size ({self.vision_tower}) and med_config.json"
            )
        self.load_state_dict(mapped, strict=True, assign=assign)


# ----------------------------------------------------------------------------- preprocessing


def to_pil(image: Any):
    """A PIL image from a PIL image, an HxW(x3|x4) uint8 array, or a local path / fsspec URI."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"image array must be uint8 HxW, HxWx3 (RGB) or HxWx4 (RGBA), got dtype={image.dtype} shape={image.shape}"
            )
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                img = Image.open(f)
                img.load()
            return img
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path}")
        img = Image.open(path)
        img.load()
        return img
    raise TypeError(f"image must be a PIL.Image, a uint8 numpy array or a path, got {type(image).__name__}")


def preprocess_image(image: Any, image_size: int = 224) -> torch.Tensor:
    """The original's transform, step for step: Resize(n, bicubic) on the shorter side, CenterCrop(n),
    convert("RGB") (after resizing, in the image's own mode), ToTensor, Normalize(CLIP mean/std).
    Returns a float32 (3, n, n) tensor."""
    from PIL import Image

    img = to_pil(image)
    w, h = img.size
    # torchvision's Resize(int): shorter side -> n, longer side -> int(n * long / short).
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = image_size, int(image_size * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    if size != (w, h):
        img = img.resize(size, Image.BICUBIC)
    # torchvision's center_crop: int(round((dim - n) / 2)) offsets.
    w, h = img.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- loading


def _missing_checkpoint_error(where: str, why: str = "") -> FileNotFoundError:
    return FileNotFoundError(
        f"ImageReward checkpoint not found at {where}{': ' + why if why else ''}. Put {CHECKPOINT_FILE} and "
        f"{MED_CONFIG_FILE} (from the hub repo {HUB_ID}) in one folder, optionally with the BERT tokenizer's "
        f"vocab.txt (from {TOKENIZER_HUB_ID}) beside them, and pass that folder as checkpoint= or set "
        f"{ENV_PATH}=<folder>. The hub id {HUB_ID!r} is fetched only when online."
    )


def resolve_checkpoint(checkpoint: str | os.PathLike | None, med_config: str | os.PathLike | None) -> tuple[Path, Path]:
    """(ImageReward.pt, med_config.json) from a file, a folder, ${FASTFACE_IMAGEREWARD_PATH} or the hub id."""
    if checkpoint is None:
        checkpoint = os.environ.get(ENV_PATH) or HUB_ID
    ckpt = os.fspath(checkpoint)
    path = Path(ckpt).expanduser()
    if path.is_dir():
        ckpt_file = path / CHECKPOINT_FILE
        if not ckpt_file.is_file():
            raise _missing_checkpoint_error(str(path), f"the folder has no {CHECKPOINT_FILE}")
    elif path.is_file():
        ckpt_file = path
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", ckpt) and not ckpt.startswith((".", "/")):
        ckpt_file = _hub_file(ckpt, CHECKPOINT_FILE)
        if med_config is None:
            med_config = _hub_file(ckpt, MED_CONFIG_FILE)
    else:
        raise _missing_checkpoint_error(ckpt, "no such file or folder")
    med_file = Path(med_config).expanduser() if med_config is not None else ckpt_file.parent / MED_CONFIG_FILE
    if not med_file.is_file():
        raise _missing_checkpoint_error(str(ckpt_file.parent), f"{med_file} is missing (pass med_config= or put it beside)")
    return ckpt_file, med_file


def _hub_file(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as e:  # offline, no cache, no such repo: say where to put the files instead
        raise _missing_checkpoint_error(f"hub id {repo_id!r}", f"{type(e).__name__}: {e}") from e


def load_tokenizer(tokenizer: str | os.PathLike | None, checkpoint_dir: Path | None = None):
    """The original's BLIP tokenizer: bert-base-uncased plus bos [DEC] and additional special [ENC].

    ``tokenizer`` is a folder (vocab.txt / tokenizer files), a vocab.txt file or a hub id. When None,
    a ``tokenizer/`` folder or ``vocab.txt`` beside the checkpoint is used, else the hub id.
    """
    from transformers import BertTokenizer

    if tokenizer is None and checkpoint_dir is not None:
        for candidate in (checkpoint_dir / "tokenizer", checkpoint_dir / "vocab.txt"):
            if candidate.exists():
                tokenizer = candidate
                break
    source = os.fspath(tokenizer) if tokenizer is not None else TOKENIZER_HUB_ID
    try:
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
            tok = BertTokenizer(vocab=vocab, do_lower_case=True)
        else:
            tok = BertTokenizer.from_pretrained(source)
        if tok.vocab_size <= 5:
            # transformers 5 returns a bare 5-token tokenizer when it finds no vocabulary (e.g. offline).
            raise OSError(f"no vocabulary found (got {tok.vocab_size} tokens)")
    except Exception as e:
        raise FileNotFoundError(
            f"cannot load the ImageReward BERT tokenizer from {source!r} ({type(e).__name__}: {e}). Offline, put "
            f"{TOKENIZER_HUB_ID}'s vocab.txt beside {CHECKPOINT_FILE} (or a tokenizer/ folder) or pass tokenizer=<path>."
        ) from e
    # As BLIP's init_tokenizer: the vocabulary gains [DEC] and [ENC]; prompts containing them tokenise alike.
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


# ----------------------------------------------------------------------------- scorer


class ImageRewardScorer:
    """Batched ImageReward. ``score(images, prompts)`` returns the original's normalised rewards."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        med_config: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        vision: VisionTowerConfig = VIT_L16,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ckpt_file, med_file = resolve_checkpoint(checkpoint, med_config)
        self.checkpoint = ckpt_file
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or torch.float32
        self.batch_size = batch_size
        self.vision_tower = vision
        with open(med_file, encoding="utf-8") as f:
            self.med_config = json.load(f)
        self.tokenizer = load_tokenizer(tokenizer, ckpt_file.parent)
        if len(self.tokenizer) != int(self.med_config["vocab_size"]):
            # The official checkpoint: bert-base-uncased's 30522 + [DEC] + [ENC] = med_config's 30524.
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens (with [DEC], [ENC]) but med_config vocab_size is "
                f"{self.med_config['vocab_size']}; the tokenizer does not belong to this checkpoint"
            )
        state_dict = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict) or not any(k.startswith("blip.") for k in state_dict):
            raise ValueError(f"{ckpt_file} is not an ImageReward state dict (expected keys 'blip.*' and 'mlp.*')")
        self.model = ImageRewardModel.from_original_state_dict(state_dict, self.med_config, vision)
        del state_dict
        self.model.float().eval().to(self.device)
        self.model.vision.to(self.dtype)
        self.model.text.to(self.dtype)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_MAX_LENGTH, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"]

    @torch.inference_mode()
    def score_tensors(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        """Rewards for preprocessed images (B, 3, n, n) and their prompts, in one forward pass."""
        ids, mask = self.tokenize(prompts)
        r = self.model(
            pixel_values.to(self.device, self.dtype), ids.to(self.device), mask.to(self.device)
        )
        return r.float().cpu().numpy().astype(np.float64)

    def score(self, images: Sequence[Any], prompts: str | Sequence[str]) -> np.ndarray:
        """One reward per image (float64 array). ``prompts`` is one prompt per image, or one for all."""
        images = list(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image or one str")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
        out = np.empty(len(images), dtype=np.float64)
        n = self.vision_tower.image_size
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            pixels = torch.stack([preprocess_image(im, n) for im in images[chunk]])
            out[chunk] = self.score_tensors(pixels, prompts[chunk])
        return out


# ----------------------------------------------------------------------------- metric


class ImageRewardMetric:
    """The ``ir`` metric: one MetricResult per input; an unreadable image is an error result, not an exception."""

    def __init__(self, scorer: ImageRewardScorer | None = None, **options: Any) -> None:
        self.spec = METRICS_SPEC
        self._scorer = scorer
        self._options = options

    @property
    def scorer(self) -> ImageRewardScorer:
        if self._scorer is None:
            self._scorer = ImageRewardScorer(**self._options)
        return self._scorer

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        results: list[MetricResult | None] = [None] * len(inputs)
        ok_index, pixels, prompts = [], [], []
        n = self.scorer.vision_tower.image_size
        for i, inp in enumerate(inputs):
            if not isinstance(inp.prompt, str):
                results[i] = MetricResult(None, error="ir needs a prompt (MetricInput.prompt is missing)")
                continue
            try:
                pixels.append(preprocess_image(inp.image, n))
            except Exception as e:  # one unreadable image must not lose the batch
                results[i] = MetricResult(None, error=f"cannot read image: {type(e).__name__}: {e}")
                continue
            ok_index.append(i)
            prompts.append(inp.prompt)
        bs = self.scorer.batch_size
        for start in range(0, len(ok_index), bs):
            values = self.scorer.score_tensors(torch.stack(pixels[start : start + bs]), prompts[start : start + bs])
            for i, v in zip(ok_index[start : start + bs], values):
                results[i] = MetricResult(float(v))
        return results  # type: ignore[return-value]


METRICS_SPEC = register_metric(
    MetricSpec(
        name="ir",
        inputs=("image", "prompt"),
        higher_is_better=True,
        aggregate="mean",
        factory=ImageRewardMetric,
        description="ImageReward (BLIP ViT-L/16 + BERT cross-attention + MLP), normalised as the original",
    )
)

