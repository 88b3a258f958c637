"""Score (image, prompt) pairs with the ORIGINAL image-reward 1.5 package. Runs in its own venv
(tools/ir_parity/setup_original_env.sh), never in the project's; parity.py calls it.

Offline adaptations, in this runner only:
- BLIP's tokenizer calls BertTokenizer.from_pretrained('bert-base-uncased'); we chdir into a folder
  holding a local ``bert-base-uncased/vocab.txt``, which from_pretrained takes as a local path.
- ``--vision-width/--vision-depth/--vision-heads`` (optional) swap the size of BLIP's ViT for a
  small one by wrapping ``create_vit`` (same VisionTransformer class and code path, fewer weights),
  so that a fast test can check against the original. Without them the original's ViT-L/16 runs.

Usage: python run_original.py --checkpoint-dir DIR --pairs pairs.json --out scores.json
  DIR holds ImageReward.pt, med_config.json and bert-base-uncased/vocab.txt;
  pairs.json is [[image_path, prompt], ...].
"""

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint-dir", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vision-width", type=int)
    ap.add_argument("--vision-depth", type=int)
    ap.add_argument("--vision-heads", type=int)
    args = ap.parse_args()
    ckpt_dir = os.path.abspath(args.checkpoint_dir)
    with open(args.pairs) as f:
        pairs = [(os.path.abspath(p), t) for p, t in json.load(f)]

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import transformers
    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    if args.vision_width:

        def small_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            enc = VisionTransformer(
                img_size=image_size, patch_size=16, embed_dim=args.vision_width, depth=args.vision_depth,
                num_heads=args.vision_heads, use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                drop_path_rate=drop_path_rate,
            )
            return enc, args.vision_width

        blip_pretrain.create_vit = small_vit  # the name BLIP_Pretrain.__init__ calls

    os.chdir(ckpt_dir)  # so that from_pretrained('bert-base-uncased') finds ./bert-base-uncased/vocab.txt
    ckpt = os.path.join(ckpt_dir, "ImageReward.pt")
    model = RM.load(ckpt, device="cpu", med_config=os.path.join(ckpt_dir, "med_config.json"))

    # RM.load uses strict=False and ignores what it did not load: check the layout ourselves.
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
    if missing or unexpected:
        print(f"checkpoint layout differs from the original model: missing={missing[:5]} unexpected={unexpected[:5]}")
        return 1
    assert len(model.blip.tokenizer) <= model.blip.text_encoder.config.vocab_size

    scores = []
    with torch.no_grad():
        for path, prompt in pairs:
            scores.append(float(model.score(prompt, path)))
    token_ids = [model.blip.tokenizer(t, padding="max_length", truncation=True, max_length=35).input_ids for _, t in pairs]
    with open(args.out, "w") as f:
        json.dump(
            {
                "scores": scores,
                "token_ids": token_ids,
                "versions": {
                    "image-reward": "1.5",
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "python": sys.version.split()[0],
                },
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
