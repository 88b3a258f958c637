"""The store at the paper's size: appends, both planning calls, the report query, counts, peak RSS.

configs/paper.yaml is 54 identities × 560 (prompt, preset) pairs (80 realistic prompts × 5 presets
+ 40 stylistic × 4) × 4 models × 2 LoRA scales × 6 λ = 1,451,520 examples, one generation each
(appended in batches of 8, as the generator pool does) and 7 metrics each (~10.2 M rows, appended in batches of 32 images × 7 metrics).

The store is bulk-loaded into the state the pools leave mid-run, before any compaction:
every append is one small Parquet file and each writer merges its table's files every
``MERGE_EVERY_FILES`` appends, so the table holds files of 200 batches each (the
pessimistic case: real merges combine those further, up to 32 MB) plus the last writer's
unmerged single-batch files. 95 % of the examples are generated and 90 % of those scored.
Then it measures, before and after ``Store.compact()``:

- append: one generations batch (8 rows) and one metrics batch (224 rows) on top, per batch;
- ``plan_missing_generations`` and ``plan_missing_metrics`` over the whole sweep (the
  examples passed as the Arrow table ``Store.latest("examples")`` returns) and over one
  shard of 2,048 examples;
- the report's table query (means per model × preset × λ × metric over the deduplicated
  views) and ``count(*)`` per table through the views;
- peak RSS of this process (DuckDB runs in it).

    python benchmarks/bench_storage_scale.py --scale 0.1
    python benchmarks/bench_storage_scale.py --scale 1
    python benchmarks/bench_storage_scale.py --scale 0.1 --root /tmp/store --png   # then: fastface report --root /tmp/store --run paper
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage import Catalog, Store  # noqa: E402
from storage.plan import plan_missing_generations, plan_missing_metrics  # noqa: E402
from storage.schemas import TABLES, schema  # noqa: E402
from storage.store import MERGE_EVERY_FILES  # noqa: E402

PAPER_EXAMPLES = 54 * 560 * 4 * 2 * 6
METRICS = ("id", "clip", "ae", "ir", "fsc", "face_size", "ffc")
MODELS = ("hyper", "lcm", "lightning", "base")
PRESETS = ("baseline", "ff-am1")
SCALES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
RUN = "paper"
GEN_BATCH, IMAGES_PER_METRIC_BATCH = 8, 32
SHARD = 2048
IMAGE_URI = f"s3://bucket/images/{RUN}/x.png"  # --png: one real PNG under the store instead


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def example_ids(start: int, stop: int) -> pa.Array:
    """32-hex ids spread like sha256 prefixes (a multiplicative hash of the index)."""
    idx = np.arange(start, stop, dtype=np.uint64)
    hi = (idx * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(0xA5A5A5A5A5A5A5A5)
    lo = (idx * np.uint64(0xC2B2AE3D27D4EB4F)) + np.uint64(0x165667B19E3779F9)
    return pa.array([f"{h:016x}{l:016x}" for h, l in zip(hi.tolist(), lo.tolist())], pa.string())


def examples_table(start: int, stop: int, created: datetime) -> pa.Table:
    n = stop - start
    i = np.arange(start, stop)
    model = np.array(MODELS)[i % len(MODELS)]
    preset = np.array(PRESETS)[(i // 4) % len(PRESETS)]
    scale = np.array(SCALES)[(i // 8) % len(SCALES)]
    cols = {
        "example_id": example_ids(start, stop), "run_id": pa.array([RUN] * n),
        "identity_id": pa.array([f"id{k % 54:02d}" for k in i.tolist()]),
        "identity_hash": pa.array(["0" * 64] * n), "prompt_id": pa.array([f"p{k % 560:03d}" for k in i.tolist()]),
        "prompt": pa.array(["a photo of a person"] * n), "prompt_kind": pa.array(["realistic"] * n),
        "model": pa.array(model), "preset": pa.array(preset), "ip_adapter_scale": pa.array(scale),
        "lora_scale": pa.array(np.where((i // 48) % 2 == 0, 1.0, 0.5)),
        "seed": pa.array(i.astype(np.int64)), "steps": pa.array(np.full(n, 4, np.int32)),
        "width": pa.array(np.full(n, 1024, np.int32)), "height": pa.array(np.full(n, 1024, np.int32)),
        "config_hash": pa.array(["c" * 32] * n), "code_version": pa.array(["v1"] * n),
        "created_at": pa.array([created] * n, schema("examples").field("created_at").type),
    }
    return by_schema("examples", cols)


def generations_table(ids: pa.Array, created: datetime) -> pa.Table:
    n = len(ids)
    return by_schema("generations", {
        "example_id": ids, "run_id": pa.array([RUN] * n), "status": pa.array(["ok"] * n),
        "image_uri": pa.array([IMAGE_URI] * n), "seconds": pa.array(np.full(n, 1.5)),
        "device": pa.array(["cuda:0"] * n), "worker": pa.array(["w0"] * n), "versions": pa.array(["{}"] * n),
        "error": pa.nulls(n, pa.string()),
        "created_at": pa.array([created] * n, schema("generations").field("created_at").type),
    })


def metrics_table(ids: pa.Array, created: datetime, rng) -> pa.Table:
    n = len(ids)
    k = len(METRICS)
    return by_schema("metrics", {
        "example_id": pa.array(np.repeat(np.asarray(ids.to_pylist(), dtype=object), k).tolist(), pa.string()),
        "run_id": pa.array([RUN] * (n * k)), "metric": pa.array(list(METRICS) * n),
        "value": pa.array(rng.random(n * k)), "detail": pa.nulls(n * k, pa.string()),
        "error": pa.nulls(n * k, pa.string()),
        "created_at": pa.array([created] * (n * k), schema("metrics").field("created_at").type),
    })


def by_schema(table: str, cols: dict) -> pa.Table:
    """``cols`` in ``table``'s column order; columns the benchmark does not fill (nullable) are nulls."""
    fields = schema(table)
    n = len(next(iter(cols.values())))
    return pa.table({f.name: cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in fields}).cast(fields)


def one_png(size: int = 64) -> bytes:
    """A small real PNG (a gradient), the image every generation points at with ``--png``."""
    import io

    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.full((size, size), 128, np.uint8)), -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


CPU: dict[str, float] = {}


def timed(fn, *args, **kw):
    """(result, wall seconds); the CPU seconds of this process (all DuckDB threads) go to CPU[fn name]."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    CPU[getattr(fn, "__name__", "call")] = time.process_time() - cpu
    return out, time.perf_counter() - start


def bulk_load(store: Store, n: int, log) -> dict:
    created = datetime.now(timezone.utc) - timedelta(hours=2)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, n, 250_000):
        store._insert("examples", examples_table(start, min(n, start + 250_000), created))
    generated = int(n * 0.95)
    scored = int(generated * 0.90)
    merged_gen = GEN_BATCH * MERGE_EVERY_FILES
    stop_merged = generated - (MERGE_EVERY_FILES - 1) * GEN_BATCH  # the last writer's files are unmerged
    for start in range(0, stop_merged, merged_gen):
        store._insert("generations", generations_table(example_ids(start, min(stop_merged, start + merged_gen)),
                                                       created))
    for start in range(stop_merged, generated, GEN_BATCH):
        store._insert("generations", generations_table(example_ids(start, min(generated, start + GEN_BATCH)),
                                                       created))
    merged_met = IMAGES_PER_METRIC_BATCH * MERGE_EVERY_FILES
    stop_merged = scored - (MERGE_EVERY_FILES - 1) * IMAGES_PER_METRIC_BATCH
    for start in range(0, stop_merged, merged_met):
        store._insert("metrics", metrics_table(example_ids(start, min(stop_merged, start + merged_met)), created, rng))
        log(f"  metrics loaded: {min(stop_merged, start + merged_met) * len(METRICS):,} rows")
    for start in range(stop_merged, scored, IMAGES_PER_METRIC_BATCH):
        store._insert("metrics", metrics_table(example_ids(start, min(scored, start + IMAGES_PER_METRIC_BATCH)),
                                               created, rng))
    return {"generated": generated, "scored": scored, "load_s": time.perf_counter() - started}


def measure(store: Store, n: int, state: dict, label: str, appends: int) -> dict:
    out: dict = {"label": label}
    with Catalog(store) as cat:
        # appends on top, as the pools make them (distinct new keys each time)
        base = n + (0 if label == "mid-run" else appends)
        gen_ms, met_ms, gen_cpu, met_cpu = [], [], [], []
        for a in range(appends):
            ids = example_ids(10 * n + base + a * GEN_BATCH, 10 * n + base + (a + 1) * GEN_BATCH)
            rows = generations_table(ids, datetime.now(timezone.utc))
            _, s = timed(store.append, "generations", rows, RUN)
            gen_ms.append(s * 1000)
            gen_cpu.append(CPU["append"] * 1000)
            ids = example_ids(20 * n + base + a * 32, 20 * n + base + (a + 1) * 32)
            rows = metrics_table(ids, datetime.now(timezone.utc), np.random.default_rng(a))
            _, s = timed(store.append, "metrics", rows, RUN)
            met_ms.append(s * 1000)
            met_cpu.append(CPU["append"] * 1000)
        out["append_gen_ms"] = (statistics.median(gen_ms), max(gen_ms))
        out["append_met_ms"] = (statistics.median(met_ms), max(met_ms))
        out["append_cpu_ms"] = (statistics.median(gen_cpu), statistics.median(met_cpu))
        examples, out["latest_examples_s"] = timed(store.latest, "examples", run_id=RUN)
        todo, out["plan_gen_s"] = timed(plan_missing_generations, store, examples)
        out["plan_gen_cpu"] = CPU["plan_missing_generations"]
        pairs, out["plan_met_s"] = timed(plan_missing_metrics, store, examples, list(METRICS))
        out["plan_met_cpu"] = CPU["plan_missing_metrics"]
        out["planned_gen"], out["planned_pairs"] = len(todo), len(pairs)
        shard = examples.slice(state["generated"] - SHARD // 2, SHARD)
        shard_todo, out["plan_gen_shard_s"] = timed(plan_missing_generations, store, shard)
        _, out["plan_met_shard_s"] = timed(plan_missing_metrics, store, shard, list(METRICS))
        del examples, todo, pairs
        report_sql = (
            "SELECT e.model, e.preset, e.ip_adapter_scale, m.metric, avg(m.value) AS mean, count(*) AS n "
            "FROM metrics m JOIN examples e ON m.example_id = e.example_id AND m.run_id = e.run_id "
            "WHERE m.run_id = ? AND m.error IS NULL GROUP BY ALL ORDER BY ALL")
        report, out["report_s"] = timed(cat.query, report_sql, [RUN])
        out["report_cpu"] = CPU["query"]
        out["report_rows"] = report.num_rows
        counts = {}
        started = time.perf_counter()
        for t in TABLES:
            counts[t] = cat.query(f"SELECT count(*) AS n FROM {t}").column(0)[0].as_py()
        out["count_views_s"] = time.perf_counter() - started
        started = time.perf_counter()
        raw = {t: cat.query(f"SELECT count(*) AS n FROM {t}_raw").column(0)[0].as_py() for t in TABLES}
        out["count_raw_s"] = time.perf_counter() - started
        out["counts"], out["raw"] = counts, raw
    out["files"] = {t: len(store.data_files(t)) for t in ("examples", "generations", "metrics")}
    out["rss_gib"] = peak_rss_gib()
    return out


def show(r: dict) -> None:
    print(f"\n== {r['label']}: data files {r['files']}  (wall time; CPU seconds of this process in [])")
    print(f"append generations batch (8 rows):   median {r['append_gen_ms'][0]:.0f} ms, max {r['append_gen_ms'][1]:.0f} ms")
    print(f"append metrics batch (224 rows):     median {r['append_met_ms'][0]:.0f} ms, max {r['append_met_ms'][1]:.0f} ms")
    print(f"append CPU, median:                  [{r['append_cpu_ms'][0]:.0f} ms] generations, "
          f"[{r['append_cpu_ms'][1]:.0f} ms] metrics")
    print(f"Store.latest('examples') → Arrow:    {r['latest_examples_s']:.2f} s")
    print(f"plan_missing_generations (sweep):    {r['plan_gen_s']:.2f} s  ({r['planned_gen']:,} planned) [{r['plan_gen_cpu']:.2f} s]")
    print(f"plan_missing_metrics (sweep):        {r['plan_met_s']:.2f} s  ({r['planned_pairs']:,} pairs planned) [{r['plan_met_cpu']:.2f} s]")
    print(f"plan_missing_generations (shard {SHARD}): {r['plan_gen_shard_s']:.2f} s")
    print(f"plan_missing_metrics (shard {SHARD}):     {r['plan_met_shard_s']:.2f} s")
    print(f"report table query:                  {r['report_s']:.2f} s  ({r['report_rows']} rows) [{r['report_cpu']:.2f} s]")
    print(f"count(*) all 6 views (dedup):        {r['count_views_s']:.2f} s  {r['counts']}")
    print(f"count(*) all 6 _raw views:           {r['count_raw_s']:.2f} s")
    print(f"peak RSS so far:                     {r['rss_gib']:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of the paper's sweep (default 0.1)")
    parser.add_argument("--root", default=None, help="store root (default: a temp folder, deleted afterwards)")
    parser.add_argument("--appends", type=int, default=40, help="appends timed per table and state")
    parser.add_argument("--png", action="store_true",
                        help="point every image_uri at one real PNG written under the store (to time `fastface "
                             "report` on the store left at --root, image grids included)")
    args = parser.parse_args()
    n = int(PAPER_EXAMPLES * args.scale)
    root = args.root or tempfile.mkdtemp(prefix="fastface-bench-store-")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at start")
    print(f"{n:,} examples, ~{int(n * 0.95 * 0.9) * len(METRICS):,} metric rows, root {root}")
    try:
        store = Store(root)
        if args.png:
            global IMAGE_URI
            IMAGE_URI = store.write_image(RUN, "one", one_png())
        state = bulk_load(store, n, log=lambda line: print(line, flush=True) if args.scale >= 0.5 else None)
        print(f"bulk load: {state['load_s']:.0f} s (not a target: it stands in for the run)")
        mid = measure(store, n, state, "mid-run", args.appends)
        show(mid)
        done, seconds = timed(store.compact)
        print(f"\ncompact: {seconds:.1f} s  {done}")
        after = measure(store, n, state, "after compact", args.appends)
        show(after)
        keys = ("plan_gen_s", "plan_met_s", "report_s", "count_views_s")
        print("\nafter/before compaction: " + ", ".join(f"{k} {after[k] / max(mid[k], 1e-9):.2f}×" for k in keys))
        targets = {"planning < 10 s": max(mid["plan_gen_s"], mid["plan_met_s"], after["plan_gen_s"],
                                          after["plan_met_s"]) < 10,
                   "report < 10 s": max(mid["report_s"], after["report_s"]) < 10,
                   "append < 50 ms": max(mid["append_gen_ms"][0], mid["append_met_ms"][0],
                                         after["append_gen_ms"][0], after["append_met_ms"][0]) < 50,
                   "peak RSS < 6 GiB": peak_rss_gib() < 6}
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print("targets (paper size on 2 cores): " + ", ".join(f"{k}: {'met' if v else 'MISSED'}"
                                                              for k, v in targets.items()))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
