"""CLIP and FSC (face style score) with CLIP ViT-L/14 (method-spec §6).

CLIP: raw cosine between the image embedding and the full prompt's text embedding.
FSC: raw cosine between the generated face crop and the style part of a stylistic
prompt. Mode ``"aligned"`` (default) feeds the ArcFace-aligned face crop through
the model's own preprocessing. Mode ``"authors"`` reproduces the FastFace
evaluation code: the largest face box, no alignment, its 0-255 pixels passed to a
preprocessing built for [-1, 1] input, so CLIP sees a saturated image; the
paper's FSC values (≈ 0.18) come from that. The authors detect that box with
facenet-pytorch's MTCNN, which needs torch < 2.3; we take our face backend's
largest box instead, so ``authors`` values follow theirs only as far as the boxes agree.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch

from fastface.metrics.base import MetricInput, MetricResult, MetricSpec, register_metric
from fastface.metrics.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipModel
from fastface.metrics.common import FaceAnalysis, decode_images, resolve_face_analysis, resolve_shared_clip, style_part
from fastface.face_backends import DEFAULT_FACE_BACKEND

FSCMode = Literal["aligned", "authors"]
FSC_MODES = ("aligned", "authors")
ALIGNED_CROP_SIZE = 224


class ClipScore:
    """CLIP: cosine of L2-normalised CLIP image and full-prompt text embeddings, batched."""

    def __init__(self, clip: ClipModel) -> None:
        self.spec = CLIP_SPEC
        self.clip = clip

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        images, results = decode_images(inputs)
        for i, item in enumerate(inputs):
            if results[i] is None and not isinstance(item.prompt, str):
                results[i] = MetricResult(value=None, error="CLIP needs the prompt: MetricInput.prompt is not set")
        ok = [i for i in range(len(inputs)) if results[i] is None]
        if ok:
            image_emb = self.clip.encode_images([images[i] for i in ok])
            text_emb = self.clip.encode_texts([inputs[i].prompt for i in ok])
            for i, value in zip(ok, (image_emb * text_emb).sum(-1).cpu().tolist()):
                results[i] = MetricResult(value=float(value))
        return results  # type: ignore[return-value]


def box_crop(image: np.ndarray, bbox: np.ndarray, *, truncate: bool = False) -> np.ndarray:
    """The face box cut out of an HxWx3 array, clipped to the image (``truncate``: int() the corners like the authors)."""
    height, width = image.shape[:2]
    coords = [int(v) for v in bbox] if truncate else [int(round(float(v))) for v in bbox]
    x1, y1, x2, y2 = coords
    # The authors slice with the raw ints; a negative corner would wrap around in Python
    # slicing. We clip to the image instead (differs only for faces cut by the border).
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    return image[y1:y2, x1:x2]


def authors_pixel_values(crop_rgb: np.ndarray, clip: ClipModel) -> torch.Tensor:
    """The authors' FSC input for one uint8 crop: [1, 3, H, W], deliberately saturated.

    Their pipeline maps [-1, 1] to [0, 1] with ``Normalize(mean=-1, std=2)``, then
    resizes (bicubic, antialiased tensor resize), centre-crops and applies CLIP's
    normalisation; they feed it 0-255 values, so every pixel becomes (v + 1) / 2.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    pixels = torch.from_numpy(np.ascontiguousarray(crop_rgb)).permute(2, 0, 1).float()
    pixels = (pixels + 1.0) / 2.0  # Normalize(mean=-1, std=2) on 0-255 input
    interpolation = (
        InterpolationMode.BILINEAR if clip.preprocess_cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    )
    height, width = clip.image_size
    pixels = TF.resize(pixels, min(height, width), interpolation=interpolation, antialias=True)
    pixels = TF.center_crop(pixels, [height, width])
    return clip.normalise_tensor(pixels.unsqueeze(0))


class FaceStyleScore:
    """FSC: cosine of the CLIP embeddings of the generated face crop and the prompt's style part."""

    def __init__(self, clip: ClipModel, faces: FaceAnalysis, mode: FSCMode = "aligned") -> None:
        if mode not in FSC_MODES:
            raise ValueError(f"fsc mode must be one of {FSC_MODES}, got {mode!r}")
        self.spec = FSC_SPEC
        self.clip, self.faces, self.mode = clip, faces, mode

    def _pixel_values(self, image: np.ndarray, faces: list) -> tuple[torch.Tensor | None, dict]:
        from fastface.faces import aligned_face_crop_bgr, largest_face

        if self.mode == "authors":
            face = largest_face(faces)
            crop = box_crop(image, face.bbox, truncate=True)
            if crop.shape[0] == 0 or crop.shape[1] == 0:
                return None, {"crop": "box", "empty_crop": True}
            return authors_pixel_values(crop, self.clip), {"crop": "box"}
        face = faces[0]
        if face.kps is not None:
            crop = np.ascontiguousarray(aligned_face_crop_bgr(image, face, size=ALIGNED_CROP_SIZE)[:, :, ::-1])
            kind = "aligned"
        else:
            crop = box_crop(image, face.bbox)
            kind = "box"
            if crop.shape[0] == 0 or crop.shape[1] == 0:
                return None, {"crop": kind, "empty_crop": True}
        return self.clip.pixel_values([crop]), {"crop": kind}

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        images, results = decode_images(inputs)
        pending: list[tuple[int, torch.Tensor, str, dict]] = []
        for i, item in enumerate(inputs):
            if results[i] is not None:
                continue
            style = style_part(item.prompt)
            if style is None:
                results[i] = MetricResult(value=None, detail={"mode": self.mode, "stylistic": False})
                continue
            try:
                faces = self.faces.detect(images[i])
            except Exception as exc:
                results[i] = MetricResult(value=None, error=f"face detection failed: {type(exc).__name__}: {exc}")
                continue
            if not faces:
                results[i] = MetricResult(value=None, detail={"mode": self.mode, "face_found": False})
                continue
            pixels, detail = self._pixel_values(images[i], faces)
            detail = {"mode": self.mode, "face_found": True, "style": style, **detail}
            if pixels is None:
                results[i] = MetricResult(value=None, detail=detail)
            else:
                pending.append((i, pixels, style, detail))
        if pending:
            image_emb = self.clip.encode_pixel_values(torch.cat([p for _, p, _, _ in pending]))
            text_emb = self.clip.encode_texts([s for _, _, s, _ in pending])
            for (i, _, _, detail), value in zip(pending, (image_emb * text_emb).sum(-1).cpu().tolist()):
                results[i] = MetricResult(value=float(value), detail=detail)
        return results  # type: ignore[return-value]


def make_clip_score(
    *,
    clip: ClipModel | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    device: str | torch.device | None = None,
) -> ClipScore:
    return ClipScore(resolve_shared_clip(clip, clip_model, clip_pretrained, device))


def make_face_style_score(
    *,
    clip: ClipModel | None = None,
    faces: FaceAnalysis | None = None,
    fsc_mode: FSCMode = "aligned",
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
    face_backend: str = DEFAULT_FACE_BACKEND,
    face_backend_options: dict | None = None,
    device: str | torch.device | None = None,
) -> FaceStyleScore:
    if fsc_mode not in FSC_MODES:  # before any model loads
        raise ValueError(f"fsc_mode must be one of {FSC_MODES}, got {fsc_mode!r}")
    return FaceStyleScore(
        resolve_shared_clip(clip, clip_model, clip_pretrained, device),
        resolve_face_analysis(faces, face_backend, face_backend_options),
        fsc_mode,
    )


CLIP_SPEC = register_metric(
    MetricSpec(
        name="clip",
        inputs=("image", "prompt"),
        higher_is_better=True,
        aggregate="mean",
        factory=make_clip_score,
        description="raw cosine of CLIP ViT-L/14 image and full-prompt text embeddings",
    )
)
FSC_SPEC = register_metric(
    MetricSpec(
        name="fsc",
        inputs=("image", "prompt"),
        higher_is_better=True,
        aggregate="mean",
        factory=make_face_style_score,
        description="CLIP ViT-L/14 cosine of the generated face crop and the prompt's style part (stylistic prompts)",
    )
)
