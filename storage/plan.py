"""Sweep planning and resume: the examples of a sweep, and which of them still need work.

A :class:`Sweep` expands to ``examples`` rows, each with a stable ``example_id``
(:func:`storage.ids.example_id`). The ``plan_missing_*`` functions compare those rows
with what the store already holds, so re-running a flow after a crash does only what
is missing, and re-planning a finished sweep yields no work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from storage.ids import config_hash, derive_seed, example_id
from storage.store import Store, check_name


def _rows(items: "Sequence[Mapping] | pa.Table") -> list[dict]:
    return items.to_pylist() if isinstance(items, pa.Table) else [dict(r) for r in items]


def _nonempty(name: str, values: Sequence) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"Sweep.{name} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"Sweep.{name} has duplicates: {list(values)}")
    return values


@dataclass(frozen=True)
class Sweep:
    """identities × prompts × models × presets × lora_scales × ip_adapter_scales × run_seeds.

    - ``identities``: rows with ``identity_id`` and ``content_hash`` (the identities table);
    - ``prompts``: rows with ``prompt_id``, ``text`` and optionally ``kind``;
    - ``presets``: preset name → its full config dict (hashed into every example id);
    - ``run_seeds``: each gives one replicate; an example's seed is
      ``derive_seed(run_seed, identity_id, prompt_id)``, the same for every model, preset
      and scale, so comparisons are paired (method-spec §5);
    - ``steps``: one count, or a dict model → count (``base`` uses 30, distilled models 4);
    - ``code_version``: the method/code version string hashed into every example id.
    """

    run_id: str
    identities: Sequence[Mapping[str, Any]]
    prompts: Sequence[Mapping[str, Any]]
    models: Sequence[str]
    presets: Mapping[str, Mapping[str, Any]]
    ip_adapter_scales: Sequence[float]
    code_version: str
    lora_scales: Sequence[float] = (1.0,)
    run_seeds: Sequence[int] = (0,)
    steps: "int | Mapping[str, int]" = 4
    width: int = 1024
    height: int = 1024

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        identities = _rows(self.identities)
        prompts = _rows(self.prompts)
        for i, row in enumerate(identities):
            for key in ("identity_id", "content_hash"):
                if not row.get(key):
                    raise ValueError(f"Sweep.identities[{i}] has no {key!r}; pass rows of the identities table")
        for i, row in enumerate(prompts):
            for key in ("prompt_id", "text"):
                if not row.get(key):
                    raise ValueError(f"Sweep.prompts[{i}] has no {key!r}; pass rows of the prompts table")
        _nonempty("identities (identity_id)", [r["identity_id"] for r in identities])
        _nonempty("prompts (prompt_id)", [r["prompt_id"] for r in prompts])
        set_("identities", tuple(identities))
        set_("prompts", tuple(prompts))
        set_("models", _nonempty("models", self.models))
        if not self.presets:
            raise ValueError("Sweep.presets is empty; map each preset name to its config dict")
        for name, cfg in self.presets.items():
            if not isinstance(cfg, Mapping):
                raise ValueError(f"Sweep.presets[{name!r}] must be the preset's config dict, got {type(cfg).__name__}")
        set_("presets", {k: dict(v) for k, v in self.presets.items()})
        set_("ip_adapter_scales", _nonempty("ip_adapter_scales", [float(x) for x in self.ip_adapter_scales]))
        set_("lora_scales", _nonempty("lora_scales", [float(x) for x in self.lora_scales]))
        set_("run_seeds", _nonempty("run_seeds", [int(x) for x in self.run_seeds]))
        if isinstance(self.steps, Mapping):
            missing = [m for m in self.models if m not in self.steps]
            if missing:
                raise ValueError(f"Sweep.steps has no step count for model(s) {missing}")
        if not self.code_version:
            raise ValueError("Sweep.code_version is empty; pass the method/code version string")

    def steps_for(self, model: str) -> int:
        return int(self.steps[model] if isinstance(self.steps, Mapping) else self.steps)

    def examples(self) -> list[dict]:
        """The ``examples`` rows (without ``created_at``), grouped by model so weights load once."""
        rows, seen = [], {}
        for model in self.models:
            steps = self.steps_for(model)
            for lora_scale in self.lora_scales:
                for preset, preset_config in self.presets.items():
                    for ip_scale in self.ip_adapter_scales:
                        settings = {
                            "model": model,
                            "preset": preset,
                            "preset_config": preset_config,
                            "ip_adapter_scale": ip_scale,
                            "lora_scale": lora_scale,
                            "steps": steps,
                            "width": self.width,
                            "height": self.height,
                            "code_version": self.code_version,
                        }
                        chash = config_hash(settings)
                        for run_seed in self.run_seeds:
                            for ident in self.identities:
                                for prompt in self.prompts:
                                    seed = derive_seed(run_seed, ident["identity_id"], prompt["prompt_id"])
                                    eid = example_id(
                                        identity_hash=ident["content_hash"], prompt=prompt["text"], seed=seed, **settings
                                    )
                                    if eid in seen:
                                        raise ValueError(
                                            f"Sweep makes example {eid} twice ({seen[eid]} and "
                                            f"{(ident['identity_id'], prompt['prompt_id'])}): two identities share an "
                                            "image or two prompts share a text; remove the duplicate"
                                        )
                                    seen[eid] = (ident["identity_id"], prompt["prompt_id"])
                                    rows.append(
                                        {
                                            "example_id": eid,
                                            "run_id": self.run_id,
                                            "identity_id": ident["identity_id"],
                                            "identity_hash": ident["content_hash"],
                                            "prompt_id": prompt["prompt_id"],
                                            "prompt": prompt["text"],
                                            "prompt_kind": prompt.get("kind"),
                                            "model": model,
                                            "preset": preset,
                                            "ip_adapter_scale": ip_scale,
                                            "lora_scale": lora_scale,
                                            "seed": seed,
                                            "steps": steps,
                                            "width": self.width,
                                            "height": self.height,
                                            "config_hash": chash,
                                            "code_version": self.code_version,
                                        }
                                    )
        return rows


def _keyed(examples: "Sequence[Mapping] | pa.Table") -> list[dict]:
    rows = _rows(examples)
    for i, row in enumerate(rows):
        if not row.get("example_id") or not row.get("run_id"):
            raise ValueError(f"examples[{i}] needs 'example_id' and 'run_id' (rows from Sweep.examples())")
    return rows


def _latest_by_run(store: Store, table: str, run_ids: Iterable[str]) -> list[dict]:
    out: list[dict] = []
    for run in sorted(set(run_ids)):
        out += store.latest(table, run_id=run).to_pylist()
    return out


def plan_missing_examples(store: Store, examples: "Sequence[Mapping] | pa.Table") -> list[dict]:
    """Example rows not yet in the ``examples`` table (so re-planning appends nothing twice)."""
    rows = _keyed(examples)
    have = {(r["run_id"], r["example_id"]) for r in _latest_by_run(store, "examples", (r["run_id"] for r in rows))}
    return [r for r in rows if (r["run_id"], r["example_id"]) not in have]


def plan_missing_generations(
    store: Store, examples: "Sequence[Mapping] | pa.Table", *, check_images: bool = False
) -> list[dict]:
    """Examples whose latest ``generations`` row (per run and example) is not ``status == "ok"``.

    A failed attempt is planned again. With ``check_images`` an ok row also needs its image
    under ``images/<run>/`` (one listing per run), for stores whose images may be pruned.
    """
    rows = _keyed(examples)
    runs = {r["run_id"] for r in rows}
    done = {
        (g["run_id"], g["example_id"]) for g in _latest_by_run(store, "generations", runs) if g["status"] == "ok"
    }
    if check_images:
        with_image = {(run, eid) for run in runs for eid in store.image_ids(run)}
        done &= with_image
    return [r for r in rows if (r["run_id"], r["example_id"]) not in done]


def plan_missing_metrics(
    store: Store,
    examples: "Sequence[Mapping] | pa.Table",
    metrics: Sequence[str],
    *,
    require_generation: bool = True,
) -> list[tuple[str, str]]:
    """``(example_id, metric)`` pairs of one run not yet scored.

    Scored means the latest ``metrics`` row for (run, example, metric) has no ``error``
    (a null value with no error — e.g. no face found — counts as scored). With
    ``require_generation`` only examples whose generation is ok are planned: there is
    nothing to score before the image exists.
    """
    rows = _keyed(examples)
    runs = {r["run_id"] for r in rows}
    if len(runs) > 1:
        raise ValueError(f"plan_missing_metrics takes examples of one run, got runs {sorted(runs)}; call it per run")
    metrics = list(dict.fromkeys(metrics))
    if require_generation:
        pending = {r["example_id"] for r in plan_missing_generations(store, rows)}
        rows = [r for r in rows if r["example_id"] not in pending]
    scored = {
        (m["example_id"], m["metric"]) for m in _latest_by_run(store, "metrics", runs) if m["error"] is None
    }
    return [(r["example_id"], m) for r in rows for m in metrics if (r["example_id"], m) not in scored]
