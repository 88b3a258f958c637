"""Score images with registered metrics: models loaded once, batched, one row per (image, metric).

``score_images`` is the library entry point (actors call it on a batch);
``score_directory`` and ``add_score_arguments`` / ``run_score_command`` back the
``fastface score`` CLI.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from fastface.metrics.base import METRICS, MetricInput, MetricResult

DEFAULT_METRICS = ("id", "ffc", "clip", "ae", "fsc", "face_size")
ROW_FIELDS = ("key", "metric", "value", "detail", "error")


def _shared_clip(options: dict) -> Any:
    from fastface.metrics.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, load_clip_model

    return load_clip_model(
        options.get("clip_model", DEFAULT_CLIP_MODEL),
        options.get("clip_pretrained", DEFAULT_CLIP_PRETRAINED),
        device=options.get("device"),
        precision=options.get("clip_precision", "fp32"),
    )


def _shared_faces(options: dict) -> Any:
    from fastface.metrics.common import resolve_face_analysis
    from fastface.face_backends import DEFAULT_FACE_BACKEND

    return resolve_face_analysis(
        None, options.get("face_backend", DEFAULT_FACE_BACKEND), options.get("face_backend_options")
    )


# Resources a factory may take ready-made (parameter name -> builder from the options).
# Loaded once per run for all selected metrics: CLIP, AE and FSC share one CLIP-L.
_SHARED: dict[str, Callable[[dict], Any]] = {"clip": _shared_clip, "faces": _shared_faces}
_SHARED_OPTIONS = {"clip_precision"}


def _factory_parameters(factory: Callable) -> set[str]:
    return {
        name
        for name, parameter in inspect.signature(factory).parameters.items()
        if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
    }


def build_metrics(metrics: Sequence[str], *, device: Any = None, **options: Any) -> dict[str, Any]:
    """Instantiate metrics by name, loading shared models once; an option no metric takes is an error."""
    if not metrics:
        raise ValueError(f"no metrics selected; choose from {', '.join(sorted(METRICS.names()))}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics listed twice: {list(metrics)}")
    specs = {name: METRICS.get(name) for name in metrics}
    accepted = {name: _factory_parameters(spec.factory) for name, spec in specs.items()}
    # Options meant for metrics not selected are ignored (one option set can serve several runs);
    # an option no registered metric takes is a typo and an error.
    known = set().union(*(_factory_parameters(spec.factory) for _, spec in METRICS.items())) | _SHARED_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; metrics accept: {sorted(known - set(_SHARED))}")
    everything = dict(options, device=device)
    shared = {
        key: build(everything)
        for key, build in _SHARED.items()
        if key not in options and any(key in params for params in accepted.values())
    }
    built = {}
    for name, spec in specs.items():
        pool = {**everything, **shared}
        built[name] = spec.factory(**{k: v for k, v in pool.items() if k in accepted[name]})
    return built


class _SourceImages:
    """Decodes each identity photo once per run (every prompt of an identity shares it)."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def __call__(self, source: Any) -> Any:
        if not isinstance(source, (str, os.PathLike)):
            return source
        from fastface.faces import ImageReadError, load_image_rgb

        key = os.fspath(source)
        if key not in self._cache:
            try:
                self._cache[key] = load_image_rgb(source)
            except ImageReadError:
                return source  # the metric reports the error for each image that needs it
            if len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return self._cache[key]


def _error_result(exc: BaseException) -> MetricResult:
    return MetricResult(value=None, error=f"{type(exc).__name__}: {exc}")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def score_images(
    inputs: Sequence[MetricInput],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    batch_size: int = 16,
    device: Any = None,
    progress: bool = True,
    built: Mapping[str, Any] | None = None,
    **options: Any,
) -> list[dict]:
    """One row ``{key, metric, value, detail, error}`` per (input, metric), in input order.

    ``built`` passes metrics already made by :func:`build_metrics` (a worker that scores
    many batches loads its models once); otherwise they are built from ``options``.

    Options go to the metric factories that accept them (``clip_model``,
    ``clip_pretrained``, ``clip_precision``, ``aesthetic_checkpoint``, ``fsc_mode``,
    ``face_backend``, ``face_backend_options``, …); ``clip=`` / ``faces=`` pass
    ready-made shared models. An input that fails (unreadable file, no prompt, …)
    gets a row with ``error`` set; the others are scored.
    """
    from fastface.faces import ImageReadError, load_image_rgb

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if built is None:
        built = build_metrics(list(metrics), device=device, **options)
    else:
        missing = [m for m in metrics if m not in built]
        if missing:
            raise ValueError(f"metric(s) {missing} were not built (have {sorted(built)})")
        built = {m: built[m] for m in metrics}
    keys = [item.key if item.key is not None else str(index) for index, item in enumerate(inputs)]
    results: dict[str, list[MetricResult | None]] = {name: [None] * len(inputs) for name in built}
    sources = _SourceImages()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(inputs), desc=f"scoring {', '.join(built)}", unit="img")
    for start in range(0, len(inputs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(inputs))))
        readable: list[int] = []
        decoded: list[MetricInput] = []
        for index in chunk:  # decode each image once for all metrics
            item = inputs[index]
            try:
                image = load_image_rgb(item.image)
            except ImageReadError as exc:
                for name in built:
                    results[name][index] = MetricResult(value=None, error=str(exc))
                continue
            readable.append(index)
            decoded.append(dataclasses.replace(item, image=image, source_image=sources(item.source_image)))
        for name, metric in built.items():
            if not decoded:
                break
            try:
                scored = metric.score(decoded)
                if len(scored) != len(decoded):
                    raise RuntimeError(f"metric {name} returned {len(scored)} results for {len(decoded)} inputs")
            except Exception as exc:  # a metric bug on one batch: report it on those rows, keep going
                scored = [_error_result(exc)] * len(decoded)
            for index, result in zip(readable, scored):
                results[name][index] = result
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    rows = []
    for index, key in enumerate(keys):
        for name in built:
            result = results[name][index]
            value = None if result.value is None or not math.isfinite(result.value) else float(result.value)
            rows.append(
                {"key": key, "metric": name, "value": value, "detail": _json_safe(result.detail), "error": result.error}
            )
    return rows


def summarize(rows: Iterable[dict]) -> dict[str, dict]:
    """Per metric: its aggregate (mean or sum over values that are not None), counts of rows, Nones and errors."""
    summary: dict[str, dict] = {}
    for row in rows:
        entry = summary.setdefault(row["metric"], {"values": [], "rows": 0, "none": 0, "errors": 0})
        entry["rows"] += 1
        if row["error"] is not None:
            entry["errors"] += 1
        elif row["value"] is None:
            entry["none"] += 1
        else:
            entry["values"].append(row["value"])
    out = {}
    for metric, entry in summary.items():
        spec = METRICS.get(metric)
        values = entry.pop("values")
        if spec.aggregate == "sum":
            value = float(sum(values))
        elif spec.aggregate == "count":
            value = float(len(values))
        else:
            value = float(sum(values) / len(values)) if values else None
        out[metric] = {"aggregate": spec.aggregate, "value": value, "n": len(values), **entry,
                       "higher_is_better": spec.higher_is_better}
    return out


# ---------------------------------------------------------------- directories and the CLI


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Entries ``{"image", "prompt", "face"}`` (``face`` may be None) from a prompts file.

    Accepted forms, by suffix:

    - ``.tsv`` / ``.txt`` (or anything else): one line per image,
      ``<image filename>\\t<prompt>[\\t<face filename>]``; blank lines and lines
      starting with ``#`` are skipped.
    - ``.csv``: a header with columns ``image``, ``prompt`` and optionally ``face``.
    - ``.json``: ``{"<image>": "<prompt>", ...}``, or ``{"<image>": {"prompt": ..., "face": ...}}``,
      or a list of ``{"image": ..., "prompt": ..., "face": ...}``.
    - ``.jsonl``: one such object per line.

    ``image`` is relative to the images folder, ``face`` to the faces folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    suffix = path.suffix.lower()
    entries: list[dict] = []
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            for image, value in data.items():
                entry = {"prompt": value} if isinstance(value, str) else dict(value)
                entries.append({"image": image, **entry})
        elif isinstance(data, list):
            entries = [dict(item) for item in data]
        else:
            raise ValueError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
    elif suffix == ".jsonl":
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = {"image", "prompt"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: CSV header needs columns image, prompt (and optionally face); missing {sorted(missing)}")
            entries = [dict(row) for row in reader]
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) not in (2, 3):
                raise ValueError(
                    f"{path}:{number}: expected '<image>\\t<prompt>[\\t<face>]' (tab-separated), got {len(parts)} field(s)"
                )
            entries.append({"image": parts[0], "prompt": parts[1], "face": parts[2] if len(parts) == 3 else None})
    out = []
    for number, entry in enumerate(entries, 1):
        if not entry.get("image") or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"{path}: entry {number} needs 'image' and 'prompt', got {entry}")
        face = entry.get("face") or None
        out.append({"image": str(entry["image"]), "prompt": entry["prompt"], "face": face})
    return out


def write_rows(rows: Sequence[dict], out: str | os.PathLike) -> Path:
    """Write score rows to ``.parquet`` (detail as a JSON string), ``.csv`` or ``.jsonl``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    flat = [dict(row, detail=json.dumps(row["detail"], sort_keys=True)) for row in rows]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [("key", pa.string()), ("metric", pa.string()), ("value", pa.float64()), ("detail", pa.string()),
             ("error", pa.string())]
        )
        pq.write_table(pa.Table.from_pylist(flat, schema=schema), out)
    elif suffix == ".csv":
        with open(out, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(flat)
    elif suffix == ".jsonl":
        with open(out, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row) + "\n")
    else:
        raise ValueError(f"output {out}: use a .parquet, .csv or .jsonl file name")
    return out


def score_directory(
    images_dir: str | os.PathLike,
    prompts_file: str | os.PathLike,
    faces_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    out: str | os.PathLike | None = None,
    **options: Any,
) -> list[dict]:
    """Score the images a prompts file lists (see :func:`read_prompts_file` for its forms).

    Each entry is one generated image ``<images_dir>/<image>`` with its full prompt;
    its ``face`` names the source identity photo in ``faces_dir`` (needed by ID;
    without it ID rows carry an error). Row keys are the image file names. Images
    that are listed but missing or unreadable give error rows. ``out`` (.parquet,
    .csv, .jsonl) receives the rows; ``options`` go to :func:`score_images`.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} not found")
    faces_root = Path(faces_dir) if faces_dir is not None else None
    if faces_root is not None and not faces_root.is_dir():
        raise FileNotFoundError(f"faces folder {faces_root} not found")
    entries = read_prompts_file(prompts_file)
    inputs = []
    for entry in entries:
        source = None
        if entry["face"] is not None:
            if faces_root is None:
                raise ValueError(f"{prompts_file} names source faces; pass the faces folder (--faces)")
            source = faces_root / entry["face"]
        inputs.append(
            MetricInput(image=images_dir / entry["image"], prompt=entry["prompt"], source_image=source, key=entry["image"])
        )
    rows = score_images(inputs, metrics, **options)
    if out is not None:
        write_rows(rows, out)
    return rows


def add_score_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fastface score`` arguments to a (sub)parser."""
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument(
        "--prompts", required=True,
        help="prompts file: '<image>\\t<prompt>[\\t<face>]' lines, or CSV/JSON/JSONL with image, prompt, face",
    )
    parser.add_argument("--faces", default=None, help="folder of source identity photos named by the 'face' column")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric names (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write rows to FILE.parquet / .csv / .jsonl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--face-backend", default=None, help="insightface (buffalo_l, default) or dlib (offline)")
    parser.add_argument("--clip-model", default=None, help="open_clip name, hf-hub:<repo> or local folder")
    parser.add_argument("--clip-pretrained", default=None, help="pretrained tag or weights file (default: openai)")
    parser.add_argument("--aesthetic-checkpoint", default=None, help="aesthetic head name, path or URL")
    parser.add_argument("--fsc-mode", choices=("aligned", "authors"), default=None)
    parser.add_argument("--face-size-mode", choices=("clipped", "authors"), default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_score_command(args: argparse.Namespace) -> dict[str, dict]:
    """Run ``fastface score`` from parsed arguments; prints and returns the per-metric summary."""
    options = {
        key: value
        for key, value in {
            "face_backend": args.face_backend,
            "clip_model": args.clip_model,
            "clip_pretrained": args.clip_pretrained,
            "aesthetic_checkpoint": args.aesthetic_checkpoint,
            "fsc_mode": args.fsc_mode,
            "face_size_mode": args.face_size_mode,
        }.items()
        if value is not None
    }
    rows = score_directory(
        args.images, args.prompts, args.faces, args.metrics, args.out,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress, **options,
    )
    summary = summarize(rows)
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_score_arguments(argparse.ArgumentParser(prog="fastface score", description=__doc__))
    run_score_command(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
