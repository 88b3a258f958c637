"""A store no query breaks, that opens where it is moved, and whose changes can be undone.

`fastface sql` is read-only (storage.readonly): every statement that would change the store or
touch a file outside it is refused in one line, exit 2, with each table's rows and the snapshot id
unchanged; its csv/json/parquet output round-trips the same rows; it imports no torch, Prefect or
Ray. A store folder copied or moved opens where it now is (tables and images). `fastface restore`
brings the tables back to an earlier snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from fastface.cli import main
from storage import Store
from storage.schemas import TABLES

REPO = Path(__file__).resolve().parents[1]


def _fill(root: Path) -> None:
    store = Store(str(root))
    store.append("runs", [{"kind": "evaluate", "config": "{}", "code_version": "t"}], "r")
    store.append("identities", [{"identity_id": "i0", "content_hash": "h0"}], "r")
    rows = []
    for i in range(5):
        uri = store.write_image("r", f"e{i}", b"\x89PNG " + bytes([i]))
        rows.append({"example_id": f"e{i}", "status": "ok", "image_uri": uri, "seconds": 0.5 * i})
    store.append("generations", rows, "r")
    store.append("metrics", [{"example_id": f"e{i}", "metric": m, "value": float(i) if i != 3 else float("nan")}
                             for i in range(5) for m in ("clip", "id")], "r")
    store.append("metrics", [{"example_id": "e0", "metric": "clip", "value": 9.0}], "r")  # a retried score
    store.close()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety") / "store"
    _fill(root)
    return root


def _state(root: "Path | Store") -> dict:
    """Every table's raw row count and the current snapshot id (read-only: this check changes nothing)."""
    store = root if isinstance(root, Store) else Store(str(root), read_only=True)
    try:
        counts = {t: store.count(t) for t in TABLES}
        snapshot = store.query("SELECT id FROM fastface_lake.current_snapshot()").column(0)[0].as_py()
    finally:
        if store is not root:
            store.close()
    return {"counts": counts, "snapshot": snapshot}


REFUSED = [
    ("DELETE FROM fastface_lake.generations", "DELETE"),
    ("UPDATE fastface_lake.metrics SET value = 0", "UPDATE"),
    ("INSERT INTO fastface_lake.runs SELECT * FROM runs", "INSERT"),
    ("DROP TABLE fastface_lake.metrics", "DROP"),
    ("CREATE TABLE fastface_lake.t AS SELECT 1 AS x", "CREATE"),
    ("CREATE TEMP TABLE t AS SELECT 1 AS x", "CREATE"),
    ("COPY (SELECT 1) TO '{outside}/copied.csv'", "COPY"),
    ("ATTACH '{outside}/other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("SELECT * FROM read_csv('/etc/passwd', sep=':')", "/etc/passwd"),
    ("SELECT * FROM read_text('{outside}/secret.txt')", "secret.txt"),
    ("SET enable_external_access = true", "SET"),
    ("RESET lock_configuration", "SET"),
    ("SELECT 1; DELETE FROM fastface_lake.metrics", "DELETE"),
    ("CALL ducklake_expire_snapshots('fastface_lake', older_than => now())", "CALL"),
]


def test_sql_refuses_every_write_and_outside_file(store_root, tmp_path, capsys):
    (tmp_path / "secret.txt").write_text("secret")
    watcher = Store(str(store_root), read_only=True)  # each query reads the latest snapshot
    before = _state(watcher)
    try:
        for statement, named in REFUSED:
            assert main(["sql", "--root", str(store_root), statement.format(outside=tmp_path)]) == 2, statement
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: refused: ") and named in lines[0], captured.err
            assert "secret" not in captured.out and "root:" not in captured.out
            assert _state(watcher) == before, statement
            assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]  # nothing written outside
    finally:
        watcher.close()


def test_sql_reads_the_store_and_counts_rows_right(store_root, capsys):
    cases = [("SELECT count(*) AS n FROM metrics", "(1 row)", ["n", "10"]),  # retried score counted once
             ("SELECT count(*) AS n FROM metrics_raw", "(1 row)", ["n", "11"]),
             ("SELECT * FROM generations WHERE false", "(0 rows)", None),
             ("SELECT example_id FROM generations ORDER BY 1", "(5 rows, 3 not shown)", None),
             ("SHOW TABLES", "(12 rows, 10 not shown)", None),
             ("EXPLAIN SELECT 1", None, None)]
    for query, last, head in cases:
        assert main(["sql", "--root", str(store_root), "--max-rows", "2", query]) == 0
        out = capsys.readouterr().out.splitlines()
        if last:
            assert out[-1] == last, (query, out)
        if head:
            assert [out[0].strip(), out[2].strip()] == head
    # The store's own Parquet files are readable (external access is off for everything else).
    assert main(["sql", "--root", str(store_root),
                 f"SELECT count(*) AS n FROM read_parquet('{store_root}/tables/main/metrics/*/*.parquet')"]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == "11"


def test_sql_formats_round_trip_the_same_rows(store_root, tmp_path, capsys):
    query = ("SELECT m.example_id, m.metric, m.value, g.seconds, g.status, g.created_at, "
             "CASE WHEN m.metric = 'id' THEN NULL ELSE m.example_id END AS maybe "
             "FROM metrics m JOIN generations g USING (example_id) ORDER BY 1, 2")
    (tmp_path / "query.sql").write_text(query + ";\n")
    for fmt in ("csv", "json", "parquet"):
        assert main(["sql", "--root", str(store_root), "-f", str(tmp_path / "query.sql"), "--format", fmt,
                     "--out", str(tmp_path / f"out.{fmt}")]) == 0
    expected = pq.read_table(tmp_path / "out.parquet")
    assert expected.num_rows == 10 and expected.column_names == ["example_id", "metric", "value", "seconds",
                                                                 "status", "created_at", "maybe"]
    rows = expected.to_pylist()
    assert rows[0]["example_id"] == "e0" and rows[0]["metric"] == "clip" and rows[0]["value"] == 9.0
    from_csv = pcsv.read_csv(tmp_path / "out.csv", convert_options=pcsv.ConvertOptions(
        column_types=expected.schema, null_values=[""], strings_can_be_null=True)).to_pylist()
    from_json = json.loads((tmp_path / "out.json").read_text())

    def same(a, b) -> bool:
        return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)

    for want, got_csv, got_json in zip(rows, from_csv, from_json):
        for key, value in want.items():
            assert same(got_csv[key], value), (key, got_csv[key], value)
            if key == "created_at":
                assert got_json[key] == value.isoformat()
            else:
                assert same(got_json[key], value), (key, got_json[key], value)
    assert len(from_csv) == len(from_json) == 10
    # To stdout: csv and json alike; parquet needs --out (one line).
    assert main(["sql", "--root", str(store_root), "--format", "json", "SELECT 1 AS a UNION ALL SELECT 2"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"a": 1}, {"a": 2}]
    assert main(["sql", "--root", str(store_root), "--format", "parquet", "SELECT 1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["sql", "--root", str(store_root), "-f", str(tmp_path / "query.sql"), "SELECT 1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_sql_imports_no_torch_prefect_or_ray(store_root):
    code = ("import sys, time; t = time.perf_counter(); from fastface.cli import main; "
            f"rc = main(['sql', '--root', {str(store_root)!r}, 'SELECT count(*) FROM generations']); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'diffusers', 'prefect', 'ray', "
            "'transformers', 'PIL'}); print('HEAVY', heavy, rc, round(time.perf_counter() - t, 2))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("HEAVY")]
    assert line and line[0].startswith("HEAVY [] 0 "), out.stdout + out.stderr
    print(f"fastface sql in-process: {line[0].split()[-1]} s")  # a figure, not asserted


def _copy_of(store_root: Path, dest: Path) -> Path:
    shutil.copytree(store_root, dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest


def test_a_copied_and_a_moved_store_open_where_they_are(store_root, tmp_path, capsys):
    copied = _copy_of(store_root, tmp_path / "copy")
    moved = _copy_of(store_root, tmp_path / "before-move")
    moved = Path(shutil.move(str(moved), str(tmp_path / "after-move")))
    for root in (copied, moved):
        assert main(["sql", "--root", str(root), "SELECT count(*) AS n FROM metrics"]) == 0  # read-only open
        assert capsys.readouterr().out.splitlines()[2].strip() == "10"
        store = Store(str(root))  # a writer: records the new location
        uris = store.read("generations").column("image_uri").to_pylist()
        assert all(u.startswith(str(store_root)) for u in uris)  # written at the old place ...
        assert [store.read_bytes(u) for u in uris] == [b"\x89PNG " + bytes([i]) for i in range(5)]  # ... read here
        store.append("metrics", [{"example_id": "new", "metric": "clip", "value": 1.0}], "r")
        assert store.data_files("metrics")[-1].startswith(str(root) + "/tables/")
        store.close()
        assert _state(root)["counts"]["metrics"] == 12
    assert _state(store_root)["counts"]["metrics"] == 11  # the original is untouched by its copies
    # Stock DuckDB (no DATA_PATH) finds the moved store's files: the writer recorded the new data path.
    import duckdb

    from storage.duck import load_extensions

    con = duckdb.connect()
    load_extensions(con, ["ducklake", "sqlite"])
    con.execute(f"ATTACH 'ducklake:sqlite:{moved}/catalog.sqlite' AS lake (READ_ONLY)")
    assert con.execute("SELECT count(*) FROM lake.metrics").fetchone()[0] == 12


def test_restore_brings_back_the_earlier_counts(tmp_path, capsys):
    root = tmp_path / "store"
    _fill(root)
    before = _state(root)
    store = Store(str(root))
    store.query("DELETE FROM fastface_lake.metrics WHERE metric = 'clip'")  # a bad change, through the store
    store.query("DELETE FROM fastface_lake.generations WHERE example_id IN ('e1', 'e2')")
    store.append("generations", [{"example_id": "late", "status": "ok", "image_uri": "u"}], "r")
    store.close()
    changed = _state(root)["counts"]
    assert changed["metrics"] == 5 and changed["generations"] == 4
    assert main(["snapshots", "--root", str(root)]) == 0
    listing = capsys.readouterr().out
    assert f"\n{before['snapshot']:>8} | " in listing and "deleted from metrics" in listing
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("PREFECT_API_URL", raising=False)
        assert main(["restore", "--root", str(root), "--snapshot", str(before["snapshot"])]) == 0
        assert "restored" in capsys.readouterr().out
        after = _state(root)
        assert after["counts"] == before["counts"] and after["snapshot"] > before["snapshot"]
        store = Store(str(root), read_only=True)
        assert store.count("metrics") == 11 and sorted(store.list_ids("generations", "example_id")) == [
            f"e{i}" for i in range(5)]
        store.close()
        # --before a time: the snapshot before it; an unknown snapshot is one line.
        assert main(["restore", "--root", str(root), "--before", "2000-01-01T00:00:00"]) == 2
        assert "no snapshot before" in capsys.readouterr().err
        assert main(["restore", "--root", str(root), "--snapshot", "99999"]) == 2
        assert "has no snapshot 99999" in capsys.readouterr().err
        # A run evaluating into the store holds its run lock: restore waits, then says so.
        from flows.run_lock import file_lock, lock_name

        lock = tmp_path / "prefect-home" / "run-locks" / f"{lock_name('r', str(root))}.lock"
        with file_lock(lock):
            t = time.monotonic()
            assert main(["restore", "--root", str(root), "--snapshot", str(before["snapshot"]), "--wait", "1"]) == 2
            assert "is being evaluated" in capsys.readouterr().err and time.monotonic() - t < 30


def test_an_s3_store_copied_to_another_prefix_and_synced_to_a_folder_opens_there(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from storage_support import create_bucket, moto_endpoint, s3_env

    from storage.catalog_spec import CATALOG_ENV

    endpoint = moto_endpoint()
    bucket = "fastface-safety"
    create_bucket(endpoint, bucket)
    s3_env(monkeypatch, endpoint)
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{tmp_path / 'a.sqlite'}")
    root = f"s3://{bucket}/first/data"
    store = Store(root)
    uri = store.write_image("r", "e0", b"\x89PNG s3")
    store.append("generations", [{"example_id": "e0", "status": "ok", "image_uri": uri}], "r")
    store.append("metrics", [{"example_id": "e0", "metric": "clip", "value": 0.5}], "r")
    fs = store.fs
    store.close()
    # another prefix (objects and the catalog file copied), and a local folder (`aws s3 sync` + the catalog)
    fs.copy(f"{bucket}/first/data", f"{bucket}/second/data", recursive=True)
    shutil.copy(tmp_path / "a.sqlite", tmp_path / "b.sqlite")
    local = tmp_path / "synced"
    fs.get(f"{bucket}/first/data/", str(local), recursive=True)
    shutil.copy(tmp_path / "a.sqlite", local / "catalog.sqlite")
    for where, catalog in ((f"s3://{bucket}/second/data", f"sqlite:{tmp_path / 'b.sqlite'}"), (str(local), None)):
        if catalog:
            monkeypatch.setenv(CATALOG_ENV, catalog)
        else:
            monkeypatch.delenv(CATALOG_ENV)
        assert main(["sql", "--root", where, "SELECT count(*) AS n FROM metrics"]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.splitlines()[2].strip() == "1"
        assert main(["sql", "--root", where, "SELECT * FROM read_csv('/etc/passwd')"]) == 2
        assert "refused" in capsys.readouterr().err
        moved = Store(where)
        image = moved.read("generations").column("image_uri")[0].as_py()
        assert image == uri and moved.read_bytes(image) == b"\x89PNG s3"  # the old address, read here
        moved.append("metrics", [{"example_id": "e1", "metric": "clip", "value": 0.7}], "r")
        assert moved.data_files("metrics")[-1].startswith(moved.data_path) and moved.count("metrics") == 2
        moved.close()
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{tmp_path / 'a.sqlite'}")
    assert Store(root, read_only=True).count("metrics") == 1  # the original is untouched
