"""What the app reads from a store: bounded SQL only (point queries with LIMIT/OFFSET, fronts by GROUP BY).

Point queries (a gallery page, a comparison, one image) read the lake's tables directly,
filtered by what they show, and keep the latest row per key among the rows found — the
filters name the key or columns a retried write repeats unchanged, so this is the
deduplication of :mod:`storage.catalog`'s views, done on the few rows shown instead of the
whole table. Fronts aggregate through the catalog's deduplicated views, once per run and
filter (cached: a store's finished run does not change).

:func:`open_store` opens the store read-only, as ``fastface sql`` does (:mod:`storage.readonly`:
nothing is created or changed, external access is off); a missing root or a folder without
tables is an :class:`AppError` on the page, and opening is retried on the next request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from fastface.prompt_sets import PROMPT_SETS, set_kinds
from storage.duck import quote_identifier as _q
from storage.schemas import KEYS

FRONT_METRICS = ("id", "clip", "ae", "ir")
GALLERY_METRICS = ("id", "clip", "ae", "ir", "face_size", "fsc", "ffc")
RUNS_TTL_S = 10.0


class AppError(ValueError):
    """Something the page shows as one line (an unknown run, an empty store...)."""


def _kinds(prompt_set: str) -> tuple[str, ...]:
    """The prompt kinds of a set (:func:`fastface.prompt_sets.set_kinds`); an unknown one is shown on the page."""
    try:
        return set_kinds(prompt_set)
    except ValueError as exc:
        raise AppError(str(exc)) from None


def open_store(root: str):
    """``(Store, Catalog)`` of an existing store, read-only (:mod:`storage.readonly`: the lake attached
    READ_ONLY, external access off, nothing created); the same rule as ``fastface sql``."""
    from storage import Catalog
    from storage.checks import check_store_root
    from storage.readonly import readonly_store

    check_store_root(root, for_reading=True)
    store = readonly_store(root)
    return store, Catalog.readonly(store)


@dataclass(frozen=True)
class Config:
    """One point of a front: a configuration of a run."""

    model: str
    preset: str
    lora_scale: float
    ip_adapter_scale: float


class StoreReader:
    """The app's queries over one store root (thread-safe: one DuckDB connection behind a lock)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._lock = threading.RLock()
        self._opened = None
        self._cache: dict[tuple, Any] = {}

    # -- opening ------------------------------------------------------------------------------
    def _open(self):
        with self._lock:
            if self._opened is None:
                try:
                    self._opened = open_store(self.root)
                except ValueError as exc:
                    raise AppError(str(exc).splitlines()[0]) from None
            return self._opened

    @property
    def store(self):
        return self._open()[0]

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        catalog = self._open()[1]
        with self._lock:
            return catalog.rows(sql, list(params))

    def latest(self, table: str, columns: str, where: str, params: Sequence[Any], *, order: str = "",
               limit: int | None = None, offset: int = 0) -> list[dict]:
        """Latest row per key of ``table`` among rows matching ``where`` (which must keep every version of a key)."""
        from storage.layout import LAKE

        keys = ", ".join(_q(k) for k in KEYS[table])
        sql = (f"SELECT {columns} FROM {LAKE}.main.{_q(table)} WHERE {where} "
               f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY created_at DESC, rowid DESC) = 1")
        if order:
            sql = f"SELECT * FROM ({sql}) ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)} OFFSET {int(offset)}"
        return self.rows(sql, params)

    def warm(self) -> None:
        """Open the store and prepare the first page (runs, the first run's options and fronts); errors wait for a page."""
        try:
            run = self.runs()[0]
            self.options(run)
            self.front_rows(run)
        except AppError:
            pass

    # -- what a run holds ---------------------------------------------------------------------
    def runs(self) -> list[str]:
        """The store's runs (cached for :data:`RUNS_TTL_S`: a page asks several times, a new run shows soon)."""
        cached = self._cache.get("runs")
        if cached and time.monotonic() - cached[0] < RUNS_TTL_S:
            runs = cached[1]
        else:
            runs = [r["run_id"] for r in self.rows("SELECT DISTINCT run_id FROM examples_raw ORDER BY run_id")]
            self._cache["runs"] = (time.monotonic(), runs)
        if not runs:
            raise AppError(f"the store {self.root} holds no evaluated runs yet (run `fastface evaluate` into it)")
        return runs

    def check_run(self, run: str | None) -> str:
        runs = self.runs()
        if not run:
            return runs[0]
        if run not in runs:
            raise AppError(f"no run {run!r} in {self.root}; its runs: {', '.join(runs)}")
        return run

    def options(self, run: str) -> dict[str, list]:
        """Distinct values of the run's examples (cached per run): models, presets, scales, identities, prompts,
        and the number of examples per configuration and prompt kind (a gallery's total, without a count query)."""
        key = ("options", run)
        if key not in self._cache:
            columns = ("model", "preset", "lora_scale", "ip_adapter_scale", "identity_id", "prompt_kind")
            found = self.rows("SELECT " + ", ".join(f"list(DISTINCT {_q(c)} ORDER BY {_q(c)}) AS {_q(c)}" for c in columns)
                              + " FROM examples_raw WHERE run_id = ?", [run])[0]  # one scan for all of them
            out = {c: list(found[c] or []) for c in columns}
            out["counts"] = {(r["model"], r["preset"], r["lora_scale"], r["ip_adapter_scale"], r["prompt_kind"]): r["n"]
                             for r in self.rows("SELECT model, preset, lora_scale, ip_adapter_scale, prompt_kind, "
                                                "count(DISTINCT example_id) AS n FROM examples_raw WHERE run_id = ? "
                                                "GROUP BY ALL", [run])}
            out["prompts"] = self.rows("SELECT DISTINCT prompt_id, prompt, prompt_kind FROM examples_raw "
                                       "WHERE run_id = ? ORDER BY prompt_kind, prompt_id", [run])
            self._cache[key] = out
        return self._cache[key]

    # -- fronts ---------------------------------------------------------------------------------
    def front_rows(self, run: str, *, prompt_set: str = "joint", identity: str = "", presets: Sequence[str] = ()) -> list[dict]:
        """Mean of ID/CLIP/AE/IR per config (the rows :mod:`evaluation.pareto` takes), by one GROUP BY (cached)."""
        kinds = _kinds(prompt_set)
        key = ("fronts", run, prompt_set, identity, tuple(presets))
        if key not in self._cache:
            where = [f"e.prompt_kind IN ({', '.join('?' * len(kinds))})"]
            params: list[Any] = [run, *FRONT_METRICS, *kinds]
            if identity:
                where.append("e.identity_id = ?")
                params.append(identity)
            if presets:
                where.append(f"e.preset IN ({', '.join('?' * len(presets))})")
                params.extend(presets)
            if len(self._cache) > 512:  # filters × runs: keep memory bounded
                self._cache.clear()
            self._cache[key] = self.rows(
                "SELECT e.model, e.preset, e.lora_scale, e.ip_adapter_scale, m.metric, avg(m.value) AS value, "
                "count(m.value) AS n FROM metrics m JOIN examples e USING (run_id, example_id) "
                f"WHERE m.run_id = ? AND m.error IS NULL AND m.metric IN ({', '.join('?' * len(FRONT_METRICS))}) "
                f"AND {' AND '.join(where)} GROUP BY ALL", params)
        return [dict(r, set=prompt_set) for r in self._cache[key]]

    # -- images and their metrics ---------------------------------------------------------------
    def gallery(self, run: str, config: Config, *, identity: str = "", prompt_set: str = "joint",
                page: int = 0, page_size: int = 12) -> tuple[list[dict], int]:
        """One page of a config's images (identity × prompt order) with their metrics, and the total count."""
        kinds = _kinds(prompt_set)
        where = ("run_id = ? AND model = ? AND preset = ? AND lora_scale = ? AND ip_adapter_scale = ? "
                 f"AND prompt_kind IN ({', '.join('?' * len(kinds))})")
        params: list[Any] = [run, config.model, config.preset, config.lora_scale, config.ip_adapter_scale, *kinds]
        if identity:
            where += " AND identity_id = ?"
            params.append(identity)
        if identity:
            total = self.rows(f"SELECT count(DISTINCT example_id) AS n FROM examples_raw WHERE {where}", params)[0]["n"]
        else:
            counts = self.options(run)["counts"]
            total = sum(counts.get((config.model, config.preset, config.lora_scale, config.ip_adapter_scale, kind), 0)
                        for kind in kinds)
        examples = self.latest("examples", "example_id, identity_id, identity_hash, prompt_id, prompt, prompt_kind, seed, "
                               "model, preset, lora_scale, ip_adapter_scale", where, params,
                               order="identity_id, prompt_kind, prompt_id, seed, example_id",
                               limit=page_size, offset=max(page, 0) * page_size)
        return self._with_images_and_metrics(run, examples), int(total)

    def seeds(self, run: str, identity: str, prompt_id: str, limit: int = 200) -> list[int]:
        """The seeds one identity and prompt were generated with (a few per pair; bounded)."""
        return [r["seed"] for r in self.rows(
            "SELECT DISTINCT seed FROM examples_raw WHERE run_id = ? AND identity_id = ? AND prompt_id = ? "
            f"ORDER BY seed LIMIT {int(limit)}", [run, identity, prompt_id])]

    def compare(self, run: str, *, identity: str, prompt_id: str, seed: int, model: str, lora_scale: float,
                presets: Sequence[str] = ()) -> list[dict]:
        """One identity, prompt and seed across the run's presets and λ (one model and LoRA scale)."""
        where = "run_id = ? AND identity_id = ? AND prompt_id = ? AND seed = ? AND model = ? AND lora_scale = ?"
        params: list[Any] = [run, identity, prompt_id, int(seed), model, float(lora_scale)]
        if presets:
            where += f" AND preset IN ({', '.join('?' * len(presets))})"
            params.extend(presets)
        examples = self.latest("examples", "example_id, identity_id, identity_hash, prompt_id, prompt, prompt_kind, seed, "
                               "model, preset, lora_scale, ip_adapter_scale", where, params,
                               order="preset, ip_adapter_scale", limit=200)
        return self._with_images_and_metrics(run, examples)

    def _with_images_and_metrics(self, run: str, examples: list[dict]) -> list[dict]:
        if not examples:
            return []
        ids = [e["example_id"] for e in examples]
        marks = ", ".join("?" * len(ids))
        generations = {g["example_id"]: g for g in self.latest(
            "generations", "example_id, status, image_uri, error", f"run_id = ? AND example_id IN ({marks})", [run, *ids])}
        metrics: dict[str, dict] = {}
        for m in self.latest("metrics", "example_id, metric, value, error", f"run_id = ? AND example_id IN ({marks})",
                             [run, *ids]):
            if m["error"] is None and m["metric"] in GALLERY_METRICS:
                metrics.setdefault(m["example_id"], {})[m["metric"]] = m["value"]
        out = []
        for e in examples:
            g = generations.get(e["example_id"], {})
            out.append(dict(e, status=g.get("status"), image_uri=g.get("image_uri"), error=g.get("error"),
                            metrics=metrics.get(e["example_id"], {})))
        return out

    def image_bytes(self, run: str, example_id: str) -> bytes:
        found = self.latest("generations", "image_uri, status", "run_id = ? AND example_id = ?", [run, example_id])
        if not found or not found[0]["image_uri"] or found[0]["status"] != "ok":
            raise AppError(f"no image of example {example_id!r} in run {run!r}")
        return self.store.read_bytes(found[0]["image_uri"])

    def identities(self, limit: int = 200) -> list[dict]:
        """Stored identity photos (latest row per content hash), for the Generate tab."""
        return self.rows("SELECT identity_id, content_hash, image_uri FROM identities_raw WHERE image_uri IS NOT NULL "
                         "QUALIFY row_number() OVER (PARTITION BY content_hash ORDER BY created_at DESC) = 1 "
                         f"ORDER BY identity_id LIMIT {int(limit)}")

    def identity_photo(self, content_hash: str) -> bytes:
        found = self.rows("SELECT image_uri FROM identities_raw WHERE content_hash = ? AND image_uri IS NOT NULL "
                          "ORDER BY created_at DESC LIMIT 1", [content_hash])
        if not found:
            raise AppError(f"no stored identity photo with content hash {content_hash!r}")
        return self.store.read_bytes(found[0]["image_uri"])

    def report_html(self, run: str) -> bytes:
        key = f"reports/{run}/report.html"
        if not self.store.exists(key):
            raise AppError(f"run {run!r} has no report yet (`fastface report --root {self.root} --run {run}`)")
        return self.store.read_bytes(key)


__all__ = ["AppError", "Config", "FRONT_METRICS", "PROMPT_SETS", "StoreReader", "open_store"]
