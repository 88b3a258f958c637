"""DuckLake behaviour the flows rely on: concurrent writers, compaction under readers, migration, the CLI."""

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog
from storage.plan import plan_missing_generations, plan_missing_metrics
from storage.schemas import conform
from storage.store import Store

REPO = Path(__file__).resolve().parents[1]

APPENDER = """
import sys
from storage.store import Store
store = Store(sys.argv[1])
tag, batches = sys.argv[2], int(sys.argv[3])
for b in range(batches):
    store.append("generations", [{"example_id": f"{tag}-{b}-{i}", "status": "ok", "image_uri": "u"}
                                 for i in range(8)], run_id="r1")
print("DONE", flush=True)
"""


def test_two_processes_append_to_one_root_at_once(tmp_path):
    root = str(tmp_path / "store")
    Store(root).close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, root, tag, "40"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with Catalog(Store(root)) as cat:
        got = cat.rows("SELECT count(*) AS n, count(DISTINCT example_id) AS d, "
                       "count(DISTINCT split_part(example_id, '-', 1)) AS writers FROM generations_raw")
    assert got == [{"n": 640, "d": 640, "writers": 2}]


def _metric_batch(b, n=8):
    return [{"example_id": f"e{b}-{i}", "metric": "clip", "value": 1.0} for i in range(n)]


def test_readers_never_see_a_row_twice_or_miss_one_during_compaction(tmp_path):
    store = Store(str(tmp_path))
    for b in range(30):
        store.append("metrics", _metric_batch(b), run_id="r1")
    for b in range(30, 36):
        store.append("metrics", _metric_batch(b, n=1500), run_id="r1")
    store.append("metrics", _metric_batch(0), run_id="r1")  # a retry: 8 keys twice in _raw, once in the view
    expected = {"raw": 30 * 8 + 6 * 1500 + 8, "keys": 30 * 8 + 6 * 1500}
    files_before = len(store.data_files("metrics"))
    seen, stop, errors = [], threading.Event(), []

    def read_in_a_loop():
        try:
            with Catalog(Store(str(tmp_path))) as cat:
                while not stop.is_set() or len(seen) < 3:
                    row = cat.rows("SELECT (SELECT count(*) FROM metrics_raw) AS raw, "
                                   "(SELECT count(*) FROM metrics) AS keys, "
                                   "(SELECT count(DISTINCT example_id) FROM metrics) AS distinct_keys")[0]
                    seen.append(row)
        except Exception as exc:  # reported below
            errors.append(exc)

    reader = threading.Thread(target=read_in_a_loop)
    reader.start()
    try:
        done = store.compact()  # snapshots older than a week expire: none here, and no reader's
    finally:
        stop.set()
        reader.join(timeout=120)
    assert not errors and seen
    assert all(r == dict(expected, distinct_keys=expected["keys"]) for r in seen), [r for r in seen if r != seen[0]]
    assert files_before == 37 and done["files_after"] < 5
    assert len(store.data_files("metrics")) == 1
    # with no reader left, old snapshots can go; the rows stay exactly the same
    assert store.compact(expire_older_than=timedelta(0))["snapshots_expired"] > 30
    with Catalog(store) as cat:
        assert cat.rows("SELECT count(*) AS raw FROM metrics_raw") == [{"raw": expected["raw"]}]
        assert cat.rows("SELECT count(*) AS keys FROM metrics") == [{"keys": expected["keys"]}]


def test_plan_a_shard_checks_only_its_examples(tmp_path):
    store = Store(str(tmp_path))
    examples = [{"run_id": "s1", "example_id": f"x{i:03d}", "identity_hash": "h"} for i in range(200)]
    store.append("generations", [{"example_id": f"x{i:03d}", "status": "ok"} for i in range(0, 200, 2)], "s1")
    store.append("generations", [{"example_id": "x001", "status": "failed", "error": "OOM"}], "s1")
    shard = examples[:10]
    assert [r["example_id"] for r in plan_missing_generations(store, shard)] == ["x001", "x003", "x005", "x007", "x009"]
    assert plan_missing_generations(store, pa.Table.from_pylist(shard)) == [shard[i] for i in (1, 3, 5, 7, 9)]
    assert plan_missing_generations(store, []) == []
    store.append("metrics", [{"example_id": "x000", "metric": "clip", "value": 0.1}], "s1")
    assert plan_missing_metrics(store, shard[:3], ["clip", "id"]) == [("x000", "id"), ("x002", "clip"), ("x002", "id")]
    with pytest.raises(ValueError, match=r"examples\[1\] needs 'example_id' and 'run_id'"):
        plan_missing_generations(store, [shard[0], {"run_id": "s1"}])


def _old_file(root: Path, table: str, run: str, rows: list[dict], name: str):
    """A file exactly as the one-file-per-batch Store wrote it."""
    from datetime import datetime, timezone

    data = conform(table, rows, defaults={"run_id": run, "created_at": datetime.now(timezone.utc)})
    folder = root / table / f"run_id={run}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(data, folder / f"part-{name}.parquet", compression="zstd")


def test_old_layout_is_refused_then_migrated_by_the_cli(tmp_path, capsys):
    from fastface.cli import main

    old, new = tmp_path / "old", tmp_path / "new"
    (old / "images" / "r1").mkdir(parents=True)
    (old / "images" / "r1" / "e0.png").write_bytes(b"\x89PNG e0")
    _old_file(old, "generations", "r1", [{"example_id": "e0", "status": "failed", "error": "OOM"},
                                         {"example_id": "e1", "status": "ok", "image_uri": "elsewhere"}], "a")
    _old_file(old, "generations", "r1", [{"example_id": "e0", "status": "ok",
                                          "image_uri": str(old / "images" / "r1" / "e0.png")}], "b")
    _old_file(old, "metrics", "r1", [{"example_id": "e0", "metric": m, "value": 0.5} for m in ("clip", "ae")], "c")
    _old_file(old, "metrics", "r2", [{"example_id": "e9", "metric": "clip", "value": 0.25}], "d")

    assert main(["sql", "--root", str(old), "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert f"fastface migrate-store {old} NEW_ROOT" in err and err.count("\n") == 1
    assert main(["migrate-store", str(old), str(new)]) == 0
    assert "rows runs 0, identities 0, prompts 0, examples 0, generations 3, metrics 3" in capsys.readouterr().out
    store = Store(str(new))
    assert store.count("generations") == 3 and store.count("metrics") == 3 and store.run_ids("metrics") == ["r1", "r2"]
    latest = {r["example_id"]: r for r in store.latest("generations").to_pylist()}
    assert latest["e0"]["status"] == "ok" and latest["e1"]["image_uri"] == "elsewhere"
    assert latest["e0"]["image_uri"] == str(new / "images" / "r1" / "e0.png")
    assert store.read_bytes(latest["e0"]["image_uri"]) == b"\x89PNG e0"
    assert (old / "metrics").is_dir()  # the old root is left as it was
    assert main(["migrate-store", str(old), str(new)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_compact_command(tmp_path, capsys):
    from fastface.cli import main

    store = Store(str(tmp_path))
    for b in range(5):
        store.append("metrics", _metric_batch(b, n=1200), run_id="r1")
    store.append("metrics", _metric_batch(9), run_id="r1")
    assert len(store.data_files("metrics")) == 6
    assert main(["compact", "--root", str(tmp_path), "--cleanup-hours", "0"]) == 0
    assert "data files 6 -> 1" in capsys.readouterr().out
    assert len(store.data_files("metrics")) == 1 and store.count("metrics") == 5 * 1200 + 8
    assert len(list((tmp_path / "tables" / "main" / "metrics").rglob("*.parquet"))) == 1


def test_a_new_store_keeps_no_rows_in_the_catalog(tmp_path):
    """Inlining is off before the first insert (the store's own meta rows included): compaction has
    nothing to flush, so it never races a reader over inlined rows (docs/storage.md)."""
    store = Store(str(tmp_path))
    store.append("runs", [{"run_id": "r1", "kind": "test"}], "r1")
    assert store.compact()["rows_flushed"] == 0
    assert Store(str(tmp_path)).count("runs") == 1
