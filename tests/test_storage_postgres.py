"""A PostgreSQL catalog (a real server on 127.0.0.1) with data on S3 (moto): the cluster setup.

The end-to-end test runs ``fastface evaluate --config configs/ci.yaml`` in a subprocess with the
root on S3 and ``FASTFACE_CATALOG=postgres:...``, counts the rows, and runs it again: no new rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import FAKE_AWS_ENV, create_bucket, moto_endpoint, postgres_server  # noqa: E402

from storage.catalog import Catalog  # noqa: E402
from storage.duck import StorageError  # noqa: E402
from storage.catalog_spec import CATALOG_ENV  # noqa: E402
from storage.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fastface-pg"


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as new_database:
        yield new_database


@pytest.fixture(scope="module")
def endpoint():
    url = moto_endpoint()
    create_bucket(url, BUCKET)
    return url


def test_postgres_catalog_two_writers_and_a_reader(postgres, tmp_path, monkeypatch):
    monkeypatch.delenv(CATALOG_ENV, raising=False)
    postgres = postgres("fastface")
    root = str(tmp_path / "data")
    a, b = Store(root, catalog=f"postgres:{postgres}"), Store(root, catalog=f"postgres:{postgres}")
    assert not (tmp_path / "data" / "catalog.sqlite").exists()
    for i in range(5):
        a.append("generations", [{"example_id": f"a{i}", "status": "ok"}], run_id="r1")
        b.append("generations", [{"example_id": f"b{i}", "status": "ok"}], run_id="r1")
    b.append("generations", [{"example_id": "a0", "status": "failed", "error": "retry"}], run_id="r1")
    with Catalog(Store(root, catalog=f"postgres:{postgres}")) as cat:
        assert cat.rows("SELECT count(*) AS n FROM generations_raw") == [{"n": 11}]
        assert cat.rows("SELECT status FROM generations WHERE example_id = 'a0'") == [{"status": "failed"}]
    a.compact()
    assert a.count("generations") == 11 and len(a.data_files("generations")) == 1
    # one catalog database belongs to one root: another root is refused, naming both
    with pytest.raises(StorageError, match="belongs to the store .*data, not .*other"):
        Store(str(tmp_path / "other"), catalog=f"postgres:{postgres}")
    with pytest.raises(StorageError, match="cannot open the table catalog postgres:dbname=nope"):
        Store(str(tmp_path / "third"), catalog="postgres:" + postgres.replace("dbname=fastface", "dbname=nope"))


def _evaluate(env: dict, root: str, cache: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastface.cli", "evaluate", "--config", str(REPO / "configs" / "ci.yaml"),
               "--root", root, "--set", f"execution.cache_dir={cache}", *extra]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def _fastface(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastface.cli", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_evaluate_ci_config_on_postgres_catalog_and_s3(postgres, endpoint, prefect_server, tmp_path, fastface_cache,
                                                       monkeypatch):
    postgres = postgres("fastface_ci")
    root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/ci"
    cache = str(fastface_cache)
    # Credentials only in a shared-credentials file selected by AWS_PROFILE (the one credential rule,
    # storage/credentials.py): the check, the flow, its Ray actors, sql and report all find them there.
    credentials = tmp_path / "aws-credentials"
    secret = f"fastface-secret-{uuid.uuid4().hex}"  # moto accepts any keys; this one is findable
    credentials.write_text(f"[fastface-ci]\naws_access_key_id = testing\naws_secret_access_key = {secret}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "RAY_ADDRESS") and not k.startswith("AWS_")}
    env.update(AWS_PROFILE="fastface-ci", AWS_SHARED_CREDENTIALS_FILE=str(credentials),
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"), AWS_EC2_METADATA_DISABLED="true",
               AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=str(REPO), FASTFACE_S3_ENDPOINT_URL=endpoint,
               PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]),
               # its own local Ray (not one another process left in /tmp/ray), patient on 2 busy cores
               RAY_ADDRESS="local", RAY_raylet_start_wait_time_s="300",
               **{CATALOG_ENV: f"postgres:{postgres}"})
    check = _evaluate(env, root, cache, "--check")
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    first = _evaluate(env, root, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for key in FAKE_AWS_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith("AWS_") or key in ("FASTFACE_S3_ENDPOINT_URL", CATALOG_ENV):
            monkeypatch.setenv(key, value)
    store = Store(root)

    def counts():
        with Catalog(store) as cat:
            return {t: cat.rows(f"SELECT count(*) AS n FROM {t}_raw")[0]["n"]
                    for t in ("runs", "identities", "prompts", "examples", "generations", "metrics")}

    before = counts()
    assert before == {"runs": 1, "identities": 2, "prompts": 2, "examples": 8, "generations": 8, "metrics": 32}
    generations = store.latest("generations").to_pylist()
    assert all(g["status"] == "ok" and g["image_uri"].startswith(root + "/images/") for g in generations)
    assert store.read_bytes(generations[0]["image_uri"])[:4] == b"\x89PNG"
    assert all(f.startswith(root + "/tables/") for f in store.data_files("metrics"))
    second = _evaluate(env, root, cache)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert counts() == before
    sql = _fastface(env, "sql", "--root", root, "SELECT count(*) AS n FROM generations")
    assert sql.returncode == 0 and "8" in sql.stdout.split(), sql.stdout + sql.stderr
    report = _fastface(env, "report", "--root", root)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    assert store.exists("reports/ci/report.html")
    # the secret is in no stored row, no report file and nothing the commands printed
    printed = "".join(p.stdout + p.stderr for p in (check, first, second, sql, report))
    assert secret not in printed
    with Catalog(store) as cat:
        for table in ("runs", "identities", "prompts", "examples", "generations", "metrics"):
            assert not cat.rows(f"SELECT 1 FROM {table}_raw t WHERE CAST(t AS VARCHAR) LIKE ?", [f"%{secret}%"])
    reports = store.fs.find(f"{store.root}/reports")
    assert reports and all(secret.encode() not in store.fs.cat_file(path) for path in reports)
