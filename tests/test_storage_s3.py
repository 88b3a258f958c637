"""The same Store and Catalog with data on S3 (moto's server on localhost, DuckDB's httpfs), catalog in SQLite."""

import os
import sys
import time
import uuid
from datetime import timedelta

import pyarrow as pa
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import FAKE_AWS_ENV, create_bucket, kill_writer_at, moto_endpoint, s3_env  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.duck import StorageError  # noqa: E402
from storage.plan import Sweep, plan_missing_generations  # noqa: E402
from storage.catalog_spec import CATALOG_ENV  # noqa: E402
from storage.store import Store  # noqa: E402

BUCKET = "fastface-test"


@pytest.fixture(scope="session")
def endpoint():
    url = moto_endpoint()
    create_bucket(url, BUCKET)
    return url


@pytest.fixture
def s3_root(endpoint, monkeypatch, tmp_path):
    s3_env(monkeypatch, endpoint)
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{tmp_path / 'catalog.sqlite'}")
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/data"


def _rows(n, offset=0):
    return [{"example_id": f"e{i}", "metric": "clip" if i % 2 else "id", "value": float(i + offset),
             "detail": {"i": i}} for i in range(n)]


def test_s3_roundtrip_equals_local(s3_root, endpoint, tmp_path, monkeypatch):
    s3 = Store(s3_root)
    monkeypatch.delenv(CATALOG_ENV)
    local = Store(str(tmp_path / "local"))
    assert s3.is_s3 and s3.fs.endpoint_url == endpoint and not s3.storage_options  # endpoint came from the env
    assert s3.data_path == s3_root + "/tables/"
    for store in (s3, local):
        store.append("metrics", _rows(6), run_id="r1")
        store.append("metrics", _rows(4, offset=100), run_id="r2")
    got, want = s3.read("metrics"), local.read("metrics")
    assert got.drop_columns(["created_at"]).equals(want.drop_columns(["created_at"]))
    assert got.schema.equals(want.schema)
    assert s3.read("metrics", run_id="r2").column("value").to_pylist() == [100.0, 101.0, 102.0, 103.0]
    assert s3.run_ids("metrics") == ["r1", "r2"]
    # each append is one Parquet file on S3 (through httpfs), in its run's partition
    big = pa.table({"example_id": [f"x{i}" for i in range(5000)], "metric": ["ae"] * 5000,
                    "value": pa.array(range(5000), pa.float64())})
    assert s3.append("metrics", big, run_id="r3") == 5000
    files = s3.data_files("metrics")
    assert len(files) == 3 and all(f.startswith(s3_root + "/tables/main/metrics/run_id=r") for f in files)
    r3 = [f for f in files if "/run_id=r3/" in f]
    assert len(r3) == 1 and s3.fs.exists(r3[0])
    # images
    img = s3.write_image("r1", "e0", b"\x89PNG...")
    assert img == f"{s3_root}/images/r1/e0.png" and s3.read_bytes(img) == b"\x89PNG..." and s3.exists(img)
    assert s3.image_ids("r1") == {"e0"}


def test_catalog_views_over_s3(s3_root):
    store = Store(s3_root)
    store.append("metrics", _rows(6), run_id="r1")
    store.append("metrics", _rows(6, offset=10), run_id="r2")
    store.append("metrics", [{"example_id": "e0", "metric": "id", "value": 50.0}], run_id="r1")  # retry of e0/id
    store.compact()  # rows now in Parquet on S3
    with Catalog(store) as cat:
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
        # rows appended after the catalog opened show up in the next query
        store.append("generations", [{"example_id": "e1", "status": "ok", "image_uri": "u", "seconds": 1.5}],
                     run_id="r1")
        assert cat.query("SELECT sum(seconds) AS s FROM generations").column("s")[0].as_py() == 1.5
    assert all(f.startswith(s3_root) for f in store.data_files("metrics"))


def test_killed_writer_leaves_nothing_visible_on_s3(s3_root, endpoint, tmp_path):
    store = Store(s3_root)
    store.append("metrics", _rows(3), run_id="r1")
    before = store.read("metrics")
    env = dict(FAKE_AWS_ENV, FASTFACE_S3_ENDPOINT_URL=endpoint, **{CATALOG_ENV: os.environ[CATALOG_ENV]})
    kill_writer_at(s3_root, "in-transaction", tmp_path, rows=100_000, env=env)
    assert store.fs.find(f"{store.root}/tables")  # its Parquet file was uploaded, never committed
    assert store.read("metrics").equals(before)
    with Catalog(store) as cat:
        assert cat.query("SELECT count(*) AS n, sum(value) AS s FROM metrics_raw").to_pylist() == [{"n": 3, "s": 3.0}]
    store.compact(cleanup_older_than=timedelta(0))
    left = {f"s3://{p}" for p in store.fs.find(f"{store.root}/tables")}
    assert left == set(store.data_files("metrics")) | set(store.data_files("fastface_store"))
    assert store.append("metrics", _rows(2, offset=7), run_id="r1") == 2 and store.count("metrics") == 5


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


def test_image_writes_are_one_put_object(s3_root, monkeypatch):
    store = Store(s3_root)
    calls = []
    real = store.fs.call_s3
    monkeypatch.setattr(store.fs, "call_s3", lambda method, *a, **kw: (calls.append(method), real(method, *a, **kw))[1])
    store.write_image("r1", "e0", os.urandom(1 << 20))
    assert calls == ["put_object"]  # never create_multipart_upload / upload_part


def test_s3_misconfiguration_fails_fast_in_one_line(endpoint, monkeypatch, tmp_path):
    root = f"s3://{BUCKET}/misconfigured"
    s3_env(monkeypatch, endpoint)
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{tmp_path / 'c.sqlite'}")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=r"^no S3 credentials for s3://fastface-test/misconfigured: Partial "
                                           r"credentials found in env, missing: AWS_SECRET_ACCESS_KEY; set ") as info:
        Store(root)
    assert "\n" not in str(info.value)
    s3_env(monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach the S3 endpoint http://127.0.0.1:9 "
                                           r"\(from \$FASTFACE_S3_ENDPOINT_URL\)") as info:
        Store(root)
    assert time.monotonic() - started < 10 and "\n" not in str(info.value)
    s3_env(monkeypatch, endpoint)
    monkeypatch.delenv(CATALOG_ENV)
    with pytest.raises(StorageError, match=f"set {CATALOG_ENV}=postgres:"):
        Store(root)
