"""Stable identifiers: example ids, config hashes, content hashes and per-example seeds.

Everything here is a pure function of its arguments, hashed with sha256 over a canonical
JSON encoding, so the same inputs give the same value in every process, on every
machine and Python version (Python's ``hash()`` is salted per process and never used).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Mapping

EXAMPLE_ID_SCHEME = "fastface.example/v1"
SEED_SCHEME = "fastface.seed/v1"
CONFIG_SCHEME = "fastface.config/v1"
ID_CHARS = 32  # 128 bits of sha256: no collision in any sweep we will ever run


def example_id_maker(*, model: str, preset: str, preset_config: Mapping[str, Any], ip_adapter_scale: float,
                     lora_scale: float, steps: int, width: int, height: int,
                     code_version: str) -> "Callable[[str, str, int], str]":
    """:func:`example_id` with the settings fixed: ``make(identity_hash, prompt, seed)`` gives the same id.

    The settings (the preset's config above all) are canonicalised once, not once per example:
    the canonical JSON is a template the three per-example values are spliced into, encoded as
    :func:`canonical_json` encodes them. A sweep of 1.45 M examples hashes ~10× faster.
    """
    marks = {"identity_hash": "\x00identity\x00", "prompt": "\x00prompt\x00", "seed": "\x00seed\x00"}
    reference = example_id(identity_hash=marks["identity_hash"], prompt=marks["prompt"], seed=0, model=model,
                           preset=preset, preset_config=preset_config, ip_adapter_scale=ip_adapter_scale,
                           lora_scale=lora_scale, steps=steps, width=width, height=height, code_version=code_version)
    payload = {
        "scheme": EXAMPLE_ID_SCHEME, "identity_hash": marks["identity_hash"], "prompt": marks["prompt"],
        "model": model, "preset": preset, "preset_config": dict(preset_config),
        "ip_adapter_scale": float(ip_adapter_scale), "lora_scale": float(lora_scale), "seed": marks["seed"],
        "steps": int(steps), "width": int(width), "height": int(height), "code_version": code_version,
    }
    text = canonical_json(payload)
    order = sorted(marks, key=lambda k: text.index(_json_text(marks[k])))
    parts, rest = [], text
    for key in order:
        head, _, rest = rest.partition(_json_text(marks[key]))
        parts.append(head)
    parts.append(rest)

    def make(identity_hash: str, prompt: str, seed: int) -> str:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not identity_hash or not isinstance(identity_hash, str):
            raise ValueError("identity_hash must be the identity image's content hash (storage.ids.content_hash)")
        values = {"identity_hash": _json_text(identity_hash), "prompt": _json_text(prompt), "seed": str(seed)}
        out = parts[0]
        for key, part in zip(order, parts[1:]):
            out += values[key] + part
        return _sha256(out)[:ID_CHARS]

    check = make(marks["identity_hash"], marks["prompt"], 0)
    if check != reference:  # the template must reproduce example_id exactly; never a silently different id
        raise AssertionError("example_id_maker does not reproduce example_id")
    return make


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _canonical(value: Any, where: str = "value") -> Any:
    """Normalise a JSON-like value so equal configs encode to equal bytes.

    Numbers are canonicalised by value (``1`` and ``1.0`` are the same scale; YAML and
    JSON loaders disagree about which one they produce); tuples become lists; mapping
    keys must be strings. NaN/inf and other types are refused rather than stringified,
    since a silently different encoding would silently change every id.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: non-finite number {value!r} cannot be hashed")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: mapping key {k!r} is not a string")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # numpy scalars and similar: accept anything with a lossless Python number form.
    item = getattr(value, "item", None)
    if callable(item):
        return _canonical(item(), where)
    raise ValueError(f"{where}: cannot hash value of type {type(value).__name__}; use JSON types")


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value``: sorted keys, no spaces, numbers by value."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """A 32-hex-char hash of a JSON-like config, independent of key order and of 1 vs 1.0."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config_hash expects a mapping, got {type(config).__name__}")
    return _sha256(canonical_json([CONFIG_SCHEME, config]))[:ID_CHARS]


def bytes_sha256(data: bytes) -> str:
    """Full sha256 hex of raw bytes (an identity photo's file, say); what ``identities.content_hash``
    and ``examples.identity_hash`` hold."""
    return hashlib.sha256(data).hexdigest()


def example_id(
    *,
    identity_hash: str,
    prompt: str,
    model: str,
    preset: str,
    preset_config: Mapping[str, Any],
    ip_adapter_scale: float,
    lora_scale: float,
    seed: int,
    steps: int,
    width: int,
    height: int,
    code_version: str,
) -> str:
    """A 32-hex-char id of everything that determines the generated image.

    Hashed (sha256 of the canonical JSON of these fields, with a scheme tag
    ``fastface.example/v1`` so a change of scheme is visible, truncated to 128 bits):

    - ``identity_hash``: the content hash of the identity image, not its id — replacing
      the photo behind an id must make a new example, and re-importing the same photo
      under another id gives the same image;
    - ``prompt``: the exact prompt text the model sees (not the prompt id), for the same reason;
    - ``model``: the checkpoint name; it must name weights unambiguously (registry name,
      and revision when the registry does not pin one);
    - ``preset`` and ``preset_config``: the preset's name and its full config as a dict
      (DCG weights, AM settings...), canonicalised with sorted keys — editing a preset
      changes the ids of its examples even when the name stays;
    - ``ip_adapter_scale``, ``lora_scale``: numbers by value (1 == 1.0);
    - ``seed``: the example's own seed (see :func:`derive_seed`);
    - ``steps``, ``width``, ``height``: the sampling steps and the image size;
    - ``code_version``: the method/code version string; bump it when a code change
      changes images, so old results are not taken for new ones.

    Not hashed: the run id (the same example in two runs is the same image, which lets
    a later run reuse earlier work) and anything that only affects speed (batch size,
    device, worker) — batching is invariant by method-spec §5.
    """
    seed = _canonical(seed, "seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    for name, value in (("steps", steps), ("width", width), ("height", height)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not identity_hash or not isinstance(identity_hash, str):
        raise ValueError("identity_hash must be the identity image's content hash (storage.ids.content_hash)")
    payload = {
        "scheme": EXAMPLE_ID_SCHEME,
        "identity_hash": identity_hash,
        "prompt": prompt,
        "model": model,
        "preset": preset,
        "preset_config": dict(preset_config),
        "ip_adapter_scale": float(ip_adapter_scale),
        "lora_scale": float(lora_scale),
        "seed": seed,
        "steps": int(steps),
        "width": int(width),
        "height": int(height),
        "code_version": code_version,
    }
    return _sha256(canonical_json(payload))[:ID_CHARS]


def derive_seed(run_seed: int, identity_id: str, prompt_id: str) -> int:
    """The seed of one example: a 63-bit int from sha256(run seed, identity id, prompt id).

    Method-spec §5: every example seeds its own generator, so an image does not depend on
    the order or batch it was made in; the seed ignores preset, model and scales so that
    all configs of one (identity, prompt) start from the same noise and comparisons
    against the baseline are paired. 63 bits so it fits a signed int64 column and
    ``torch.Generator.manual_seed``.
    """
    if isinstance(run_seed, bool) or not isinstance(run_seed, int):
        raise ValueError(f"run_seed must be an integer, got {run_seed!r}")
    digest = hashlib.sha256(canonical_json([SEED_SCHEME, run_seed, str(identity_id), str(prompt_id)]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
