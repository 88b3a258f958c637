"""Dtype names: the one parser that config files, CLI flags, actors and loaders share.

Also the keyword that ``from_pretrained`` takes for a dtype: current diffusers and transformers
take ``dtype`` (``torch_dtype`` is deprecated there), older releases only ``torch_dtype``.
"""

from __future__ import annotations

import torch

#: Every accepted spelling → dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from any accepted spelling (``fp16``, ``float16``, ``torch.float16``, …)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"unsupported dtype {dtype}; valid: {', '.join(DTYPE_NAMES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name stored with results: ``float16``, ``bfloat16`` or ``float32`` (a spelling is checked
    as :func:`parse_dtype` does; another torch dtype, e.g. a test's float64 reference run, keeps its name)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(parse_dtype(dtype)).removeprefix("torch.")


def _diffusers_takes_dtype() -> bool:
    from diffusers.utils import deprecation_utils

    return hasattr(deprecation_utils, "_resolve_dtype")


def _transformers_takes_dtype() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.56")


def diffusers_dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """``{"dtype": dtype}`` for diffusers' ``from_pretrained`` (``torch_dtype`` on old releases)."""
    if dtype is None:
        return {}
    return {"dtype" if _diffusers_takes_dtype() else "torch_dtype": dtype}


def transformers_dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """``{"dtype": dtype}`` for transformers' ``from_pretrained`` (``torch_dtype`` before 4.56)."""
    if dtype is None:
        return {}
    return {"dtype" if _transformers_takes_dtype() else "torch_dtype": dtype}


__all__ = ["DTYPE_NAMES", "HALF_DTYPES", "diffusers_dtype_kwargs", "dtype_name", "parse_dtype",
           "transformers_dtype_kwargs"]
