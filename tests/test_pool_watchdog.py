"""The stuck-actor watchdog: an actor that hangs in a batch is killed once it has held the batch longer than the
pool's bound (stuck_factor × median batch time, at least stuck_floor_s), and its batch is retried on a new actor —
every row stored exactly once, the call finished within the bound."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import ray

from storage import Catalog, Store

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module


class HangingWorker:
    """No model: 0.2 s per batch, except that the first actor to meet example ``e03`` (after a first batch:
    its models would be loaded) hangs in it for an hour."""

    def __init__(self, *, worker_id, marker):
        self.marker = Path(marker)

    def run(self, batch):
        if any(r["example_id"] == "e03" for r in batch) and not self.marker.exists():
            self.marker.write_text("hung")
            time.sleep(3600)
        time.sleep(0.2)
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "status": "ok"} for r in batch]


def test_a_hung_actor_is_killed_and_its_batch_retried_once(ray_cluster, tmp_path):
    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec

    store = Store(str(tmp_path / "store"))
    rows = [{"example_id": f"e{i:02d}", "run_id": "r"} for i in range(8)]
    options = PoolOptions(num_workers=2, cpus_per_worker=0.5, use_gpus=False, write_interval_s=0.0,
                          stuck_factor=5.0, stuck_floor_s=3.0, stuck_first_s=300.0)
    spec = WorkerSpec(HangingWorker, "run", kwargs={"marker": str(tmp_path / "hung")})
    with ActorPool(spec, kind="watchdog", options=options) as pool:
        started = time.monotonic()
        summary = pool.record(store, "generations", [[row] for row in rows], failed_rows=failed_generation_rows)
        took = time.monotonic() - started
        bound = pool.stuck_after_s(0)
        assert pool.stats.stuck_killed == 1 and pool.stats.actor_restarts >= 1
    assert (tmp_path / "hung").exists()  # an actor did hang
    assert summary.ok == 8 and summary.failed == 0 and summary.retried >= 1
    assert bound == 3.0  # the 0.2 s batches keep the bound at its floor
    assert took < bound + 60, took  # not the hour the actor would have slept
    with Catalog(store) as catalog:
        stored = [r["example_id"] for r in catalog.query("SELECT example_id FROM generations_raw").to_pylist()]
    assert sorted(stored) == [r["example_id"] for r in rows]  # every row exactly once
