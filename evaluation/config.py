"""The evaluation config: one YAML file that says what to evaluate, validated before anything runs.

Every error names the field and the allowed values (unknown model/preset/metric, a
preset whose per-step schedules do not fit the step count, scales out of range, a
missing data folder, a face backend whose embeddings the models cannot take).
``load_config(path)`` returns an :class:`EvaluationConfig` (pydantic v2, frozen); its
``to_dict()`` is stored in the ``runs`` table next to the results.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fastface import validation
from fastface.prompt_sets import PromptSet, set_kinds

PACKAGE_SCHEME = "package://"
WEIGHTS = ("tiny", "real", "rehearsal")
REHEARSAL_SUFFIX = "-rehearsal"
"""A rehearsal's run (and its dataset run) is named with this suffix, so its rows never count as a real run's."""


class ConfigError(ValueError):
    """The evaluation config is invalid; the message names each bad field and what is allowed."""


def resolve_uri(uri: str, base: Path | None = None) -> str:
    """``package://<pkg>/<path>`` → the file inside the installed package; relative paths against ``base``.

    Other URIs (``s3://…``) are returned unchanged.
    """
    if uri.startswith(PACKAGE_SCHEME):
        package, _, inner = uri[len(PACKAGE_SCHEME):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{uri}: package {package!r} is not installed")
        return str(Path(next(iter(spec.submodule_search_locations))) / inner)
    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path)


def _exists(uri: str) -> bool:
    if "://" not in uri:
        return Path(uri).exists()
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentitySource(_Model):
    """A photo, or a folder of photos. ``crop_faces: n`` cuts the n largest faces of a group photo into identities.

    ``identity_folders: true``: ``uri`` is a folder with one subfolder per identity, each holding
    several photos of that person (combined as :func:`fastface.faces.identity.combine_face_records` says).
    """

    uri: str
    crop_faces: int | None = Field(default=None, ge=1)
    identity_folders: bool = False
    gender: str | None = None
    age: str | None = None
    ethnicity: str | None = None


class SynthesisConfig(_Model):
    """Synthesised identities: text-to-image faces per gender × age group, filtered (:mod:`evaluation.dataset`)."""

    model: str = "hyper"
    steps: int | None = None
    size: int | None = None  # None: the model's native size; checked like sweep.size
    per_group: int = Field(default=9, ge=2)
    genders: tuple[str, ...] = ("woman", "man")
    ages: tuple[str, ...] = ("young", "middle-aged", "old")
    ethnicities: tuple[str, ...] = ("african", "east asian", "south asian", "european", "hispanic", "middle eastern")
    max_rounds: int = Field(default=5, ge=1)
    seed: int = 0


class DatasetConfig(_Model):
    name: str | None = None  # run id of the identities/prompts rows; default "<run name>-dataset"
    folder: str | None = None  # the authors' layout: id_photos/*.png, prompts_nostyle.txt, prompts_style.txt
    identities: tuple[IdentitySource, ...] = ()
    prompt_files: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    realistic_prompts: int | None = Field(default=None, ge=0)  # curated realistic prompts to add (synthesis)
    stylistic_prompts: int | None = Field(default=None, ge=0)  # curated stylistic prompts to add
    max_identities: int | None = Field(default=None, ge=1)
    max_prompts: int | None = Field(default=None, ge=1)  # per kind
    synthesise: SynthesisConfig | None = None


class SetConfig(_Model):
    """Presets run on one prompt set (realistic, stylistic or joint = both), each compared with ``baseline``."""

    prompts: PromptSet
    presets: tuple[str, ...]


class SweepConfig(_Model):
    models: tuple[str, ...]
    sets: tuple[SetConfig, ...]
    lora_scales: tuple[float, ...] = (1.0,)
    ip_adapter_scales: tuple[float, ...] = (0.8,)
    seeds: tuple[int, ...] = (0,)
    steps: int | dict[str, int] | None = None  # None: each model's default
    size: int | None = None  # None: each model's native size; a multiple of the model's VAE factor (check_config)
    code_version: str = "fastface-1"

    @field_validator("ip_adapter_scales", "lora_scales")
    @classmethod
    def _scales(cls, values: tuple[float, ...], info) -> tuple[float, ...]:
        return validation.scales("values", values)


class MetricsConfig(_Model):
    names: tuple[str, ...] = ("id", "ffc", "face_size", "clip", "ae", "fsc")
    clip_model: str | None = None  # None: ViT-L/14 (openai), or the tiny CLIP when weights: tiny
    clip_pretrained: str | None = None
    aesthetic_checkpoint: str | None = None
    # Metric modes (docs/metrics.md): "authors" reproduces the FastFace evaluation code where a
    # paper number depends on it; configs/paper.yaml uses it for FSC and face size.
    fsc_mode: Literal["aligned", "authors"] = "aligned"
    face_size_mode: Literal["clipped", "authors"] = "clipped"


class ExecutionConfig(_Model):
    batch_size: int = Field(default=4, ge=1)
    score_batch_size: int = Field(default=16, ge=1)
    shard_size: int = Field(default=256, ge=1)  # examples per Prefect task (the pools live for the whole flow run)
    num_workers: int | None = Field(default=None, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # GPUs each pool actor asks for, whatever the cluster holds when the pool starts: num_workers
    # actors of this many GPUs make an autoscaler add GPU nodes. None: 1 with real weights (unless
    # device: cpu), else one actor per GPU present (CPU actors where there is none).
    gpus_per_worker: float | None = Field(default=None, gt=0)
    gpu_wait_s: float = Field(default=600.0, ge=0)  # real weights: fail when no GPU node came by then
    # Stuck-actor watchdog: an actor holding a batch longer than stuck_factor × the pool's median batch
    # time (at least stuck_floor_s; stuck_first_s before its first batch, while it loads its models) is
    # killed and its batch retried; null turns it off. shard_timeout_s: a shard task running longer
    # fails and is retried (doing only its missing rows).
    stuck_factor: float | None = Field(default=10.0, gt=1)
    stuck_floor_s: float = Field(default=30.0, gt=0)
    stuck_first_s: float = Field(default=900.0, gt=0)
    shard_timeout_s: float | None = Field(default=None, gt=0)
    ray_address: str | None = None
    cache_dir: str | None = None  # fused checkpoints, tiny models, identity cache; default $FASTFACE_CACHE
    device: str | None = None
    dtype: str | None = None  # any spelling fastface.dtypes accepts; stored canonical (float16, ...)
    retries: int = Field(default=2, ge=0)  # of a shard task failed for a transient reason (evaluation.retries)
    compact: bool = True  # after the report: merge the store's small files, expire week-old snapshots
    # weights: rehearsal only: seconds each generator and scorer batch waits, standing in for a GPU's batch time
    rehearsal_batch_seconds: float = Field(default=0.0, ge=0)

    @field_validator("dtype")
    @classmethod
    def _canonical_dtype(cls, value: str | None) -> str | None:
        from fastface.dtypes import dtype_name

        return None if value is None else dtype_name(value)  # unknown: ValueError listing the accepted names

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> "ExecutionConfig":
        if self.dtype == "float16" and self.device is not None and self.device.split(":")[0] == "cpu":
            raise ValueError("dtype float16 does not run on device cpu (diffusers refuses half precision on the "
                             "CPU); use bfloat16 or float32 there, or float16 on cuda")
        return self


class BootstrapConfig(_Model):
    samples: int = Field(default=1000, ge=10)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    seed: int = 0


class ReportConfig(_Model):
    ip_adapter_scale: float | None = None  # None: 0.8 when swept, else the largest swept value

    @field_validator("ip_adapter_scale")
    @classmethod
    def _scale(cls, value: float | None) -> float | None:
        return None if value is None else validation.scale("report.ip_adapter_scale", value)
    baseline: str = "baseline"
    bootstrap: BootstrapConfig = BootstrapConfig()
    grid_identities: int = Field(default=6, ge=1)
    calibration: bool = True


class EvaluationConfig(_Model):
    """``weights``: ``real`` (the checkpoints), ``tiny`` (tiny-* random-weight models), or ``rehearsal``:
    every step of the run with model-free workers (:mod:`actors.rehearsal`) and a dataset made without
    models (:mod:`evaluation.rehearsal`), under the run name ``<name>-rehearsal``."""

    name: str
    weights: Literal["tiny", "real", "rehearsal"]
    face_backend: str  # a name in fastface.face_backends.FACE_BACKENDS
    dataset: DatasetConfig
    sweep: SweepConfig
    metrics: MetricsConfig = MetricsConfig()
    execution: ExecutionConfig = ExecutionConfig()
    report: ReportConfig = ReportConfig()
    source_path: str | None = None  # where the YAML came from (relative paths resolve against its folder)

    @field_validator("face_backend")
    @classmethod
    def _known_face_backend(cls, value: str) -> str:
        from fastface.face_backends import check_face_backend

        return check_face_backend(value)

    @model_validator(mode="before")
    @classmethod
    def _rehearsal_names(cls, data: Any) -> Any:
        """A rehearsal writes under ``<name>-rehearsal`` (and its dataset under ``<dataset.name>-rehearsal``)."""
        if isinstance(data, dict) and data.get("weights") == "rehearsal":
            data = dict(data)
            name = data.get("name")
            if isinstance(name, str) and not name.endswith(REHEARSAL_SUFFIX):
                data["name"] = name + REHEARSAL_SUFFIX
            dataset = data.get("dataset")
            if isinstance(dataset, dict) and isinstance(dataset.get("name"), str) \
                    and not dataset["name"].endswith(REHEARSAL_SUFFIX):
                data["dataset"] = dict(dataset, name=dataset["name"] + REHEARSAL_SUFFIX)
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        from storage.store import check_name

        check_name("name", value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "EvaluationConfig":
        problems = check_config(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def base_dir(self) -> Path | None:
        return Path(self.source_path).parent if self.source_path else None

    @property
    def dataset_run(self) -> str:
        return self.dataset.name or f"{self.name}-dataset"

    def presets(self) -> list[str]:
        """Every preset the sweep runs (baseline first), in order of appearance."""
        names = [self.report.baseline] + [p for s in self.sweep.sets for p in s.presets]
        return list(dict.fromkeys(names))

    def steps_for(self, model: str) -> int | None:
        steps = self.sweep.steps
        return steps.get(model) if isinstance(steps, dict) else steps

    def report_scale(self) -> float:
        scales = self.sweep.ip_adapter_scales
        if self.report.ip_adapter_scale is not None:
            return self.report.ip_adapter_scale
        from fastface.presets import table_ip_adapter_scale

        return table_ip_adapter_scale(scales)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def check_config(config: EvaluationConfig) -> list[str]:
    """Cross-field checks against the registries; returns one message per problem."""
    from fastface.checkpoints import CHECKPOINTS, check_steps
    from fastface.faces import backend_for_embedding_width
    from fastface.metrics import METRICS
    from fastface.presets import PRESETS

    problems: list[str] = []
    sweep = config.sweep
    for model in sweep.models:
        if model not in CHECKPOINTS:
            problems.append(f"sweep.models: unknown model {model!r}; allowed: {', '.join(CHECKPOINTS.names())}")
            continue
        checkpoint = CHECKPOINTS.get(model)
        if config.weights != "rehearsal" and (config.weights == "tiny") != checkpoint.tiny:
            want = "tiny-* models" if config.weights == "tiny" else "real models (not tiny-*)"
            problems.append(f"sweep.models: {model!r} does not fit weights: {config.weights} (use {want})")
        try:
            backend_for_embedding_width(checkpoint.id_embed_dim, config.face_backend, model=f"model {model!r}",
                                        option="face_backend:")
        except ValueError as exc:
            problems.append(str(exc))
    if not sweep.sets:
        problems.append("sweep.sets: give at least one {prompts: realistic|stylistic|joint, presets: [...]}")
    for i, set_ in enumerate(sweep.sets):
        for preset in set_.presets:
            if preset not in PRESETS:
                problems.append(f"sweep.sets[{i}].presets: unknown preset {preset!r}; allowed: {', '.join(PRESETS.names())}")
    if config.report.baseline not in PRESETS:
        problems.append(f"report.baseline: unknown preset {config.report.baseline!r}; allowed: {', '.join(PRESETS.names())}")
    if isinstance(sweep.steps, dict):
        extra = sorted(set(sweep.steps) - set(sweep.models))
        if extra:
            problems.append(f"sweep.steps: models {extra} are not in sweep.models {list(sweep.models)}")
    if not problems:
        for model in sweep.models:
            problems += _size_problems("sweep.size", sweep.size, model)
            for preset in config.presets():
                try:
                    check_steps(model, preset, config.steps_for(model))
                except ValueError as exc:
                    problems.append(f"sweep.steps: {exc}")
    for name in config.metrics.names:
        if name not in METRICS:
            problems.append(f"metrics.names: unknown metric {name!r}; allowed: {', '.join(METRICS.names())}")
    if len(set(config.metrics.names)) != len(config.metrics.names):
        problems.append(f"metrics.names: listed twice: {list(config.metrics.names)}")
    if config.report.ip_adapter_scale is not None and config.report.ip_adapter_scale not in sweep.ip_adapter_scales:
        problems.append(
            f"report.ip_adapter_scale: {config.report.ip_adapter_scale} is not swept; allowed: {list(sweep.ip_adapter_scales)}"
        )
    data = config.dataset
    base = config.base_dir
    if data.folder is None and not data.identities and data.synthesise is None:
        problems.append("dataset: give folder (the authors' layout), identities (photos) or synthesise")
    if data.folder is not None and config.weights != "rehearsal":  # a rehearsal stands in for a missing folder
        folder = resolve_uri(data.folder, base)
        if not _exists(folder):
            problems.append(f"dataset.folder: {data.folder} does not exist (resolved to {folder}); "
                            "download the authors' released data (id_photos/, prompts_nostyle.txt, prompts_style.txt)")
    for i, source in enumerate(data.identities):
        try:
            path = resolve_uri(source.uri, base)
        except FileNotFoundError as exc:
            problems.append(f"dataset.identities[{i}].uri: {exc}")
            continue
        if not _exists(path):
            problems.append(f"dataset.identities[{i}].uri: {source.uri} not found (resolved to {path})")
    for i, uri in enumerate(data.prompt_files):
        if not _exists(resolve_uri(uri, base)):
            problems.append(f"dataset.prompt_files[{i}]: {uri} not found")
    if data.synthesise is not None and data.synthesise.model not in CHECKPOINTS:
        problems.append(f"dataset.synthesise.model: unknown model {data.synthesise.model!r}; "
                        f"allowed: {', '.join(CHECKPOINTS.names())}")
    elif data.synthesise is not None:
        problems += _size_problems("dataset.synthesise.size", data.synthesise.size, data.synthesise.model)
    problems += _prompt_problems(config)
    if config.execution.rehearsal_batch_seconds and config.weights != "rehearsal":
        problems.append("execution.rehearsal_batch_seconds: only with weights: rehearsal")
    if config.weights == "real":
        for field in ("clip_model", "aesthetic_checkpoint"):
            if getattr(config.metrics, field) == "tiny":
                problems.append(f"metrics.{field}: 'tiny' needs weights: tiny")
    return problems


def _size_problems(field: str, size: int | None, model: str) -> list[str]:
    from fastface.checkpoints import get_checkpoint

    if size is None:
        return []
    try:
        validation.image_size(field, size, validation.size_multiple(get_checkpoint(model)), model)
    except ValueError as exc:
        return [str(exc)]
    return []


def _prompt_problems(config: EvaluationConfig) -> list[str]:
    """Prompt kinds the sets need but no prompt source gives (a run would plan no example for them)."""
    from evaluation.dataset import parse_prompt_lines

    data = config.dataset
    if data.folder is not None:
        return []  # the authors' layout: its prompt files are checked when the folder is read
    kinds: set[str] = set()
    for uri in data.prompt_files:
        path = resolve_uri(uri, config.base_dir)
        if "://" in path or not Path(path).is_file():
            return []  # a remote prompt file (or a missing one, reported above): kinds unknown here
        try:
            kinds |= {row["kind"] for row in parse_prompt_lines(Path(path).read_text(encoding="utf-8"))}
        except (OSError, UnicodeDecodeError) as exc:
            return [f"dataset.prompt_files: cannot read {uri}: {exc}"]
    try:
        kinds |= {row["kind"] for row in parse_prompt_lines("\n".join(data.prompts))}
    except ValueError as exc:
        return [f"dataset.prompts: {exc}"]
    if data.realistic_prompts:
        kinds.add("realistic")
    if data.stylistic_prompts:
        kinds.add("stylistic")
    if not kinds:
        return ["dataset: no prompts; give dataset.prompts (a list of lines), prompt_files, folder, "
                "or realistic_prompts / stylistic_prompts (curated)"]
    problems = []
    for i, set_ in enumerate(config.sweep.sets):
        if not set(set_kinds(set_.prompts)) & kinds:
            have = " and ".join(sorted(kinds))
            problems.append(f"sweep.sets[{i}]: needs {set_.prompts} prompts but the dataset has only {have} ones "
                            "(stylistic prompts have ';', e.g. 'oil painting; person in a park')")
    return problems


def check_photos(config: EvaluationConfig, detect_faces: bool = True) -> list[str]:
    """What a run would reject in the identity photos: unreadable files, no face, fewer faces than ``crop_faces``.

    Local photos only (remote ones are read by the run). With ``detect_faces`` the face
    backend runs on every photo, so this is for ``evaluate --check``, not for every start.
    """
    from evaluation.dataset import PHOTO_SUFFIXES, authors_layout, list_photos
    from fastface.faces import ImageReadError, get_face_backend, load_image_rgb

    sources: list[tuple[str, int | None, list[Path]]] = []
    data = config.dataset
    try:
        folder_missing = data.folder is not None and config.weights == "rehearsal" \
            and not _exists(resolve_uri(data.folder, config.base_dir))  # the rehearsal synthesises its stand-in
        if data.folder is not None and not folder_missing and "://" not in resolve_uri(data.folder, config.base_dir):
            sources.append(("dataset.folder", None, authors_layout(resolve_uri(data.folder, config.base_dir))[0]))
        for i, source in enumerate(data.identities):
            uri = resolve_uri(source.uri, config.base_dir)
            if "://" not in uri:
                sources.append((f"dataset.identities[{i}]", source.crop_faces, list_photos(uri)))
    except (FileNotFoundError, OSError) as exc:
        return [f"dataset: {exc}"]
    backend = get_face_backend(config.face_backend) if detect_faces and config.weights != "rehearsal" else None
    problems = []
    for field, crop_faces, paths in sources:
        if not paths:
            problems.append(f"{field}: no photos ({', '.join(PHOTO_SUFFIXES)}) found")
        for path in paths:
            try:
                rgb = load_image_rgb(path)
            except ImageReadError as exc:
                problems.append(f"{field}: {exc}")
                continue
            if backend is None:
                continue
            found = len(backend.detect(rgb))
            if found == 0:
                problems.append(f"{field}: no face found in {path} ({backend.name}); use a photo with a visible face")
            elif crop_faces and found < crop_faces:
                problems.append(f"{field}: crop_faces is {crop_faces} but {path} has {found} face(s)")
    return problems


def _format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: the config file, then each bad field and what is allowed, separated by '; '."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see configs/smoke.yaml for the fields)"
        elif error["type"] == "literal_error":
            message = f"{message}, got {error.get('input')!r}"
        parts.append(f"{where}: {message}" if where else message)
    return f"invalid evaluation config {source}: " + "; ".join(parts)


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>", overrides: dict[str, Any] | None = None) -> EvaluationConfig:
    """Validate a config dict (``overrides`` are dotted keys, e.g. ``{"sweep.size": 32}``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid evaluation config {source}: expected a mapping at the top level")
    data = _deep_copy(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        if not all(parents) or not leaf:
            raise ConfigError(f"invalid override {dotted}: expected a dotted field name such as sweep.size")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:depth + 1])
                raise ConfigError(f"invalid override {dotted}: {where} is a {type(node).__name__} "
                                  f"({node!r}), not a section with fields")
        node[leaf] = value
    if source != "<dict>":
        data.setdefault("source_path", source)
    try:
        return EvaluationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> EvaluationConfig:
    """Read and validate a YAML config (``yaml.safe_load``; nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    return config_from_dict(data, source=str(path.resolve()), overrides=overrides)


__all__ = [
    "ConfigError",
    "DatasetConfig",
    "EvaluationConfig",
    "IdentitySource",
    "SetConfig",
    "SweepConfig",
    "SynthesisConfig",
    "config_from_dict",
    "load_config",
    "resolve_uri",
]
