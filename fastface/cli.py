"""The ``fastface`` command line: generate, presets, models, faces compare, attention-maps, score.

Each subcommand is two small functions, ``add_<name>_arguments(parser)`` and
``run_<name>(args) -> int``, registered with one line in :data:`COMMANDS`
(``"module:function"`` strings are imported only when that subcommand runs, so
``fastface --help`` stays fast). Errors the user can fix print ``error: ...``
and exit 2 without a traceback; ``--debug`` re-raises them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fastface.face_backends import DEFAULT_FACE_BACKEND, FACE_BACKENDS
from fastface.registry import Registry, UnknownNameError, import_target
from fastface.validation import IMAGE_SUFFIXES

Handler = Callable[..., Any] | str  # a function, or "package.module:function" imported on use


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Handler
    run: Handler


COMMANDS: Registry[Command] = Registry("command")


def register_command(name: str, help: str, add_arguments: Handler, run: Handler) -> Command:
    return COMMANDS.register(name, Command(name, help, add_arguments, run))


def _resolve(handler: Handler) -> Callable[..., Any]:
    return handler if callable(handler) else import_target(handler)


# -- generate ------------------------------------------------------------------------------
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--face", action="append", help="identity photo (single image mode); repeat it for "
                        "several photos of one person (embeddings averaged, CLIP crop from the largest face)")
    parser.add_argument("--prompt", help="text prompt (single image mode)")
    parser.add_argument("--batch-file", help="JSONL/CSV/TSV with columns face, prompt, seed (optional), out (optional)")
    parser.add_argument("--out", required=True, help="output PNG (single mode) or output folder (--batch-file)")
    parser.add_argument("--model", default="hyper", help="checkpoint name (`fastface models`; default: %(default)s)")
    parser.add_argument("--preset", default="ff-am2", help="FastFace preset (`fastface presets`; default: %(default)s)")
    parser.add_argument("--ip-adapter-scale", type=float, default=None,
                        help="λ (default: the paper's, fastface.presets.TABLE_IP_ADAPTER_SCALE = 0.8)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="FaceID LoRA weight (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for rows without one (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None, help="image height = width (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per UNet batch (default: %(default)s)")
    parser.add_argument("--face-backend", choices=FACE_BACKENDS.names(), default=None,
                        help="identity embedder (default: insightface for real models, dlib for tiny-*)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: fp16 on cuda)")
    parser.add_argument("--cache-dir", default=None, help="fused checkpoints, tiny models, identities "
                        "(default: $FASTFACE_CACHE or ~/.cache/fastface)")
    parser.add_argument("--source", action="append", default=[], metavar="KEY=PATH",
                        help="weights location override, e.g. sdxl_base=/models/sdxl (see `fastface models`)")
    parser.add_argument("--local-files-only", action="store_true", help="never try the Hugging Face hub")
    parser.add_argument("--no-progress", action="store_true")


@dataclass
class GenerationJob:
    face: Path | tuple[Path, ...]  # several photos of one person: a tuple
    prompt: str
    seed: int
    out: Path


def parse_sources(items: Sequence[str]) -> dict[str, str]:
    sources = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--source expects KEY=PATH, got {item!r}")
        sources[key.strip()] = value.strip()
    return sources


def read_batch_file(path: str | os.PathLike, out_dir: Path, default_seed: int) -> list[GenerationJob]:
    """Rows of face, prompt, seed (optional), out (optional); relative faces are resolved against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    jobs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("face") or not row.get("prompt"):
            raise ValueError(f"{path}: row {number} needs 'face' and 'prompt' (columns: face, prompt, seed, out)")
        face = Path(row["face"]).expanduser()
        seed = row.get("seed")
        out = row.get("out") or f"{number - 1:05d}.png"
        jobs.append(GenerationJob(
            face=face if face.is_absolute() else path.parent / face,
            prompt=str(row["prompt"]),
            seed=default_seed if seed in (None, "") else _row_seed(path, number, seed),
            out=out_dir / out,
        ))
    if not jobs:
        raise ValueError(f"batch file {path} has no rows")
    return jobs


def _row_seed(path: Path, number: int, seed: Any) -> int:
    try:
        return int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: row {number}: seed must be a whole number, got {seed!r}") from None


_PIPELINES: dict[tuple, Any] = {}  # loaded pipelines, so repeated in-process calls (tests, notebooks) load once


def cached_pipeline(model: str, **kwargs: Any):
    from fastface.checkpoints import load_pipeline

    key = (model, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    if key not in _PIPELINES:
        _PIPELINES.clear()  # keep one model in memory
        _PIPELINES[key] = load_pipeline(model, **kwargs)
    return _PIPELINES[key]


def check_generate_numbers(args: argparse.Namespace, checkpoint: Any) -> int:
    """Every number flag of ``generate``, with the rules the evaluation config uses; returns the image size."""
    from fastface import validation
    from fastface.presets import TABLE_IP_ADAPTER_SCALE

    if args.ip_adapter_scale is None:
        args.ip_adapter_scale = TABLE_IP_ADAPTER_SCALE
    validation.scale("--ip-adapter-scale", args.ip_adapter_scale)
    validation.scale("--lora-scale", args.lora_scale)
    validation.positive_int("--batch-size", args.batch_size)
    if args.steps is not None:
        validation.step_count("--steps", args.steps)
    if args.size is None:
        return checkpoint.size
    return validation.image_size("--size", args.size, validation.size_multiple(checkpoint), checkpoint.name)


def check_outputs(jobs: Sequence[GenerationJob], name: str) -> None:
    """Output files: a suffix ``generate`` writes, in folders that can be written, before any model work."""
    from fastface.validation import output_image

    folders: set[Path] = set()
    for job in jobs:
        if job.out.parent in folders:
            continue
        output_image(name, job.out)  # suffix and folder; later rows in the same folder only need the suffix
        folders.add(job.out.parent)
    for job in jobs:
        if job.out.suffix.lower() not in IMAGE_SUFFIXES:
            output_image(name, job.out)


def describe_faces(photo: Path, backend: Any) -> None:
    """One line on stderr when a photo holds several faces: how many, and which one the identity is taken from."""
    from fastface.faces import load_image_rgb

    try:
        faces = backend.detect(load_image_rgb(photo))
    except ValueError:
        return  # prepare_identity raises the error that names the photo
    if len(faces) > 1:
        x0, y0, x1, y1 = (int(round(float(v))) for v in faces[0].bbox)
        print(f"note: {photo}: {len(faces)} faces found; using the most prominent one, at x={x0}..{x1}, "
              f"y={y0}..{y1} (crop the photo to choose another)", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from fastface import __version__
    from fastface.cache import identities_dir
    from fastface.checkpoints import check_steps, find_weights, get_checkpoint
    from fastface.faces import backend_for_embedding_width, get_face_backend, prepare_identity

    # 1. everything that can be checked before loading a model
    checkpoint = get_checkpoint(args.model)
    size = check_generate_numbers(args, checkpoint)
    steps = check_steps(checkpoint, args.preset, args.steps)
    backend_name = backend_for_embedding_width(checkpoint.id_embed_dim, args.face_backend,
                                               model=f"model {checkpoint.name!r}", option="--face-backend")
    if args.batch_file:
        if args.face or args.prompt:
            raise ValueError("give either --batch-file or --face/--prompt, not both")
        jobs = read_batch_file(args.batch_file, Path(args.out), args.seed)
    else:
        if not args.face or not args.prompt:
            raise ValueError("give --face and --prompt (or --batch-file)")
        faces = tuple(Path(face) for face in args.face)
        jobs = [GenerationJob(faces if len(faces) > 1 else faces[0], args.prompt, args.seed, Path(args.out))]
    for job in jobs:
        for face in job.face if isinstance(job.face, tuple) else (job.face,):
            if not face.is_file():
                raise FileNotFoundError(f"face photo {face} not found")
    check_outputs(jobs, "--out" if not args.batch_file else f"--out {args.out} (rows of {args.batch_file})")
    sources = parse_sources(args.source)
    load_options = dict(steps=steps, cache_dir=args.cache_dir, local_files_only=args.local_files_only or None, **sources)
    find_weights(checkpoint, **load_options)  # missing weights fail here, before any face or model work

    # 2. identities (fails on a photo without a face before any model loads)
    backend = get_face_backend(backend_name)
    identities = {}
    for job in jobs:
        if job.face not in identities:
            if not args.batch_file:
                for face in job.face if isinstance(job.face, tuple) else (job.face,):
                    describe_faces(face, backend)
            identities[job.face] = prepare_identity(
                list(job.face) if isinstance(job.face, tuple) else job.face, backend,
                cache_dir=identities_dir(args.cache_dir))

    # 3. model, then batches
    pipe = cached_pipeline(
        checkpoint.name, device=args.device, dtype=args.dtype, lora_scale=args.lora_scale, **load_options
    )
    show = bool(args.batch_file) and not args.no_progress
    with tqdm(total=len(jobs), desc=f"{checkpoint.name}/{args.preset}", unit="img", disable=not show) as bar:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start:start + args.batch_size]
            result = pipe(
                [job.prompt for job in chunk],
                id_embeds=[identities[job.face].embedding for job in chunk],
                face_crops=[identities[job.face].crop_bgr for job in chunk],
                preset=args.preset, ip_adapter_scale=args.ip_adapter_scale, lora_scale=args.lora_scale,
                seeds=[job.seed for job in chunk], num_inference_steps=steps, height=size, width=size,
            )
            for job, image, meta in zip(chunk, result.images, result.metadata):
                job.out.parent.mkdir(parents=True, exist_ok=True)
                out = job.out
                image.save(out, format=IMAGE_SUFFIXES[out.suffix.lower()])
                face = [str(f) for f in job.face] if isinstance(job.face, tuple) else str(job.face)
                sidecar = dict(meta, model=checkpoint.name, face=face, face_backend=backend_name,
                               face_content_hash=identities[job.face].content_hash,
                               sources=pipe.load_info["sources"], fastface_version=__version__)
                out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str))
            bar.update(len(chunk))
    if not args.batch_file:
        print(str(jobs[0].out))
    else:
        print(f"wrote {len(jobs)} images under {args.out}")
    return 0


# -- presets / models ------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _am_params(am: dict) -> str:
    parts = am["parts"]
    keys = {"scale_power": (("s", "scale"), ("p", "power")),
            "adaptive_softmask": (("s", "scale"), ("d", "sharpness"), ("p", "quantile"))}.get(am["transform"], ())
    out = []
    for short, field in keys:
        values = {part: am[field][part] for part in parts}
        same = len({_fmt(v) for v in values.values()}) == 1
        out.append(f"{short}={_fmt(values[parts[0]])}" if same else
                   f"{short}=" + "/".join(f"{part}:{_fmt(v)}" for part, v in values.items()))
    if am.get("invert_first_token"):
        out.append("invert-token0")
    if am.get("adain_weight") is not None:
        out.append(f"adain={_fmt(am['adain_weight'])}")
    return " ".join(out)


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_presets(args: argparse.Namespace) -> int:
    from fastface.presets import PRESETS

    if args.json:
        print(json.dumps([p.to_dict() for _, p in PRESETS.items()], indent=2))
        return 0
    rows = []
    for name, preset in PRESETS.items():
        d = preset.to_dict()
        dcg, am = d["dcg"], d["am"]
        rows.append([
            name,
            "model default" if dcg is None else _fmt(dcg["alpha"]),
            "model default" if dcg is None else _fmt(dcg["beta"]),
            "-" if dcg is None else _fmt(dcg["rescale"]),
            "-" if dcg is None else dcg["variant"],
            "-" if am is None else f"{am['name']} ({am['transform']})",
            "-" if am is None else _am_params(am),
        ])
    print(_table(["preset", "DCG alpha", "DCG beta", "phi", "variant", "AM", "AM params"], rows))
    return 0


def run_models(args: argparse.Namespace) -> int:
    from fastface.checkpoints import CHECKPOINTS, SOURCES

    if args.json:
        print(json.dumps([c.to_dict() for _, c in CHECKPOINTS.items()], indent=2, default=str))
        return 0
    rows = []
    for name, c in CHECKPOINTS.items():
        sched = c.scheduler.class_name or "model default"
        if c.scheduler.overrides:
            sched += " " + ",".join(f"{k}={v}" for k, v in c.scheduler.overrides)
        rows.append([name, c.build, "any" if c.steps is None else _fmt(c.steps), c.default_steps, c.size,
                     _fmt(c.default_guidance), c.id_embed_dim, sched])
    print(_table(["model", "build", "steps", "default", "size", "guidance", "id dim", "scheduler"], rows))
    print("\nweight sources (override with --source KEY=PATH or the environment variable):")
    print(_table(["key", "env", "default"],
                 [[s.key, s.env, s.hub_id + (f" / {s.filename}" if s.filename else "")] for _, s in SOURCES.items()]))
    return 0


# -- faces compare -----------------------------------------------------------------------------
def add_faces_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="faces_command", required=True, metavar="{compare}")
    compare = sub.add_parser("compare", help="identity similarity of the most prominent face in two images")
    compare.add_argument("image_a")
    compare.add_argument("image_b")
    compare.add_argument("--backend", choices=FACE_BACKENDS.names(), default=DEFAULT_FACE_BACKEND,
                         help="insightface (buffalo_l, default) or dlib (offline)")
    add_json_argument(compare)


def run_faces(args: argparse.Namespace) -> int:
    from fastface.faces import compare_faces, get_face_backend

    for image in (args.image_a, args.image_b):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image} not found")
    backend = get_face_backend(args.backend)
    for image in (args.image_a, args.image_b):
        describe_faces(Path(image), backend)
    result = compare_faces(args.image_a, args.image_b, backend)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        verdict = "same person" if result["same_person"] else "different people"
        print(f"similarity {result['similarity']:.4f} ({result['measure']}, {result['backend']}); "
              f"threshold {result['threshold']:g}: {verdict}")
    return 0


# -- score ----------------------------------------------------------------------------------------
SCORE_OUTPUT_SUFFIXES = (".parquet", ".csv", ".jsonl")  # what fastface.metrics.runner.write_rows writes


def run_score(args: argparse.Namespace) -> int:
    """``fastface score``: its flags checked before any image is scored, then the runner."""
    from fastface import validation
    from fastface.metrics import METRICS
    from fastface.metrics.runner import run_score_command

    validation.positive_int("--batch-size", args.batch_size)
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"--metrics: unknown metric(s) {', '.join(unknown)}; allowed: {', '.join(METRICS.names())}")
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() not in SCORE_OUTPUT_SUFFIXES:
            raise ValueError(f"--out: {out} has suffix {out.suffix or '(none)'!r}; allowed: "
                             f"{', '.join(SCORE_OUTPUT_SUFFIXES)}")
        validation.writable_folder("--out", out.parent)
    run_score_command(args)
    return 0


# -- registration: one line per subcommand ---------------------------------------------------
register_command("generate", "generate identity-preserving images", add_generate_arguments, run_generate)
register_command("presets", "list FastFace presets and their parameters", add_json_argument, run_presets)
register_command("models", "list checkpoints: steps, size, guidance, weight sources", add_json_argument, run_models)
register_command("faces", "face tools (compare)", add_faces_arguments, run_faces)
register_command("attention-maps", "identity-attention maps per UNet part and step for several presets (PNG grid)",
                 "fastface.attention_maps:add_attention_maps_arguments", "fastface.attention_maps:run_attention_maps")
register_command("score", "score generated images (CLIP, AE, ID, FFC, ...)",
                 "fastface.metrics.runner:add_score_arguments", run_score)


def _load_plugin_commands() -> None:
    """Subcommands of other packages (the ``fastface.commands`` entry-point group, e.g. ``flows``).

    Each entry point is a function called with :func:`register_command`; the library never
    names the layers above it.
    """
    from importlib.metadata import entry_points

    for entry in entry_points(group="fastface.commands"):
        entry.load()(register_command)


_load_plugin_commands()


class _OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line naming it (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(with_arguments_of: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the named subcommand gets its arguments (its handlers may import heavy modules)."""
    parser = _OneLineErrorParser(prog="fastface", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    from fastface import __version__

    parser.add_argument("--version", action="version", version=f"fastface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        if name == with_arguments_of:
            _resolve(command.add_arguments)(sub_parser)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, UnknownNameError, ImportError]
    from fastface.checkpoints import ModelNotFoundError

    errors.append(ModelNotFoundError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((token for token in argv if not token.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    command = COMMANDS.get(args.command)
    try:
        result = _resolve(command.run)(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"interrupted: fastface {args.command} stopped before it finished", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.debug:
            raise
        if isinstance(exc, ImportError):
            from fastface.extras import explain

            exc = explain(exc, needed_for=f"fastface {args.command}")
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
