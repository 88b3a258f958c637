"""Faults of the services under a store, injected at the storage layer of a short run.

A "run" here is what the generation stage does, in small: plan the missing examples, write each
image, append each batch's rows. Mid-run the S3 endpoint (moto) stops and comes back, the
PostgreSQL catalog restarts, or the local disk fills (a small tmpfs): the run waits and resumes,
or fails with one line; either way, after the resume every planned row is stored exactly once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from storage_support import FAKE_AWS_ENV, create_bucket, postgres_server  # noqa: E402

from storage.duck import StorageError  # noqa: E402
from storage.plan import plan_missing_generations  # noqa: E402
from storage.catalog_spec import CATALOG_ENV  # noqa: E402
from storage.faults import RETRY_ENV  # noqa: E402
from storage.store import Store  # noqa: E402

PLANNED = [{"run_id": "r", "example_id": f"e{i:03d}"} for i in range(16)]


def short_run(store: Store, after_batch=lambda i: None, image_bytes: int = 16) -> int:
    """Plan what is missing, then write images and append rows 4 at a time; returns batches written."""
    missing = plan_missing_generations(store, PLANNED)
    batches = 0
    for start in range(0, len(missing), 4):
        rows = []
        for example in missing[start:start + 4]:
            data = b"\x89PNG" + example["example_id"].encode() + b"\0" * image_bytes
            uri = store.write_image("r", example["example_id"], data)
            rows.append({"example_id": example["example_id"], "status": "ok", "image_uri": uri})
        store.append("generations", rows, "r")
        batches += 1
        after_batch(batches)
    return batches


def assert_exactly_once(store: Store) -> None:
    counts = store.query("SELECT count(*) AS n, count(DISTINCT example_id) AS d FROM fastface_lake.generations "
                         "WHERE run_id = 'r'").to_pylist()[0]
    assert counts == {"n": len(PLANNED), "d": len(PLANNED)}
    assert store.image_ids("r") == {e["example_id"] for e in PLANNED}
    assert plan_missing_generations(store, PLANNED) == []


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text.strip(), text
    return text


# -- S3 (moto) stopped and restarted mid-run --------------------------------------------------------

class Moto:
    def __init__(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def moto(monkeypatch, tmp_path):
    server = Moto()
    create_bucket(server.endpoint, "fastface-faults")
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv(CATALOG_ENV, f"sqlite:{tmp_path / 'catalog.sqlite'}")
    yield server
    server.stop()


def test_s3_gone_mid_run_waits_then_resumes(moto, monkeypatch):
    store = Store("s3://fastface-faults/waits")
    monkeypatch.setenv(RETRY_ENV, "60")

    def outage(batch: int) -> None:
        if batch == 2:
            moto.stop()
            threading.Timer(2.0, moto.start).start()  # back after 2 s, while the run waits

    t = time.monotonic()
    assert short_run(store, outage) == 4
    assert time.monotonic() - t >= 2.0  # it did wait for the endpoint
    assert_exactly_once(store)


def test_s3_gone_for_longer_fails_in_one_line_and_loses_nothing(moto, monkeypatch):
    store = Store("s3://fastface-faults/gives-up")
    monkeypatch.setenv(RETRY_ENV, "1")
    with pytest.raises(StorageError) as failed:
        short_run(store, lambda batch: moto.stop() if batch == 2 else None)
    assert "unreachable" in one_line(failed.value) and "run again" in str(failed.value)
    moto.start()
    assert short_run(store) == 2  # the resume makes only what is missing
    assert_exactly_once(store)


# -- the PostgreSQL catalog restarted mid-run --------------------------------------------------------

@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as new_database:
        yield new_database


def test_postgres_catalog_restarted_mid_run(postgres, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RETRY_ENV, "60")
    catalog = f"postgres:{postgres('restarted')}"
    store = Store(str(tmp_path / "store"), catalog=catalog)
    assert short_run(store, lambda batch: postgres.pg_ctl("restart") if batch == 2 else None) == 4
    assert_exactly_once(store)
    # `fastface sql` on a PostgreSQL catalog: read-only with external access off works there too.
    from fastface.cli import main

    monkeypatch.setenv(CATALOG_ENV, catalog)
    assert main(["sql", "--root", str(tmp_path / "store"), "SELECT count(*) AS n FROM generations"]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == str(len(PLANNED))
    assert main(["sql", "--root", str(tmp_path / "store"), "DELETE FROM fastface_lake.generations"]) == 2
    assert "refused" in capsys.readouterr().err
    assert store.count("generations") == len(PLANNED)


def test_postgres_catalog_down_fails_in_one_line_then_resumes(postgres, tmp_path, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "1")
    store = Store(str(tmp_path / "store"), catalog=f"postgres:{postgres('down')}")
    try:
        with pytest.raises(StorageError) as failed:
            short_run(store, lambda batch: postgres.pg_ctl("stop") if batch == 2 else None)
        assert "unreachable" in one_line(failed.value)
    finally:
        postgres.pg_ctl("start")
    assert short_run(store) == 2
    assert_exactly_once(store)


# -- a full disk under a local store ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_fails_in_one_line_nothing_half_written_then_resumes(small_disk):
    store = Store(str(small_disk / "store"))
    with pytest.raises(StorageError) as failed:
        short_run(store, image_bytes=400_000)  # 16 images of 400 kB do not fit in 3 MB
    assert "no space left" in one_line(failed.value) and "run again" in str(failed.value)
    leftovers = [p.name for p in Path(small_disk / "store" / "images").rglob(".tmp-*")]
    assert leftovers == []  # no half-written image
    stored = store.query("SELECT example_id, image_uri FROM fastface_lake.generations").to_pylist()
    assert all(store.read_bytes(r["image_uri"]).startswith(b"\x89PNG" + r["example_id"].encode()) for r in stored)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    short_run(store, image_bytes=400_000)
    assert_exactly_once(store)
