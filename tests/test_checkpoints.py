"""Checkpoint registry and loading: real checkpoint entries loaded from local folders of tiny weights."""

from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from fastface.checkpoints import (
    CHECKPOINTS,
    ModelNotFoundError,
    check_steps,
    find_weights,
    get_checkpoint,
    load_pipeline,
)
from fastface.registry import UnknownNameError
from fastface.tiny_checkpoints import HYPER_LORA_FILE, LIGHTNING_UNET_FILE, ensure_tiny_checkpoints, step_file

from noise import DISTINCT, tolerance


@pytest.fixture(scope="module")
def tiny(fastface_cache):
    from fastface.tiny import TINY_VERSION

    return ensure_tiny_checkpoints(fastface_cache / f"tiny-v{TINY_VERSION}")


def weight(module, name):
    """A parameter by its plain name, also when a peft LoRA wraps the layer (``.base_layer.``)."""
    params = dict(module.named_parameters())
    if name in params:
        return params[name]
    layer, _, leaf = name.rpartition(".")
    return params[f"{layer}.base_layer.{leaf}"]


def local_sources(models, **extra):
    return dict(sdxl_base=str(models.sdxl), faceid_adapter=str(models.adapter), clip_h=str(models.image_encoder),
                **extra)


def test_registry_matches_method_spec():
    hyper, lightning, lcm, turbo, base = (get_checkpoint(n) for n in ("hyper", "lightning", "lcm", "turbo", "base"))
    assert (hyper.steps, hyper.size, hyper.default_guidance) == ((1, 2, 4, 8), 1024, 1.0)
    assert dict(hyper.scheduler.overrides) == {"timestep_spacing": "trailing"}
    assert hyper.scheduler.class_name == "DDIMScheduler"
    assert lightning.scheduler.class_name == "EulerDiscreteScheduler" and lightning.steps == (2, 4, 8)
    assert lcm.scheduler.class_name == "LCMScheduler" and lcm.default_guidance == 1.5
    assert turbo.size == 512 and turbo.scheduler.from_weights and turbo.steps == (1, 2, 3, 4)
    assert base.steps is None and base.default_steps == 30 and base.default_guidance == 5.0
    for name in ("hyper", "lightning", "lcm", "turbo"):
        t = get_checkpoint(f"tiny-{name}")
        real = get_checkpoint(name)
        assert (t.tiny, t.build, t.scheduler, t.steps, t.id_embed_dim) == (True, real.build, real.scheduler,
                                                                           real.steps, 128)
    assert get_checkpoint("tiny-turbo").size == 32 and get_checkpoint("tiny-hyper").size == 64
    assert step_file(HYPER_LORA_FILE, 1) == "Hyper-SDXL-1step-lora.safetensors"
    assert step_file(HYPER_LORA_FILE, 8) == "Hyper-SDXL-8steps-lora.safetensors"
    assert step_file(LIGHTNING_UNET_FILE, 4) == "sdxl_lightning_4step_unet.safetensors"
    with pytest.raises(UnknownNameError, match="tiny-hyper"):
        get_checkpoint("hyperr")


def test_check_steps_names_preset_and_steps():
    assert check_steps("hyper", "dcg") == 4
    assert check_steps("hyper", "baseline", 2) == 2
    with pytest.raises(ValueError, match=r"preset 'dcg'.* 2 steps"):
        check_steps("hyper", "dcg", 2)
    with pytest.raises(ValueError, match=r"'lightning' supports 2, 4, 8 steps, not 1"):
        check_steps("lightning", "baseline", 1)
    assert check_steps("base", "baseline") == 30


def test_missing_weights_name_the_model_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTFACE_SDXL_BASE", raising=False)
    with pytest.raises(ModelNotFoundError) as info:
        find_weights("hyper", local_files_only=True, cache_dir=tmp_path)
    message = str(info.value)
    for needle in ("stabilityai/stable-diffusion-xl-base-1.0", "FASTFACE_SDXL_BASE", "--source sdxl_base=PATH",
                   "Hyper-SDXL-4steps-lora.safetensors", "FASTFACE_HYPER_LORA", "FASTFACE_FACEID_ADAPTER",
                   "FASTFACE_CLIP_H"):
        assert needle in message
    monkeypatch.setenv("FASTFACE_SDXL_BASE", str(tmp_path / "no-such-sdxl"))
    with pytest.raises(ModelNotFoundError, match="no-such-sdxl"):
        load_pipeline("hyper", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown weight source"):
        find_weights("hyper", sdxl=str(tmp_path))
    with pytest.raises(ValueError, match="does not use"):
        find_weights("hyper", turbo=str(tmp_path))


def test_fused_lora_family_from_local_folder_is_fused_once_and_cached(tiny, tmp_path, monkeypatch):
    models, weights = tiny
    calls = []
    real_fuse = diffusers.StableDiffusionXLPipeline.fuse_lora

    def counting_fuse(self, *args, **kwargs):
        calls.append(kwargs.get("adapter_names"))
        return real_fuse(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "fuse_lora", counting_fuse)
    sources = local_sources(models, hyper_lora=str(weights.hyper_lora))  # a folder holding the n-step files
    first = load_pipeline("hyper", steps=4, cache_dir=tmp_path, device="cpu", **sources)
    assert calls == [["distilled"]]
    cache = first.load_info["fused_cache"]
    assert cache and (tmp_path / "fused").is_dir()
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == [cache.rsplit("/", 1)[1]]

    second = load_pipeline("hyper", steps=4, cache_dir=tmp_path, device="cpu", **sources)
    assert calls == [["distilled"]], "the second load must reuse the fused cache"
    assert second.load_info["fused_cache"] == cache
    base_unet = diffusers.UNet2DConditionModel.from_pretrained(models.sdxl, subfolder="unet")
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused = weight(first.unet, name)
    assert torch.equal(fused, weight(second.unet, name))
    # The LoRA moved the weight by far more than fusing rounds: the noise floor of W + s·B·A is that
    # of the same sum redone in float64 from the LoRA file (tests/noise.py; lora_alpha = rank).
    base = weight(base_unet, name).detach()
    lora = load_file(str(weights.hyper_lora / step_file(HYPER_LORA_FILE, 4)))
    down, up = (lora[f"unet.{name.removesuffix('.weight')}.lora_{x}.weight"].double() for x in "AB")
    fused64 = base.double() + get_checkpoint("hyper").fuse_scale * up @ down
    assert (fused - base).abs().max() > DISTINCT * tolerance(fused.detach(), fused64), "the LoRA was not fused"
    assert "distilled" not in (getattr(second.unet, "peft_config", None) or {})
    assert "faceid_0" in second.unet.peft_config  # the adapter's own LoRA stays a live adapter
    assert isinstance(second.scheduler, diffusers.DDIMScheduler)
    assert second.scheduler.config.timestep_spacing == "trailing"
    assert second.default_guidance == 1.0

    # another step count is another LoRA file, hence another cache entry
    load_pipeline("hyper", steps=2, cache_dir=tmp_path, device="cpu", **sources)
    assert len(calls) == 2 and len(list((tmp_path / "fused").iterdir())) == 2


def test_unet_replacement_families_from_local_files_and_folders(tiny, tmp_path):
    models, weights = tiny
    file = weights.lightning_unet / "sdxl_lightning_2step_unet.safetensors"
    pipe = load_pipeline("lightning", steps=2, cache_dir=tmp_path, device="cpu",
                         **local_sources(models, lightning_unet=str(file)))
    state = load_file(str(file))
    name = "up_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(weight(pipe.unet, name), state[name])
    assert isinstance(pipe.scheduler, diffusers.EulerDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.load_info["fused_cache"] is None and not (tmp_path / "fused").exists()

    turbo = load_pipeline("turbo", steps=1, cache_dir=tmp_path, device="cpu",
                          **local_sources(models, turbo=str(weights.turbo)))
    assert isinstance(turbo.scheduler, diffusers.EulerAncestralDiscreteScheduler)
    assert turbo.unet.config.sample_size == 16  # turbo's own UNet config, not the base's
    turbo_state = load_file(str(weights.turbo / "unet" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(weight(turbo.unet, name), turbo_state[name])


def test_lcm_and_tiny_defaults(fastface_cache):
    pipe = load_pipeline("tiny-lcm", cache_dir=fastface_cache, device="cpu")
    assert isinstance(pipe.scheduler, diffusers.LCMScheduler)
    assert pipe.default_guidance == 1.5 and pipe.checkpoint is CHECKPOINTS.get("tiny-lcm")
    assert pipe.load_info["fused_cache"].startswith(str(fastface_cache / "fused"))
