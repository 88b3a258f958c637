"""Random ImageReward checkpoints in the official layout, for the tests (and the parity tool and the
benchmark, which put this folder on their path): ``ImageReward.pt``, ``med_config.json``, a tiny
``vocab.txt``. Same classes and loader as the real checkpoint (:mod:`fastface.metrics.image_reward`),
random weights from a fixed seed."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from fastface.metrics.image_reward import (CHECKPOINT_FILE, HEAD_WIDTHS, MED_CONFIG_FILE, TINY_VISION,
                                           VisionTowerConfig)

_TINY_WORDS = (
    "a an the of in on at with and or to by for from as is are person man woman girl boy child old young face "
    "portrait photo photograph painting oil watercolor sketch drawing style art anime cartoon comic pixel cyberpunk "
    "steampunk fantasy baroque impressionist cubist pop noir vintage cinematic lighting studio close up smiling "
    "sitting standing walking running reading holding wearing hat glasses red blue green yellow black white golden "
    "dark bright soft light city street park forest beach mountain river sea sky night sunset rain snow garden "
    "kitchen library cafe office room window car bicycle book cup coffee dog cat bird flower tree house castle "
    "high detailed realistic beautiful highly quality 4k 8k sharp focus by artist trending masterpiece"
).split()


def tiny_vocab() -> list[str]:
    """A small BERT-style WordPiece vocabulary: specials, single characters and their ##-pieces, some words."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"-()&/")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(4)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + [f"##{c}" for c in chars[:36]] + ["##s", "##ing", "##ed", "##er", "##ly"]
    seen = set(vocab)
    vocab += [w for w in dict.fromkeys(_TINY_WORDS) if w not in seen]
    return list(dict.fromkeys(vocab))


def original_state_dict_shapes(vision: VisionTowerConfig, med_config: dict, embed_dim: int = 256) -> dict[str, tuple]:
    """Key -> shape of an original ``ImageReward.pt`` (BLIP_Pretrain + MLP) for the given tower sizes."""
    W, P, N = vision.width, vision.patch_size, vision.num_patches
    H, I, V = int(med_config["hidden_size"]), int(med_config["intermediate_size"]), int(med_config["vocab_size"])
    shapes: dict[str, tuple] = {
        "blip.visual_encoder.cls_token": (1, 1, W),
        "blip.visual_encoder.pos_embed": (1, N + 1, W),
        "blip.visual_encoder.patch_embed.proj.weight": (W, 3, P, P),
        "blip.visual_encoder.patch_embed.proj.bias": (W,),
    }
    for i in range(vision.depth):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (W,), b + "norm1.bias": (W,),
                b + "attn.qkv.weight": (3 * W, W), b + "attn.qkv.bias": (3 * W,),
                b + "attn.proj.weight": (W, W), b + "attn.proj.bias": (W,),
                b + "norm2.weight": (W,), b + "norm2.bias": (W,),
                b + "mlp.fc1.weight": (vision.intermediate_size, W), b + "mlp.fc1.bias": (vision.intermediate_size,),
                b + "mlp.fc2.weight": (W, vision.intermediate_size), b + "mlp.fc2.bias": (W,),
            }
        )  # fmt: skip
    shapes["blip.visual_encoder.norm.weight"] = (W,)
    shapes["blip.visual_encoder.norm.bias"] = (W,)
    t = "blip.text_encoder."
    shapes.update(
        {
            t + "embeddings.position_ids": (1, int(med_config.get("max_position_embeddings", 512))),
            t + "embeddings.word_embeddings.weight": (V, H),
            t + "embeddings.position_embeddings.weight": (int(med_config.get("max_position_embeddings", 512)), H),
            t + "embeddings.LayerNorm.weight": (H,), t + "embeddings.LayerNorm.bias": (H,),
        }
    )  # fmt: skip
    for i in range(int(med_config["num_hidden_layers"])):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", H), ("crossattention", W)):
            shapes.update(
                {
                    f"{b}{att}.self.query.weight": (H, H), f"{b}{att}.self.query.bias": (H,),
                    f"{b}{att}.self.key.weight": (H, kv_in), f"{b}{att}.self.key.bias": (H,),
                    f"{b}{att}.self.value.weight": (H, kv_in), f"{b}{att}.self.value.bias": (H,),
                    f"{b}{att}.output.dense.weight": (H, H), f"{b}{att}.output.dense.bias": (H,),
                    f"{b}{att}.output.LayerNorm.weight": (H,), f"{b}{att}.output.LayerNorm.bias": (H,),
                }
            )  # fmt: skip
        shapes.update(
            {
                b + "intermediate.dense.weight": (I, H), b + "intermediate.dense.bias": (I,),
                b + "output.dense.weight": (H, I), b + "output.dense.bias": (H,),
                b + "output.LayerNorm.weight": (H,), b + "output.LayerNorm.bias": (H,),
            }
        )  # fmt: skip
    shapes.update({"blip.vision_proj.weight": (embed_dim, W), "blip.vision_proj.bias": (embed_dim,)})
    shapes.update({"blip.text_proj.weight": (embed_dim, H), "blip.text_proj.bias": (embed_dim,)})
    widths = (H,) + HEAD_WIDTHS
    for j, idx in enumerate((0, 2, 4, 6, 7)):
        shapes[f"mlp.layers.{idx}.weight"] = (widths[j + 1], widths[j])
        shapes[f"mlp.layers.{idx}.bias"] = (widths[j + 1],)
    return shapes


def random_original_state_dict(vision: VisionTowerConfig, med_config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the original checkpoint layout (same seed -> same tensors).

    Scales keep activations O(1) so that scores differ between images and prompts: matrices
    N(0, 1/fan_in), LayerNorm gains 1 + N(0, 0.1), biases and embeddings N(0, 0.02) / N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in original_state_dict_shapes(vision, med_config).items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1]).expand(shape).clone()
        elif "norm" in key.lower() and key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            out[key] = 0.02 * torch.randn(shape, generator=g)
        elif key.endswith(("cls_token", "pos_embed")) or "embeddings" in key:
            out[key] = torch.randn(shape, generator=g) * (0.02 if "position" in key or "pos_embed" in key else 1.0)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def tiny_med_config(vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64) -> dict:
    """A med_config.json (BertConfig fields ImageReward reads) for a small text tower."""
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,  # overridden by the vision width, as in BLIP_Pretrain
        "add_cross_attention": True,
    }


def write_random_checkpoint(
    folder: str | os.PathLike,
    vision: VisionTowerConfig = TINY_VISION,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_intermediate: int = 64,
    seed: int = 0,
) -> Path:
    """Write a random ImageReward in the official layout: ImageReward.pt, med_config.json, vocab.txt
    (the tiny vocabulary) and vision_tower.json (its VisionTowerConfig, for reference). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # + [DEC] and [ENC], which BLIP's tokenizer appends, as in the official vocab_size (30522 + 2).
    med = tiny_med_config(len(vocab) + 2, text_hidden, text_layers, text_heads, text_intermediate)
    (folder / MED_CONFIG_FILE).write_text(json.dumps(med, indent=2) + "\n", encoding="utf-8")
    (folder / "vision_tower.json").write_text(json.dumps(asdict(vision), indent=2) + "\n", encoding="utf-8")
    torch.save(random_original_state_dict(vision, med, seed), folder / CHECKPOINT_FILE)
    return folder
