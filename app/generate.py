"""The Generate tab: one photo and prompt through several presets, by the pipeline ``fastface generate`` uses.

The model is loaded by :func:`fastface.cli.cached_pipeline` (one model kept in memory), the
identity prepared by :func:`fastface.faces.prepare_identity` with the face backend whose
embedding width fits the model (dlib for ``tiny-*``, insightface for real models), and the
steps checked by :func:`fastface.checkpoints.check_steps` — the same calls as
``fastface generate``. Tiny models need nothing but the local cache; real ones their weights
where ``fastface models`` says they are.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

_LOCK = threading.Lock()  # one generation at a time: a pipeline is not re-entrant


@dataclass(frozen=True)
class Request:
    photo: bytes
    prompt: str
    model: str
    presets: tuple[str, ...]
    ip_adapter_scale: float
    lora_scale: float = 1.0
    seed: int = 0


def check_request(request: Request) -> None:
    """Every field, before any model or face work (ValueErrors name the field)."""
    from fastface import validation
    from fastface.checkpoints import check_steps, get_checkpoint
    from fastface.presets import get_preset

    if not request.photo:
        raise ValueError("upload a face photo or choose a stored identity")
    if not request.prompt.strip():
        raise ValueError("write a prompt")
    if not request.presets:
        raise ValueError("choose at least one preset")
    checkpoint = get_checkpoint(request.model)
    for preset in request.presets:
        get_preset(preset)
        check_steps(checkpoint, preset)
    validation.scale("ip_adapter_scale", request.ip_adapter_scale)
    validation.scale("lora_scale", request.lora_scale)


def generate(request: Request, *, cache_dir: str | None = None, device: str | None = None) -> list[tuple[str, bytes]]:
    """``[(preset, PNG bytes)]``, one image per preset, same photo, prompt and seed."""
    from fastface.cache import identities_dir
    from fastface.checkpoints import check_steps, find_weights, get_checkpoint
    from fastface.cli import cached_pipeline
    from fastface.faces import backend_for_embedding_width, get_face_backend, load_image_rgb, prepare_identity

    check_request(request)
    checkpoint = get_checkpoint(request.model)
    steps = {p: check_steps(checkpoint, p) for p in request.presets}
    try:
        rgb = load_image_rgb(request.photo)
    except Exception as exc:  # noqa: BLE001 - PIL's many errors for a file that is not an image
        raise ValueError(f"the uploaded file is not an image PIL can read ({type(exc).__name__})") from None
    backend = get_face_backend(backend_for_embedding_width(checkpoint.id_embed_dim, None, model=f"model {checkpoint.name!r}"))
    with _LOCK:
        identity = prepare_identity(rgb, backend, cache_dir=identities_dir(cache_dir))  # NoFaceError: no face
        out = []
        for preset in request.presets:
            load_options = dict(steps=steps[preset], cache_dir=cache_dir)
            find_weights(checkpoint, **load_options)
            pipe = cached_pipeline(checkpoint.name, device=device, lora_scale=request.lora_scale, **load_options)
            result = pipe([request.prompt], id_embeds=[identity.embedding], face_crops=[identity.crop_bgr],
                          preset=preset, ip_adapter_scale=request.ip_adapter_scale, lora_scale=request.lora_scale,
                          seeds=[request.seed], num_inference_steps=steps[preset],
                          height=checkpoint.size, width=checkpoint.size)
            buffer = io.BytesIO()
            result.images[0].save(buffer, format="PNG")
            out.append((preset, buffer.getvalue()))
    return out


def models() -> list[str]:
    from fastface.checkpoints import CHECKPOINTS

    return list(CHECKPOINTS.names())


def presets() -> list[str]:
    from fastface.presets import PRESETS

    return list(PRESETS.names())


def default_lambda() -> str:
    """The form's λ: the paper's (:data:`fastface.presets.TABLE_IP_ADAPTER_SCALE`)."""
    from fastface.presets import TABLE_IP_ADAPTER_SCALE

    return f"{TABLE_IP_ADAPTER_SCALE:g}"


__all__ = ["Request", "check_request", "default_lambda", "generate", "models", "presets"]

