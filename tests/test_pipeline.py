"""FastFacePipeline on tiny models: the authors' outputs, branch layout, invariances, UNet rows, isolation."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from fastface.attention import AM1, AM2, AMConfig, FastFaceIPAttnProcessor
from fastface.guidance import DCG_PRESET, DCGConfig
from fastface.pipeline import FastFacePipeline, load_faceid_adapter
from fastface.presets import PRESETS

from conftest import AUTHORS_E2E
from noise import tolerance

PRESET_NAMES = ["baseline", "dcg", "am1", "am2", "ff-am1", "ff-am2"]
PROMPTS = ["van gogh style; person walking on a beach", "a photo of a person in a cafe", "pixel art; person reading"]
SIZE = 32  # latents 16×16: every mechanism still acts (see test_every_preset_changes_the_image)


def _identities(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.normal(size=(n, 128)).astype(np.float32)
    ids /= np.linalg.norm(ids, axis=1, keepdims=True)
    crops = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]
    return ids, crops


IDS, CROPS = _identities(3)


def _run(pipe, idx, preset="baseline", **kw):
    idx = list(idx)
    kw.setdefault("seeds", [10 + i for i in idx])
    out = pipe(
        [PROMPTS[i] for i in idx], id_embeds=IDS[idx], face_crops=[CROPS[i] for i in idx], preset=preset,
        height=SIZE, width=SIZE, num_inference_steps=4, output_type="np", **kw,
    )
    return out.images, out.metadata


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
    """The tiny pipeline with a deterministic (DDIM) and a stochastic (Euler ancestral) scheduler."""
    ancestral = FastFacePipeline(**{
        **tiny_pipeline.components,
        "scheduler": EulerAncestralDiscreteScheduler.from_config(tiny_pipeline.scheduler.config,
                                                                 timestep_spacing="trailing"),
    })
    return {"ddim": tiny_pipeline, "euler-ancestral": ancestral}


@pytest.fixture(scope="module")
def singles(pipes):
    """Each of the three examples made alone, per scheduler and preset (cached across tests)."""

    @functools.cache
    def get(scheduler, preset):
        return np.concatenate([_run(pipes[scheduler], [i], preset)[0] for i in range(3)])

    return get


@pytest.fixture(scope="module")
def pipes64(tiny_models, pipes):
    """Float64 copies of ``pipes``: the reference that measures float32's rounding noise (tests/noise.py)."""
    pipe = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float64, default_guidance=1.0)
    pipe.set_progress_bar_config(disable=True)
    load_faceid_adapter(pipe, tiny_models.adapter, image_encoder=tiny_models.image_encoder)
    return {name: FastFacePipeline(**{**pipe.components, "scheduler": p.scheduler}) for name, p in pipes.items()}


@pytest.fixture(scope="module")
def tolerance_of(pipes64, singles):
    """Per scheduler and preset: how far two float32 images of the same examples may differ,
    ``tests/noise.py``'s multiple of |float32 − float64| measured on the three examples made alone."""

    @functools.cache
    def get(scheduler, preset):
        return tolerance(singles(scheduler, preset), _run(pipes64[scheduler], [0, 1, 2], preset)[0])

    return get


# -- parity with the authors' code ------------------------------------------------------


@pytest.fixture(scope="module")
def authors_pipe():
    pipe = FastFacePipeline.from_pretrained(AUTHORS_E2E / "sdxl", torch_dtype=torch.float32, default_guidance=1.0)
    pipe.set_progress_bar_config(disable=True)
    return load_faceid_adapter(
        pipe, AUTHORS_E2E / "adapter" / "ip-adapter-faceid-plusv2_sdxl_tiny.bin",
        image_encoder=AUTHORS_E2E / "image_encoder",
    )


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_matches_authors_pipeline(authors_pipe, preset):
    ref = np.load(AUTHORS_E2E / "outputs.npz")
    out = authors_pipe(
        str(ref["prompt"]), id_embeds=ref["id_embed"][None], face_crops=[ref["face_crop"]], preset=preset,
        latents=torch.from_numpy(ref["latents"]), num_inference_steps=4, height=64, width=64,
        ip_adapter_scale=0.8, lora_scale=1.0, output_type="np",
    )
    assert np.abs(out.images[0] - ref[f"image_{preset}"]).max() <= 1e-3


# -- branch layout -------------------------------------------------------------------------


def _capture_unet_inputs(pipe):
    calls = []
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]

    def unet_hook(module, args, kwargs):
        cond = kwargs["added_cond_kwargs"]
        calls.append({
            "prompt_embeds": kwargs["encoder_hidden_states"].clone(),
            "text_embeds": cond["text_embeds"].clone(),
            "time_ids": cond["time_ids"].clone(),
            "image_embeds": cond["image_embeds"][0].clone(),
            "clip_embeds": proj.clip_embeds.clone(),
        })

    return calls, pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)


@pytest.mark.parametrize("variant", ["id", "text", "independent"])
def test_branch_layout(tiny_pipeline, variant):
    pipe = tiny_pipeline
    calls, handle = _capture_unet_inputs(pipe)
    try:
        _run(pipe, [0, 1], dcg=DCGConfig(alpha=1.5, beta=3.0, rescale=0.5, variant=variant), am=None)
    finally:
        handle.remove()
    pe, _, pooled, _ = pipe.encode_prompt([PROMPTS[0], PROMPTS[1]], device="cpu", do_classifier_free_guidance=True)
    crops = pipe.encode_face_crops([CROPS[0], CROPS[1]])
    null_crop = pipe.null_clip_states()
    ids = torch.from_numpy(IDS[[0, 1]])
    expected_time_ids = torch.tensor([SIZE, SIZE, 0, 0, SIZE, SIZE], dtype=torch.float32)  # (orig, crop, target)
    conditions = {"id": [(0, 0), (0, 1), (1, 1)], "text": [(0, 0), (1, 0), (1, 1)], "independent": [(0, 0), (1, 0), (0, 1)]}
    assert len(calls) == 4
    for call in calls:
        assert call["prompt_embeds"].shape[0] == 6  # [b0 × 2, b1 × 2, b2 × 2]
        for k, (text, ident) in enumerate(conditions[variant]):
            rows = slice(2 * k, 2 * k + 2)
            assert torch.equal(call["prompt_embeds"][rows], pe if text else torch.zeros_like(pe))
            assert torch.equal(call["text_embeds"][rows], pooled if text else torch.zeros_like(pooled))
            assert torch.equal(call["time_ids"][rows], expected_time_ids.expand(2, -1))
            assert torch.equal(call["image_embeds"][rows, 0], ids if ident else torch.zeros_like(ids))
            clip = call["clip_embeds"][rows, 0]
            assert torch.allclose(clip, crops if ident else null_crop.expand(2, -1, -1), atol=1e-6)


def test_single_branch_equals_the_same_condition_in_another_layout(tiny_pipeline):
    """α = 1, β = 0 in `id` is ε(∅, id); so is α = 0, β = 1 in `independent`: one UNet row each."""
    a, meta_a = _run(tiny_pipeline, [0], dcg=DCGConfig(alpha=1.0, beta=0.0, variant="id"), am=None)
    b, meta_b = _run(tiny_pipeline, [0], dcg=DCGConfig(alpha=0.0, beta=1.0, variant="independent"), am=None)
    base, _ = _run(tiny_pipeline, [0], "baseline")
    assert meta_a[0]["unet_rows_per_step"] == [1, 1, 1, 1] == meta_b[0]["unet_rows_per_step"]
    assert np.abs(a - b).max() <= 1e-5
    assert np.abs(a - base).mean() >= 1e-4  # the prompt matters: ε(∅, id) is not ε(text, id)


# -- invariances ------------------------------------------------------------------------------

IDENTITY_AM = AMConfig(transform="scale_power", name="identity")  # s = 1, p = 1: f(A) = A


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_identity_am_equals_diffusers_processor(pipes, singles, tolerance_of, scheduler, preset):
    pipe = pipes[scheduler]
    ours, meta = _run(pipe, [0], preset, am=IDENTITY_AM)
    theirs, _ = _run(pipe, [0], preset, am=None)
    assert meta[0]["am"]["name"] == "identity"
    # Two float32 paths of one computation: within the measured noise floor (tests/noise.py).
    assert np.abs(ours - theirs).max() <= tolerance_of(scheduler, preset)


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_batch_equals_one_at_a_time(pipes, singles, tolerance_of, scheduler, preset):
    batched, meta = _run(pipes[scheduler], [0, 1, 2], preset)
    assert [m["seed"] for m in meta] == [10, 11, 12] and meta[0]["batch_size"] == 3
    # Float32 rounding differs with the batch (BLAS blocking; AdaIN divides by a std): the bound is
    # the measured noise floor of this scheduler and preset (tests/noise.py), not a fixed number.
    assert np.abs(batched - singles(scheduler, preset)).max() <= tolerance_of(scheduler, preset)


@pytest.mark.parametrize("preset", ["am2", "ff-am2"])
def test_authors_quantile_rounding_stays_close_when_batched(pipes, preset):
    """With the authors' float16 rounding of AM2's quantile (opt-in), last-bit BLAS differences between
    batch sizes can flip a quantile by one fp16 ulp: isolated pixels move, by at most ~1e-3."""
    am = dataclasses.replace(PRESETS.get(preset).am, quantile_fp16=True)
    batched, _ = _run(pipes["ddim"], [0, 1, 2], preset, am=am)
    alone = np.concatenate([_run(pipes["ddim"], [i], preset, am=am)[0] for i in range(3)])
    diff = np.abs(batched - alone)
    assert diff.max() <= 1e-3 and (diff > 1e-4).mean() < 0.01


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])
@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "baseline"])
def test_every_preset_changes_the_image(singles, scheduler, preset):
    diff = np.abs(singles(scheduler, preset) - singles(scheduler, "baseline")).mean()
    assert diff >= 1e-4, f"{preset} differs from baseline by only {diff:.2e}"


def test_generators_equal_seeds_and_repeatability(tiny_pipeline):
    a, _ = _run(tiny_pipeline, [0, 1], "ff-am1")
    b, _ = _run(tiny_pipeline, [0, 1], "ff-am1", seeds=None, generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    c, _ = _run(tiny_pipeline, [0, 1], "ff-am1")
    assert np.array_equal(a, c)  # bit-for-bit repeatable
    assert np.abs(a - b).max() == 0
    d, _ = _run(tiny_pipeline, [0, 1], "ff-am1", seeds=[10, 99])
    assert np.array_equal(a[0], d[0]) and not np.allclose(a[1], d[1])


# -- UNet rows per step ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,kwargs,expected",
    [
        ("baseline", {}, [1, 1, 1, 1]),
        ("am1", {}, [1, 1, 1, 1]),
        ("baseline", {"default_guidance": 1.5}, [2, 2, 2, 2]),
        ("dcg", {}, [2, 3, 3, 2]),
        ("ff-am1", {}, [2, 3, 3, 2]),
        ("am2", {}, [3, 3, 3, 3]),
        ("ff-am2", {}, [3, 3, 3, 3]),
        ("am2", {"approximate_am2_skipping": True}, [1, 1, 1, 1]),
        ("ff-am2", {"approximate_am2_skipping": True}, [2, 3, 3, 2]),
    ],
)
def test_unet_rows_per_step(tiny_pipeline, preset, kwargs, expected):
    rows = []
    handle = tiny_pipeline.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        _, meta = _run(tiny_pipeline, [0, 1], preset, **kwargs)
    finally:
        handle.remove()
    assert [r // 2 for r in rows] == expected  # two images per call
    assert meta[0]["unet_rows_per_step"] == expected and meta[0]["unet_rows"] == sum(expected)


def test_approximate_am2_skipping_is_an_approximation(tiny_pipeline):
    exact, _ = _run(tiny_pipeline, [0], "am2")
    approx, _ = _run(tiny_pipeline, [0], "am2", approximate_am2_skipping=True)
    assert 0 < np.abs(exact - approx).mean()


# -- isolation ---------------------------------------------------------------------------------


def test_two_pipelines_side_by_side(tiny_models, tiny_pipeline):
    other = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float32, default_guidance=1.0)
    load_faceid_adapter(other, tiny_models.adapter, image_encoder=tiny_models.image_encoder)
    constants = [AM1.to_dict(), AM2.to_dict(), DCG_PRESET.to_dict(), [p.to_dict() for _, p in PRESETS.items()]]
    before = dict(tiny_pipeline.unet.attn_processors)
    scale_before = tiny_pipeline.current_ip_adapter_scale()
    alone_a, _ = _run(tiny_pipeline, [0], "ff-am2", ip_adapter_scale=0.5)
    alone_b, _ = _run(other, [1], "am1", ip_adapter_scale=0.95, lora_scale=0.5)
    mixed_b, _ = _run(other, [1], "am1", ip_adapter_scale=0.95, lora_scale=0.5)
    mixed_a, _ = _run(tiny_pipeline, [0], "ff-am2", ip_adapter_scale=0.5)
    assert np.array_equal(alone_a, mixed_a) and np.array_equal(alone_b, mixed_b)
    after = tiny_pipeline.unet.attn_processors
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert not any(isinstance(p, FastFaceIPAttnProcessor) for p in after.values())
    assert tiny_pipeline.current_ip_adapter_scale() == scale_before  # λ restored after the call
    assert tiny_pipeline.unet.encoder_hid_proj.image_projection_layers[0].clip_embeds is None
    assert constants == [AM1.to_dict(), AM2.to_dict(), DCG_PRESET.to_dict(), [p.to_dict() for _, p in PRESETS.items()]]


def test_processors_restored_after_an_error(tiny_pipeline):
    before = dict(tiny_pipeline.unet.attn_processors)
    seen = []

    def boom(module, args):
        seen.append(sum(isinstance(p, FastFaceIPAttnProcessor) for p in module.attn_processors.values()))
        if len(seen) == 2:
            raise RuntimeError("injected failure")

    handle = tiny_pipeline.unet.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            _run(tiny_pipeline, [0], "ff-am2")
    finally:
        handle.remove()
    assert seen[0] == 10  # AM on every down/up attn2 of the tiny UNet (4 down + 6 up), none on mid
    after = tiny_pipeline.unet.attn_processors
    assert all(before[k] is after[k] for k in before)


def test_am_targets_down_and_up_only(tiny_pipeline):
    seen = {}

    def hook(module, args):
        seen.update({k: type(p) for k, p in module.attn_processors.items() if ".attn2." in k})

    handle = tiny_pipeline.unet.register_forward_pre_hook(hook)
    try:
        _run(tiny_pipeline, [0], "am1")
    finally:
        handle.remove()
    for name, cls in seen.items():
        expected = IPAdapterAttnProcessor2_0 if name.startswith("mid_block") else FastFaceIPAttnProcessor
        assert cls is expected, name
    # set_ip_adapter_scale reaches our processors (they subclass diffusers' IP-Adapter processor)
    proc = FastFaceIPAttnProcessor(next(iter(
        p for k, p in tiny_pipeline.unet.attn_processors.items() if k.startswith("down") and ".attn2." in k)),
        part="down", am=AM1, step=None)
    assert isinstance(proc, IPAdapterAttnProcessor2_0)


# -- input validation --------------------------------------------------------------------------


def test_bad_inputs_fail_before_generating(tiny_pipeline):
    calls = []
    handle = tiny_pipeline.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"preset 'dcg'.*4 steps but 2 steps"):
            tiny_pipeline(PROMPTS[0], id_embeds=IDS[[0]], face_crops=[CROPS[0]], preset="dcg", num_inference_steps=2)
        with pytest.raises(ValueError, match=r"id_embeds must be \[1, 128\]"):
            tiny_pipeline(PROMPTS[0], id_embeds=np.zeros((1, 512), np.float32), face_crops=[CROPS[0]])
        with pytest.raises(ValueError, match="exactly one of face_crops"):
            tiny_pipeline(PROMPTS[0], id_embeds=IDS[[0]])
        with pytest.raises(ValueError, match="one seed per example"):
            tiny_pipeline(PROMPTS[:2], id_embeds=IDS[[0, 1]], face_crops=CROPS[:2], seeds=[1])
        with pytest.raises(KeyError, match="Valid presets: .*ff-am2"):
            tiny_pipeline(PROMPTS[0], id_embeds=IDS[[0]], face_crops=[CROPS[0]], preset="ff_am3")
    finally:
        handle.remove()
    assert calls == []


def test_precomputed_clip_states_equal_face_crops(tiny_pipeline):
    a, _ = _run(tiny_pipeline, [0, 1], "ff-am1")
    states = tiny_pipeline.encode_face_crops(CROPS[:2])
    b = tiny_pipeline(PROMPTS[:2], id_embeds=IDS[[0, 1]], clip_states=states, preset="ff-am1", seeds=[10, 11],
                      height=SIZE, width=SIZE, output_type="np").images
    assert np.abs(a - b).max() <= 1e-6


def test_paper_text_am1_option_changes_the_image(tiny_pipeline):
    from fastface.attention import AM1_PAPER_TEXT

    a, _ = _run(tiny_pipeline, [0], "am1")
    b, meta = _run(tiny_pipeline, [0], "am1", am=AM1_PAPER_TEXT)
    assert meta[0]["am"]["name"] == "AM1-paper-text" and np.abs(a - b).mean() > 1e-5
    assert dataclasses.asdict(AM1)["scale"] != dataclasses.asdict(AM1_PAPER_TEXT)["scale"]
