"""Store, Catalog and planning on a local folder, including a writer killed mid-write."""

import os
import pickle
import sys

import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import kill_writer_at  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.plan import Sweep, plan_missing_examples, plan_missing_generations, plan_missing_metrics  # noqa: E402
from storage.schemas import SchemaError  # noqa: E402
from storage.store import Store  # noqa: E402


def _metric_rows(n, metric="clip", offset=0):
    return [{"example_id": f"e{i}", "metric": metric, "value": float(i + offset)} for i in range(n)]


def test_append_read_roundtrip_and_layout(tmp_path):
    store = Store(str(tmp_path))
    uri = store.append("metrics", _metric_rows(3), run_id="r1")
    assert uri.startswith(str(tmp_path / "metrics" / "run_id=r1" / "part-")) and uri.endswith(".parquet")
    store.append("metrics", _metric_rows(2, offset=10), run_id="r2")
    assert store.run_ids("metrics") == ["r1", "r2"]
    everything = store.read("metrics")
    assert everything.num_rows == 5 and everything.schema.names[0] == "example_id"
    r2 = store.read("metrics", run_id="r2")
    assert r2.column("value").to_pylist() == [10.0, 11.0]
    assert store.read("metrics", filters=[("value", ">", 1.5)]).num_rows == 3
    assert store.list_ids("metrics", "example_id") == {"e0", "e1", "e2"}
    assert store.read("generations").num_rows == 0  # no files yet → empty, with the schema
    assert store.append("metrics", [], run_id="r1") is None
    with pytest.raises(ValueError, match="run_id 'r/1' is not a valid name"):
        store.append("metrics", _metric_rows(1), run_id="r/1")
    with pytest.raises(ValueError, match="run_id other than 'r1'"):
        store.append("metrics", [dict(_metric_rows(1)[0], run_id="r2")], run_id="r1")
    # no temp files left behind by successful writes
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    # a Store travels to other processes (Ray) as its root
    assert pickle.loads(pickle.dumps(store)).read("metrics").equals(everything)


def test_bytes_and_images_atomic(tmp_path):
    store = Store(str(tmp_path))
    uri = store.write_image("r1", "abc123", b"\x89PNG fake")
    assert uri == str(tmp_path / "images" / "r1" / "abc123.png") == store.image_uri("r1", "abc123")
    assert store.exists("images/r1/abc123.png") and store.exists(uri)
    assert store.read_bytes(uri) == b"\x89PNG fake"
    assert store.image_ids("r1") == {"abc123"}
    assert not store.exists("images/r1/nothing.png")
    with pytest.raises(ValueError, match="invalid storage key"):
        store.write_bytes("images/../../escape", b"x")
    with pytest.raises(ValueError, match="not under this store's root"):
        store.read_bytes("/etc/passwd")


def test_latest_dedups_retried_rows_and_views_agree(tmp_path):
    store = Store(str(tmp_path))
    store.append("generations", [{"example_id": "e1", "status": "failed", "error": "OOM"},
                                 {"example_id": "e2", "status": "ok", "image_uri": "u2"}], run_id="r1")
    store.append("generations", [{"example_id": "e1", "status": "ok", "image_uri": "u1"}], run_id="r1")  # retry
    store.append("generations", [{"example_id": "e2", "status": "ok", "image_uri": "u2"}], run_id="r1")  # dup
    latest = {r["example_id"]: r["status"] for r in store.latest("generations").to_pylist()}
    assert latest == {"e1": "ok", "e2": "ok"}
    with Catalog(store) as cat:
        assert cat.query("SELECT count(*) AS n FROM generations_raw").column("n")[0].as_py() == 4
        rows = cat.rows("SELECT example_id, status FROM generations ORDER BY example_id")
        assert rows == [{"example_id": "e1", "status": "ok"}, {"example_id": "e2", "status": "ok"}]
        # tables with no files are empty views with the schema's columns
        described = cat.query("DESCRIBE metrics")
        assert described.column("column_name").to_pylist() == ["example_id", "run_id", "metric", "value", "detail",
                                                               "error", "created_at"]
        assert cat.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 0
        # a table written after the catalog opened appears on the next query
        store.append("metrics", _metric_rows(4), run_id="r1")
        assert cat.query("SELECT sum(value) AS s FROM metrics").column("s")[0].as_py() == 6.0
        text = cat.sql_table("SELECT metric, count(*) AS n, avg(value) AS mean FROM metrics GROUP BY metric")
        assert text.splitlines()[0].split() == ["metric", "|", "n", "|", "mean"]
        assert "clip" in text and "1.5" in text and text.endswith("(1 row)")


def test_catalog_database_file(tmp_path):
    store = Store(str(tmp_path / "data"))
    store.append("metrics", _metric_rows(2), run_id="r1")
    db = str(tmp_path / "catalog.duckdb")
    with Catalog(store, db) as cat:
        cat.query("CREATE TABLE saved AS SELECT * FROM metrics")
    with Catalog(store, db) as cat:  # views are re-created; user tables persist
        assert cat.query("SELECT count(*) AS n FROM saved").column("n")[0].as_py() == 2
        assert cat.query("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 2


def test_killed_writer_leaves_nothing_visible_locally(tmp_path):
    root = str(tmp_path / "store")
    store = Store(root)
    store.append("metrics", _metric_rows(3), run_id="r1")
    before = store.read("metrics")
    # killed with a half-written Parquet file on disk (first row group, no footer)
    kill_writer_at(root, "mid-write", tmp_path, rows=100_000)
    temps = list((tmp_path / "store" / "metrics" / "run_id=r1").glob(".tmp-*"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the partial file really is there
    # killed after the file is complete but before the rename
    kill_writer_at(root, "before-commit", tmp_path, rows=100_000)
    assert len(list((tmp_path / "store" / "metrics" / "run_id=r1").glob(".tmp-*"))) == 2
    after = store.read("metrics")
    assert after.equals(before)
    with Catalog(store) as cat:
        assert cat.query("SELECT count(*) AS n, sum(value) AS s FROM metrics_raw").to_pylist() == [{"n": 3, "s": 3.0}]
    assert store.remove_stale_temp_files(older_than_s=0) == 2
    # a normal write still works afterwards
    store.append("metrics", _metric_rows(1, metric="ae"), run_id="r1")
    assert store.read("metrics").num_rows == 4


# -- planning ------------------------------------------------------------------------


def _sweep(run_id="sweep1", **kw):
    args = dict(
        run_id=run_id,
        identities=[{"identity_id": f"id{i}", "content_hash": f"{i:064x}"} for i in range(3)],
        prompts=[{"prompt_id": "p0", "text": "a person reading", "kind": "realistic"},
                 {"prompt_id": "p1", "text": "watercolor; person on a beach", "kind": "stylistic"}],
        models=["hyper", "lcm"],
        presets={"baseline": {}, "ff-am1": {"dcg": {"alpha": [1, 3, 3, 1]}, "am": "am1"}},
        ip_adapter_scales=[0.5, 0.8],
        lora_scales=[1.0],
        steps=4,
        width=512,
        height=512,
        code_version="test-1",
    )
    args.update(kw)
    return Sweep(**args)


def test_sweep_product_ids_and_paired_seeds():
    rows = _sweep().examples()
    assert len(rows) == 3 * 2 * 2 * 2 * 2
    assert len({r["example_id"] for r in rows}) == len(rows)
    assert [r["model"] for r in rows[:24]] == ["hyper"] * 24  # grouped by model
    # the seed depends only on (run seed, identity, prompt): paired across configs
    by_pair = {}
    for r in rows:
        by_pair.setdefault((r["identity_id"], r["prompt_id"]), set()).add(r["seed"])
    assert all(len(s) == 1 for s in by_pair.values()) and len({min(s) for s in by_pair.values()}) == 6
    # the same sweep planned again (another process, another day) gives the same ids
    assert [r["example_id"] for r in _sweep().examples()] == [r["example_id"] for r in rows]
    # a second run seed doubles the examples with new seeds
    assert len(_sweep(run_seeds=[0, 1]).examples()) == 2 * len(rows)
    with pytest.raises(ValueError, match="Sweep.steps has no step count for model\\(s\\) \\['lcm'\\]"):
        _sweep(steps={"hyper": 4})
    with pytest.raises(ValueError, match=r"Sweep.prompts \(prompt_id\) has duplicates"):
        _sweep(prompts=[{"prompt_id": "p0", "text": "a"}, {"prompt_id": "p0", "text": "b"}])


def test_plan_resume_generations_and_metrics(tmp_path):
    store = Store(str(tmp_path))
    sweep = _sweep()
    examples = sweep.examples()
    assert len(plan_missing_examples(store, examples)) == len(examples)
    store.append("examples", plan_missing_examples(store, examples), run_id=sweep.run_id)
    assert plan_missing_examples(store, examples) == []  # re-planning appends nothing

    todo = plan_missing_generations(store, examples)
    assert todo == examples
    first, rest = todo[:10], todo[10:]
    store.append("generations", [{"example_id": r["example_id"], "status": "ok", "image_uri": "x"} for r in first],
                 run_id=sweep.run_id)
    store.append("generations", [{"example_id": rest[0]["example_id"], "status": "failed", "error": "CUDA OOM"}],
                 run_id=sweep.run_id)
    assert plan_missing_generations(store, examples) == rest  # failures are retried
    # a worker that died after writing its rows is retried: rows land twice
    store.append("generations", [{"example_id": r["example_id"], "status": "ok", "image_uri": "x"} for r in rest],
                 run_id=sweep.run_id)
    store.append("generations", [{"example_id": r["example_id"], "status": "ok", "image_uri": "x"} for r in rest[:5]],
                 run_id=sweep.run_id)
    assert plan_missing_generations(store, examples) == []

    with Catalog(store) as cat:
        n = cat.query("SELECT count(*) AS n, count(DISTINCT example_id) AS d FROM generations").to_pylist()
        assert n == [{"n": len(examples), "d": len(examples)}]
        joined = cat.query(
            "SELECT e.model, count(*) AS n FROM examples e JOIN generations g USING (run_id, example_id) "
            "WHERE g.status = 'ok' GROUP BY e.model ORDER BY e.model").to_pylist()
        assert joined == [{"model": "hyper", "n": 24}, {"model": "lcm", "n": 24}]

    metrics = ["clip", "id"]
    pairs = plan_missing_metrics(store, examples, metrics)
    assert len(pairs) == 2 * len(examples)
    scored = pairs[:30]
    store.append("metrics", [{"example_id": e, "metric": m, "value": 0.5} for e, m in scored[:-1]], run_id=sweep.run_id)
    store.append("metrics", [{"example_id": scored[-1][0], "metric": scored[-1][1], "error": "boom"}],
                 run_id=sweep.run_id)
    assert plan_missing_metrics(store, examples, metrics) == pairs[29:]  # the errored one is planned again
    store.append("metrics", [{"example_id": e, "metric": m, "value": None, "detail": {"no_face": True}}
                             for e, m in pairs[29:]], run_id=sweep.run_id)
    assert plan_missing_metrics(store, examples, metrics) == []
    assert plan_missing_metrics(store, examples, metrics + ["ae"]) == [(r["example_id"], "ae") for r in examples]


def test_plan_metrics_waits_for_generation_and_images(tmp_path):
    store = Store(str(tmp_path))
    examples = _sweep(models=["hyper"], ip_adapter_scales=[0.8]).examples()
    assert plan_missing_metrics(store, examples, ["clip"]) == []  # nothing generated yet
    e0 = examples[0]["example_id"]
    store.append("generations", [{"example_id": e0, "status": "ok", "image_uri": "x"}], run_id="sweep1")
    assert plan_missing_metrics(store, examples, ["clip"]) == [(e0, "clip")]
    # with check_images an ok row without its image is planned again
    assert [r["example_id"] for r in plan_missing_generations(store, examples, check_images=True)][0] == e0
    store.write_image("sweep1", e0, b"png")
    assert e0 not in {r["example_id"] for r in plan_missing_generations(store, examples, check_images=True)}
    with pytest.raises(ValueError, match="examples of one run"):
        plan_missing_metrics(store, examples + [dict(examples[0], run_id="other")], ["clip"])


def test_append_accepts_arrow_tables_and_checks_them(tmp_path):
    store = Store(str(tmp_path))
    t = pa.table({"example_id": ["a", "b"], "metric": ["clip", "clip"], "value": pa.array([1, 2], pa.int32())})
    store.append("metrics", t, run_id="r1")
    assert store.read("metrics").column("value").type == pa.float64()
    with pytest.raises(SchemaError, match="required column 'metric'"):
        store.append("metrics", pa.table({"example_id": ["a"]}), run_id="r1")


def test_any_fsspec_url_works(tmp_path):
    store = Store(f"memory://fastface-{tmp_path.name}/root")
    store.append("metrics", _metric_rows(3), run_id="r1")
    assert store.read("metrics").column("value").to_pylist() == [0.0, 1.0, 2.0]
    with Catalog(store) as cat:
        assert cat.rows("SELECT sum(value) AS s FROM metrics") == [{"s": 3.0}]


def test_example_id_rejects_a_boolean_seed():
    from storage.ids import example_id

    with pytest.raises(ValueError, match="seed must be an integer"):
        example_id(identity_hash="a", prompt="p", model="m", preset="b", preset_config={}, ip_adapter_scale=1,
                   lora_scale=1, seed=True, steps=4, width=8, height=8, code_version="v")
