"""The default guidance (α = β of presets without DCG) is state of the loaded model, never a class attribute."""

from __future__ import annotations

import numpy as np
import torch

from fastface.pipeline import SDXL_DEFAULT_GUIDANCE, FastFacePipeline, load_faceid_adapter


def _baseline(pipe) -> dict:
    rng = np.random.default_rng(0)
    out = pipe(["a photo of a person"], id_embeds=rng.normal(size=(1, 128)).astype(np.float32),
               face_crops=[rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)], preset="baseline",
               num_inference_steps=2, height=32, width=32, output_type="np")
    return out.metadata[0]


def test_sdxl_default_is_read_from_diffusers():
    import inspect

    from diffusers import StableDiffusionXLPipeline

    assert SDXL_DEFAULT_GUIDANCE == inspect.signature(StableDiffusionXLPipeline.__call__).parameters[
        "guidance_scale"].default == 5.0


def test_base_sdxl_runs_baseline_at_guidance_5_however_it_is_loaded(tiny_models, tmp_path):
    from fastface.checkpoints import load_pipeline

    # 1. a plain SDXL folder (the tiny models' SDXL is a base SDXL) through diffusers' from_pretrained
    plain = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float32)
    load_faceid_adapter(plain, tiny_models.adapter, image_encoder=tiny_models.image_encoder)
    meta = _baseline(plain)
    assert (meta["dcg"]["alpha"], meta["dcg"]["beta"]) == (5.0, 5.0)
    assert meta["unet_rows_per_step"] == [2, 2]  # plain CFG at 5: the conditioned and the null branch

    # 2. the registered base checkpoint through the project's loader, from local folders
    loaded = load_pipeline("base", steps=2, device="cpu", dtype="float32", sdxl_base=str(tiny_models.sdxl),
                           faceid_adapter=str(tiny_models.adapter), clip_h=str(tiny_models.image_encoder))
    assert loaded.default_guidance == 5.0 and _baseline(loaded)["dcg"]["alpha"] == 5.0

    # 3. saved and loaded back: the folder keeps what it was (unset → SDXL's 5; set → its value)
    plain.save_pretrained(tmp_path / "base")
    assert FastFacePipeline.from_pretrained(tmp_path / "base").default_guidance == 5.0


def test_default_guidance_is_per_pipeline_and_saved(tiny_models, tmp_path):
    lcm_like = FastFacePipeline.from_pretrained(tiny_models.sdxl, default_guidance=1.5)
    other = FastFacePipeline.from_pretrained(tiny_models.sdxl)
    assert (lcm_like.default_guidance, other.default_guidance) == (1.5, 5.0)
    other.set_default_guidance(1.0)
    assert (lcm_like.default_guidance, other.default_guidance) == (1.5, 1.0)  # no shared class state
    assert "default_guidance" not in vars(FastFacePipeline) or isinstance(vars(FastFacePipeline)["default_guidance"],
                                                                          property)
    lcm_like.save_pretrained(tmp_path / "lcm-like")
    assert FastFacePipeline.from_pretrained(tmp_path / "lcm-like").default_guidance == 1.5  # exact through JSON
