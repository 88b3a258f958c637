"""The driver's writes: batches finished within ``write_interval_s`` are one append; rows exactly once."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray

from storage import Catalog, Store

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module


class QuickWorker:
    """No model: returns its rows after ``delay_s``; dies (the process exits) on a row in ``die_on``."""

    def __init__(self, *, worker_id, delay_s=0.0, die_on=()):
        self.worker_id, self.delay_s, self.die_on = worker_id, delay_s, set(die_on)

    def run(self, batch):
        if any(row["example_id"] in self.die_on for row in batch):
            os._exit(1)
        time.sleep(self.delay_s)
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "status": "ok", "worker": self.worker_id}
                for r in batch]


def record(store, batches, *, interval: float, workers: int = 2, max_retries: int = 2, **worker_kwargs):
    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec

    events = []
    options = PoolOptions(num_workers=workers, cpus_per_worker=0.5, use_gpus=False, max_retries=max_retries,
                          write_interval_s=interval)
    with ActorPool(WorkerSpec(QuickWorker, "run", kwargs=worker_kwargs), kind="writes", options=options) as pool:
        stats = pool.record(store, "generations", batches, failed_rows=failed_generation_rows,
                            on_batch=lambda event: events.append(len(event["rows"])))
    return stats, events


def stored(store: Store) -> dict[str, str]:
    with Catalog(store) as catalog:
        rows = catalog.query("SELECT example_id, status FROM generations_raw").to_pylist()
    assert len(rows) == len({r["example_id"] for r in rows})  # none twice
    return {r["example_id"]: r["status"] for r in rows}


@pytest.fixture
def batches():
    rows = [{"example_id": f"e{i:02d}", "run_id": "r"} for i in range(12)]
    return [rows[i:i + 2] for i in range(0, 12, 2)]


def test_batches_finished_within_the_interval_are_one_append(ray_cluster, tmp_path, batches):
    store = Store(str(tmp_path / "together"))
    stats, events = record(store, batches, interval=60.0)  # every batch finishes long before it is due
    assert stats.files == 1 and events == [12] and stats.ok == 12
    assert set(stored(store).values()) == {"ok"} and len(stored(store)) == 12


def test_interval_zero_is_one_append_per_batch(ray_cluster, tmp_path, batches):
    store = Store(str(tmp_path / "each"))
    stats, events = record(store, batches, interval=0.0)
    assert stats.files == len(batches) and events == [2] * len(batches) and len(stored(store)) == 12


def test_a_row_waits_at_most_the_interval(ray_cluster, tmp_path, batches):
    # One actor, a batch a second, an interval of 0.2 s: each batch is written before the next one finishes.
    store = Store(str(tmp_path / "slow"))
    stats, events = record(store, batches[:3], interval=0.2, workers=1, delay_s=1.0)
    assert stats.files == 3 and events == [2, 2, 2]


def test_held_rows_are_written_when_the_run_fails(ray_cluster, tmp_path, batches):
    # One actor, no retries: the first poisoned batch fails its rows, the second death ends the run.
    # The good batch and the failed rows, held for a long interval, are written on the way out.
    store = Store(str(tmp_path / "failing"))
    poisoned = [batches[1][0]["example_id"], batches[2][0]["example_id"]]
    with pytest.raises(RuntimeError, match="actors died 2 times"):
        record(store, batches[:3], interval=60.0, workers=1, max_retries=0, die_on=poisoned)
    assert stored(store) == {"e00": "ok", "e01": "ok", "e02": "failed", "e03": "failed"}


def test_a_failed_append_never_writes_another_runs_rows_twice(ray_cluster, tmp_path, monkeypatch):
    # A batch with two runs' rows, written as it finishes (interval 0); the second run's append fails:
    # the first run's rows are stored once (not again by the flush on the way out), the error reaches
    # the caller.
    store = Store(str(tmp_path / "two-runs"))
    real_append = Store.append

    def append(self, table, rows, run_id):
        if run_id == "r2":
            raise OSError("disk full (injected)")
        return real_append(self, table, rows, run_id)

    monkeypatch.setattr(Store, "append", append)
    batches = [[{"example_id": "a0", "run_id": "r1"}, {"example_id": "a1", "run_id": "r1"},
                {"example_id": "b0", "run_id": "r2"}]]
    with pytest.raises(OSError, match="disk full"):
        record(store, batches, interval=0.0, workers=1)
    assert stored(store) == {"a0": "ok", "a1": "ok"}
