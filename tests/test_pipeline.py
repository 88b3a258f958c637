"""FastFacePipeline on tiny models: the authors' outputs, branch layout, invariances, UNet rows, isolation."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from fastface.attention import AM1, AM2, AMConfig
from fastface.attention_processor import FastFaceIPAttnProcessor
from fastface.guidance import DCG_PRESET, DCGConfig
from fastface.pipeline import FastFacePipeline, load_faceid_adapter
from fastface.presets import PRESETS

from conftest import AUTHORS_E2E
from noise import DISTINCT, float32_noise, moved_noise, tolerance

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


def _run64(pipe64, idx, preset="baseline", **kw):
    """:func:`_run` on a float64 pipeline, with the float32 run's noise (:func:`float32_noise`)."""
    with float32_noise():
        return _run(pipe64, idx, preset, **kw)


@pytest.fixture(scope="module")
def pipes(tiny_pipeline):
    """The tiny pipeline with a deterministic (DDIM) and a stochastic (Euler ancestral) scheduler."""
    # guidance 5 (base SDXL's) on purpose: the DDIM runs cover baseline without CFG (guidance 1),
    # these cover it with CFG's two-row layout.
    ancestral = FastFacePipeline(**{
        **tiny_pipeline.components,
        "scheduler": EulerAncestralDiscreteScheduler.from_config(tiny_pipeline.scheduler.config,
                                                                 timestep_spacing="trailing"),
    }, default_guidance=5.0)
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
    # each with its float32 twin's scheduler and default guidance (not a component: FastFacePipeline(**components)
    # would fall back to SDXL's 5)
    return {name: FastFacePipeline(**{**pipe.components, "scheduler": p.scheduler}, default_guidance=p.default_guidance)
            for name, p in pipes.items()}


@pytest.fixture(scope="module")
def tolerance_of(pipes, pipes64, singles):
    """Per scheduler and preset: how far two float32 images of the same examples may differ,
    ``tests/noise.py``'s multiple of |float32 − float64| measured on the three examples made alone.

    Two float32 draws of them: as made, and under :func:`moved_noise`. AM2's AdaIN divides by a std
    over four tokens that can be ~1e-3, so rounding is amplified up to ~1000× and one draw may
    understate the floor several-fold (ff-am2, Euler ancestral, example 2: 1e-5 as made, 7e-5 to
    3e-4 with moved noise). The float64 reference is made alone too, never through the batch
    under test.
    """

    @functools.cache
    def get(scheduler, preset):
        alone64 = np.concatenate([_run64(pipes64[scheduler], [i], preset)[0] for i in range(3)])
        with moved_noise():
            moved = np.concatenate([_run(pipes[scheduler], [i], preset)[0] for i in range(3)])
        return tolerance(np.stack([singles(scheduler, preset), moved]), np.stack([alone64, alone64]))

    return get


# -- parity with the authors' code ------------------------------------------------------


def _authors_pipe(dtype):
    pipe = FastFacePipeline.from_pretrained(AUTHORS_E2E / "sdxl", torch_dtype=dtype, default_guidance=1.0)
    pipe.set_progress_bar_config(disable=True)
    return load_faceid_adapter(
        pipe, AUTHORS_E2E / "adapter" / "ip-adapter-faceid-plusv2_sdxl_tiny.bin",
        image_encoder=AUTHORS_E2E / "image_encoder",
    )


@pytest.fixture(scope="module")
def authors_pipes():
    """The authors' tiny pipeline in float32 and in float64 (the reference of tests/noise.py)."""
    return _authors_pipe(torch.float32), _authors_pipe(torch.float64)


def _authors_image(pipe, ref, preset):
    return pipe(
        str(ref["prompt"]), id_embeds=ref["id_embed"][None], face_crops=[ref["face_crop"]], preset=preset,
        latents=torch.from_numpy(ref["latents"]).to(pipe.dtype), num_inference_steps=4, height=64, width=64,
        ip_adapter_scale=0.8, lora_scale=1.0, output_type="np",
    ).images[0]


# AM2's exact quantile (ours) against the authors' float16-rounded one: not rounding noise, so a named
# bound: the am2 and ff-am2 images differ by 3.4e-4 and 3.1e-4 (measured), allowed with ~20% margin.
EXACT_VS_FP16_QUANTILE = 4e-4


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_matches_authors_pipeline(authors_pipes, preset):
    ref = np.load(AUTHORS_E2E / "outputs.npz")
    ours = _authors_image(authors_pipes[0], ref, preset)
    with float32_noise():
        ours64 = _authors_image(authors_pipes[1], ref, preset)
    # The authors' float32 image is one more rounding path of the same computation: within our noise
    # floor |float32 − float64| on these inputs (tests/noise.py); AM2's quantile aside.
    tol = tolerance(ours, ours64)
    assert np.abs(ours - ref[f"image_{preset}"]).max() <= max(tol, EXACT_VS_FP16_QUANTILE if "am2" in preset else 0)


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
            # the same encoder on the same crops: bit for bit
            assert torch.equal(clip, crops if ident else null_crop.expand(2, -1, -1))


def test_single_branch_equals_the_same_condition_in_another_layout(tiny_pipeline, pipes64):
    """α = 1, β = 0 in `id` is ε(∅, id); so is α = 0, β = 1 in `independent`: one UNet row each."""
    a, meta_a = _run(tiny_pipeline, [0], dcg=DCGConfig(alpha=1.0, beta=0.0, variant="id"), am=None)
    b, meta_b = _run(tiny_pipeline, [0], dcg=DCGConfig(alpha=0.0, beta=1.0, variant="independent"), am=None)
    base, _ = _run(tiny_pipeline, [0], "baseline")
    assert meta_a[0]["unet_rows_per_step"] == [1, 1, 1, 1] == meta_b[0]["unet_rows_per_step"]
    assert np.array_equal(a, b)  # the same UNet row on the same inputs, taken with weight 1: bit for bit
    # the prompt matters: ε(∅, id) is not ε(text, id), by far more than a's noise floor (tests/noise.py)
    a64, _ = _run64(pipes64["ddim"], [0], dcg=DCGConfig(alpha=1.0, beta=0.0, variant="id"), am=None)
    assert np.abs(a - base).max() > DISTINCT * tolerance(a, a64)


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


# A quantile flipped by one float16 ulp is a step, not rounding noise, so a named bound: batched vs alone
# below moved pixels by up to 9.2e-5 (am2; ff-am2 7.1e-5) with one thread, 6.2e-5 with two (measured);
# allowed with a margin of ~2.5×.
QUANTILE_FLIP = 2.5e-4


@pytest.mark.parametrize("preset", ["am2", "ff-am2"])
def test_authors_quantile_rounding_stays_close_when_batched(pipes, preset):
    """With the authors' float16 rounding of AM2's quantile (opt-in), last-bit BLAS differences between
    batch sizes can flip a quantile by one fp16 ulp: pixels move by more than rounding (4–19% of them
    beyond the exact quantile's noise tolerance here), but by at most QUANTILE_FLIP."""
    am = dataclasses.replace(PRESETS.get(preset).am, quantile_fp16=True)
    batched, _ = _run(pipes["ddim"], [0, 1, 2], preset, am=am)
    alone = np.concatenate([_run(pipes["ddim"], [i], preset, am=am)[0] for i in range(3)])
    assert np.abs(batched - alone).max() <= QUANTILE_FLIP


@pytest.mark.parametrize("scheduler", ["ddim", "euler-ancestral"])
@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "baseline"])
def test_every_preset_changes_the_image(singles, tolerance_of, scheduler, preset):
    diff = np.abs(singles(scheduler, preset) - singles(scheduler, "baseline")).max()
    # by far more than the larger of the two noise floors (tests/noise.py)
    tol = max(tolerance_of(scheduler, preset), tolerance_of(scheduler, "baseline"))
    assert diff > DISTINCT * tol, f"{preset} differs from baseline by only {diff:.2e} (tolerance {tol:.1e})"


def test_generators_equal_seeds_and_repeatability(tiny_pipeline, tolerance_of):
    a, _ = _run(tiny_pipeline, [0, 1], "ff-am1")
    b, _ = _run(tiny_pipeline, [0, 1], "ff-am1", seeds=None, generator=[torch.Generator().manual_seed(s) for s in (10, 11)])
    c, _ = _run(tiny_pipeline, [0, 1], "ff-am1")
    assert np.array_equal(a, c)  # bit-for-bit repeatable
    assert np.abs(a - b).max() == 0
    d, _ = _run(tiny_pipeline, [0, 1], "ff-am1", seeds=[10, 99])
    assert np.array_equal(a[0], d[0])
    assert np.abs(a[1] - d[1]).max() > DISTINCT * tolerance_of("ddim", "ff-am1")  # another seed, another image


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


def test_approximate_am2_skipping_is_an_approximation(tiny_pipeline, tolerance_of):
    exact, _ = _run(tiny_pipeline, [0], "am2")
    approx, _ = _run(tiny_pipeline, [0], "am2", approximate_am2_skipping=True)
    # not the exact result up to rounding: by far more than its noise floor (tests/noise.py)
    assert np.abs(exact - approx).max() > DISTINCT * tolerance_of("ddim", "am2")


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
    assert np.array_equal(a, b)  # the same encoder on the same crops, batched alike: bit for bit


def test_paper_text_am1_option_changes_the_image(tiny_pipeline, tolerance_of):
    from fastface.attention import AM1_PAPER_TEXT

    a, _ = _run(tiny_pipeline, [0], "am1")
    b, meta = _run(tiny_pipeline, [0], "am1", am=AM1_PAPER_TEXT)
    # by far more than am1's noise floor (tests/noise.py)
    assert meta[0]["am"]["name"] == "AM1-paper-text" and np.abs(a - b).max() > DISTINCT * tolerance_of("ddim", "am1")
    assert dataclasses.asdict(AM1)["scale"] != dataclasses.asdict(AM1_PAPER_TEXT)["scale"]


# -- no host synchronisation in the attention processors --------------------------------------

# Ways a tensor value reaches Python (a host-device synchronisation on a GPU), and building a
# tensor from Python data (a host-to-device copy): none may run inside a processor call.
_READBACKS = ("item", "tolist", "numpy", "nonzero", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def readback_counter(monkeypatch):
    """Counts read-backs while a FastFaceIPAttnProcessor call is on the stack (and nowhere else)."""
    counts: dict[str, int] = {}
    depth = [0]

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0]:
                counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    for name in _READBACKS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor", "nonzero"):
        monkeypatch.setattr(torch, name, counting(f"torch.{name}", getattr(torch, name)))
    original_call = FastFaceIPAttnProcessor.__call__

    @functools.wraps(original_call)  # diffusers inspects the signature
    def call(self, *args, **kwargs):
        depth[0] += 1
        try:
            return original_call(self, *args, **kwargs)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(FastFaceIPAttnProcessor, "__call__", call)
    calls = []
    monkeypatch.setattr(FastFaceIPAttnProcessor, "token_plan", counting_calls(FastFaceIPAttnProcessor.token_plan, calls))
    # the counter itself works: inside a processor call each of these is seen
    depth[0] += 1
    t = torch.ones(2)
    bool(t[0]), t[0].item(), t.tolist(), int(t[0]), float(t[0]), t.nonzero(), torch.tensor([1])
    depth[0] -= 1
    assert {"__bool__", "item", "tolist", "__int__", "__float__", "nonzero", "torch.tensor"} <= counts.keys()
    counts.clear()
    return counts, calls


def counting_calls(fn, calls):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("preset,am", [  # am None: the preset's own
    ("am1", None), ("am2", None), ("ff-am1", None), ("ff-am2", None),
    ("ff-am2", dataclasses.replace(AM2, quantile_fp16=True, tokens=(0, 2, 3))),  # index gather/scatter, fp16 q
])
def test_attention_processors_never_read_back_to_python(tiny_pipeline, readback_counter, preset, am):
    counts, plan_calls = readback_counter
    kwargs = {} if am is None else {"am": am}
    _, meta = _run(tiny_pipeline, [0, 1], preset, **kwargs)
    assert meta[0]["steps"] == 4
    assert plan_calls, "no AM processor ran"
    assert counts == {}, f"tensor values read back (or tensors built from Python data) inside processors: {counts}"


# -- low precision ------------------------------------------------------------------------------


def _half_supported_on_cpu() -> bool:
    """float16 on CPU needs half kernels for conv, group norm, softmax and topk (old torch lacks some)."""
    try:
        x = torch.rand(1, 4, 8, 8).half()
        torch.nn.functional.group_norm(torch.nn.functional.conv2d(x, torch.rand(4, 4, 3, 3).half()), 2)
        torch.softmax(x, -1).topk(2, dim=-1)
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.fixture(scope="module")
def low_precision_pipes(tiny_models):
    def build(dtype):
        pipe = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return load_faceid_adapter(pipe, tiny_models.adapter, image_encoder=tiny_models.image_encoder)

    return functools.cache(build)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_presets_give_finite_images(low_precision_pipes, singles, dtype):
    """float16 (the authors' dtype, ours on GPUs) and bfloat16 on CPU: finite images, and AM still acts.

    Noise floor: the same baseline computed through a second code path in this dtype (our
    processor with the identity AM, f(A) = A, instead of diffusers' sdpa) is what rounding in
    this dtype alone changes; each AM preset must move its image away from the baseline by more
    than ``ROUNDING_PATHS`` times that (tests/noise.py).
    """
    from noise import ROUNDING_PATHS

    if dtype == torch.float16 and not _half_supported_on_cpu():
        pytest.skip("this torch has no float16 CPU kernels; bfloat16 covers CPU low precision")
    pipe = low_precision_pipes(dtype)
    images = {p: _run(pipe, [0], p)[0].astype(np.float64) for p in PRESET_NAMES}
    for preset, image in images.items():
        assert np.isfinite(image).all(), preset
    same_math = _run(pipe, [0], "baseline", am=IDENTITY_AM)[0].astype(np.float64)
    floor = np.abs(same_math - images["baseline"]).mean()
    for preset in ("am1", "am2", "ff-am1", "ff-am2"):
        assert np.abs(images[preset] - images["baseline"]).mean() > ROUNDING_PATHS * floor, preset


# -- the benchmark's code paths (no figures checked: tests never time) ---------------------------


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_overhead_and_batch_tables(fastface_cache, capsys):
    bench = _bench()
    assert bench.main(["--tables", "overhead", "batch", "--presets", "dcg", "ff-am2", "--repeats", "1",
                       "--size", "32", "--cache-dir", str(fastface_cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("dcg") and "(no AM)" in line for line in lines)
    overhead = next(line.split() for line in lines if line.startswith("ff-am2"))
    assert overhead[1] == "12" and len(overhead) == 12  # rows; AM, identity and none columns
    batch = [line.split() for line in lines if line.startswith(("dcg ", "ff-am2 ")) and "x" in line]
    assert [b[0] for b in batch] == ["dcg", "ff-am2"]


def test_bench_sdxl_shaped_path_runs_scaled_down():
    """``--sdxl-shapes`` builds its pipeline with the SDXL layout (3 levels, 2048-wide text states, 1280-wide
    CLIP-H states, a FaceID-Plus-v2 adapter of those shapes); here with narrow channels, float32 on CPU."""
    bench = _bench()
    unet = dict(bench.SDXL_UNET_CONFIG, block_out_channels=[32, 64, 64], attention_head_dim=[1, 1, 2],
                transformer_layers_per_block=[1, 1, 2], layers_per_block=1)
    vae = dict(bench.SDXL_VAE_CONFIG, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    dtype = torch.float32
    pipe = bench.sdxl_shaped_pipeline("cpu", dtype, unet_config=unet, vae_config=vae)
    pipe.set_progress_bar_config(disable=True)
    inputs = bench.make_inputs(pipe, 4)
    import time

    res = bench.am_overhead(pipe, inputs, preset="ff-am2", steps=4, size=32, device="cpu", repeats=1,
                            clock=time.perf_counter)
    assert res["rows"] == 12 and set(res["median"]) == {"am", "identity", "none"}
    assert all(t["unet"] > t["attn2"] > 0 for t in res["median"].values())
    single, batched = bench.batch_speedup(pipe, inputs, preset="am2", steps=4, size=32, device="cpu", repeats=1,
                                          clock=time.perf_counter, batch=2)  # 2 singles + a pair: ~2.4 s a call
    assert single > 0 and batched > 0
    out = pipe(inputs[0][:1], id_embeds=inputs[1][:1], clip_states=inputs[2][:1], preset="ff-am2", seeds=[0],
               height=32, width=32, output_type="np")
    # ff-am2's image is not checked for NaN, and the reason is known: AM2's min-max norm (method-spec
    # §AM, as the authors compute it) divides by max − min of a token's map, which is exactly 0 when
    # the map is constant. With these random scaled-down weights the lowest level (1 latent token at
    # 32², 4 at 64²) gives such a map, so 0/0 makes the image NaN, as the authors' code does; real
    # SDXL maps at 1024² (L ≥ 1024 at the lowest level) are never constant. Without AM2 the same
    # SDXL-shaped path gives finite images:
    assert out.images.shape == (1, 32, 32, 3) and out.metadata[0]["dtype"] == str(dtype).replace("torch.", "")
    for preset in ("baseline", "am1"):
        plain = pipe(inputs[0][:1], id_embeds=inputs[1][:1], clip_states=inputs[2][:1], preset=preset, seeds=[0],
                     height=32, width=32, output_type="np")
        assert np.isfinite(plain.images).all(), preset
