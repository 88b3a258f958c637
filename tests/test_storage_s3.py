"""The same Store and Catalog on real S3 wire protocol: moto's server on localhost, no httpfs."""

import os
import sys
import uuid

import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import FAKE_AWS_ENV, create_bucket, kill_writer_at, moto_endpoint, s3_env  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.plan import Sweep, plan_missing_generations  # noqa: E402
from storage.store import Store  # noqa: E402

BUCKET = "fastface-test"


@pytest.fixture(scope="session")
def endpoint():
    url = moto_endpoint()
    create_bucket(url, BUCKET)
    return url


@pytest.fixture
def s3_root(endpoint, monkeypatch):
    s3_env(monkeypatch, endpoint)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/data"


def _rows(n, offset=0):
    return [{"example_id": f"e{i}", "metric": "clip" if i % 2 else "id", "value": float(i + offset),
             "detail": {"i": i}} for i in range(n)]


def test_s3_roundtrip_equals_local(s3_root, endpoint, tmp_path):
    s3, local = Store(s3_root), Store(str(tmp_path))
    assert s3.is_s3 and s3.fs.endpoint_url == endpoint and not s3.storage_options  # endpoint came from the env
    for store in (s3, local):
        store.append("metrics", _rows(6), run_id="r1")
        store.append("metrics", _rows(4, offset=100), run_id="r2")
    got, want = s3.read("metrics"), local.read("metrics")
    assert got.drop_columns(["created_at"]).equals(want.drop_columns(["created_at"]))
    assert got.schema.equals(want.schema)
    assert s3.read("metrics", run_id="r2").column("value").to_pylist() == [100.0, 101.0, 102.0, 103.0]
    assert s3.run_ids("metrics") == ["r1", "r2"]
    # exactly what was appended comes back, created_at included
    t = pa.table({"example_id": ["x", "y"], "metric": ["ae", "ae"], "value": [6.1, 5.9]})
    uri = s3.append("metrics", t, run_id="r3")
    assert uri.startswith(s3_root + "/metrics/run_id=r3/part-")
    back = s3.read("metrics", run_id="r3")
    assert back.select(["example_id", "metric", "value"]).equals(t.cast(back.select([0, 2, 3]).schema))
    # images
    img = s3.write_image("r1", "e0", b"\x89PNG...")
    assert img == f"{s3_root}/images/r1/e0.png" and s3.read_bytes(img) == b"\x89PNG..." and s3.exists(img)
    assert s3.image_ids("r1") == {"e0"}


def test_duckdb_over_s3_through_fsspec(s3_root):
    store = Store(s3_root)
    store.append("metrics", _rows(6), run_id="r1")
    store.append("metrics", _rows(6, offset=10), run_id="r2")
    store.append("metrics", [{"example_id": "e0", "metric": "id", "value": 50.0}], run_id="r1")  # retry of e0/id
    with Catalog(store) as cat:
        assert "s3" in cat.con.list_filesystems()
        loaded = cat.query("SELECT extension_name FROM duckdb_extensions() WHERE loaded AND extension_name = 'httpfs'")
        assert loaded.num_rows == 0  # no httpfs: everything went through s3fs
        got = cat.rows("SELECT run_id, metric, count(*) AS n, sum(value) AS s FROM metrics "
                       "GROUP BY ALL ORDER BY run_id, metric")
        assert got == [
            {"run_id": "r1", "metric": "clip", "n": 3, "s": 1.0 + 3 + 5},
            {"run_id": "r1", "metric": "id", "n": 3, "s": 50.0 + 2 + 4},  # the retry replaced e0's 0.0
            {"run_id": "r2", "metric": "clip", "n": 3, "s": 11.0 + 13 + 15},
            {"run_id": "r2", "metric": "id", "n": 3, "s": 10.0 + 12 + 14},
        ]
        assert cat.query("SELECT count(*) AS n FROM metrics_raw").column("n")[0].as_py() == 13
        assert cat.query("SELECT max(CAST(json_extract(detail, '$.i') AS INT)) AS m FROM metrics").to_pylist() == [
            {"m": 5}]
        # generations has no files yet: an empty view, then filled on a later query
        assert cat.query("SELECT count(*) AS n FROM generations").column("n")[0].as_py() == 0
        store.append("generations", [{"example_id": "e1", "status": "ok", "image_uri": "u", "seconds": 1.5}],
                     run_id="r1")
        assert cat.query("SELECT sum(seconds) AS s FROM generations").column("s")[0].as_py() == 1.5


def test_s3_readers_skip_hidden_and_foreign_objects(s3_root):
    store = Store(s3_root)
    store.append("metrics", _rows(2), run_id="r1")
    base = store.partition_dir("metrics", "r1")
    # what other tools (or an interrupted copy) leave behind: not part-*.parquet / hidden
    store.fs.pipe_file(f"{base}/.tmp-abc-part-x.parquet", b"PAR1 partial")
    store.fs.pipe_file(f"{base}/_SUCCESS", b"")
    store.fs.pipe_file(f"{store.table_dir('metrics')}/_temporary/0/part-y.parquet", b"PAR1 partial")
    assert len(store.files("metrics")) == 1
    assert store.read("metrics").num_rows == 2
    with Catalog(store) as cat:
        assert cat.query("SELECT count(*) AS n FROM metrics_raw").column("n")[0].as_py() == 2


def test_killed_writer_leaves_nothing_visible_on_s3(s3_root, endpoint, tmp_path):
    store = Store(s3_root)
    store.append("metrics", _rows(3), run_id="r1")
    before = store.read("metrics")
    env = dict(FAKE_AWS_ENV, FASTFACE_S3_ENDPOINT_URL=endpoint)
    for point in ("mid-write", "before-commit"):
        kill_writer_at(s3_root, point, tmp_path, rows=100_000, env=env)
    assert store.read("metrics").equals(before)
    with Catalog(store) as cat:
        assert cat.query("SELECT count(*) AS n, sum(value) AS s FROM metrics_raw").to_pylist() == [{"n": 3, "s": 3.0}]
    # no object at all was created by the killed writers (a single PUT never started)
    assert [p.rsplit("/", 1)[-1].startswith("part-") for p in store.fs.find(store.table_dir("metrics"))] == [True]


def test_plan_on_s3(s3_root):
    store = Store(s3_root)
    sweep = Sweep(run_id="s1", identities=[{"identity_id": "a", "content_hash": "1" * 64}],
                  prompts=[{"prompt_id": f"p{i}", "text": f"prompt {i}"} for i in range(4)],
                  models=["hyper"], presets={"baseline": {}}, ip_adapter_scales=[0.8], code_version="t")
    examples = sweep.examples()
    done = examples[:3]
    for r in done:
        store.write_image("s1", r["example_id"], b"png")
    store.append("generations", [{"example_id": r["example_id"], "status": "ok",
                                  "image_uri": store.image_uri("s1", r["example_id"])} for r in done], run_id="s1")
    assert plan_missing_generations(store, examples, check_images=True) == examples[3:]


def test_s3_writes_are_one_put_object(s3_root, monkeypatch):
    store = Store(s3_root)
    calls = []
    real = store.fs.call_s3
    monkeypatch.setattr(store.fs, "call_s3", lambda method, *a, **kw: (calls.append(method), real(method, *a, **kw))[1])
    big = pa.table({"example_id": [f"e{i}" for i in range(200_000)], "metric": ["id"] * 200_000,
                    "value": pa.array(range(200_000), pa.float64())})
    store.append("metrics", big, run_id="r1")
    store.write_image("r1", "e0", os.urandom(1 << 20))
    assert calls == ["put_object", "put_object"]  # never create_multipart_upload / upload_part
    assert store.read("metrics").num_rows == 200_000
