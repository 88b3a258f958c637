"""Shards fed through one pool: the next shard is queued while the current one finishes (no drain at the boundary).

Measured from the actors' own batch timestamps: each model-free actor logs when each batch
started and ended; between two consecutive batches of one actor there is no gap longer than
the driver's round trip while work was queued. The same pool fed shard after shard without
queueing ahead shows the drain (an actor idle for about a batch at every boundary), so the
measurement can see what it tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import ray

from storage import Catalog, Store

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module

BATCH_S = 1.0  # every batch sleeps this long on its actor
SLACK_S = 0.5  # the most an actor may wait between two batches while work is queued


class TimedWorker:
    """No model: sleeps ``delay_s`` per batch and appends ``start end`` of each batch to its own log file."""

    def __init__(self, *, worker_id, log_dir, delay_s):
        self.log = Path(log_dir) / worker_id
        self.worker_id, self.delay_s = worker_id, delay_s

    def run(self, batch):
        started = time.time()
        time.sleep(self.delay_s)
        with self.log.open("a") as out:
            out.write(f"{started} {time.time()}\n")
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "status": "ok", "worker": self.worker_id}
                for r in batch]


def gaps(log_dir: Path, since: float) -> list[float]:
    """Idle time between consecutive batches of each actor, for the batches started after ``since``."""
    out = []
    for log in log_dir.iterdir():
        spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
        spans = [s for s in spans if s[0] >= since]
        out += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return out


def stored(store: Store) -> list[str]:
    with Catalog(store) as catalog:
        return [r["example_id"] for r in catalog.query("SELECT example_id FROM generations_raw").to_pylist()]


def test_the_pool_does_not_drain_between_shards(ray_cluster, tmp_path, monkeypatch):
    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec, ahead

    logs = tmp_path / "logs"
    logs.mkdir()
    store = Store(str(tmp_path / "store"))
    # The driver's appends are recorded in memory: what is measured is the queueing, not how long a
    # catalog commit takes on a loaded machine (an actor that finishes during one waits for it).
    appended = []
    monkeypatch.setattr(Store, "append", lambda self, table, rows, run_id: appended.extend(rows) or "file")

    def shards(prefix):  # 4 shards of 3 batches of 2 rows: on 2 actors each shard ends with one actor alone
        rows = [{"example_id": f"{prefix}{i:02d}", "run_id": "r"} for i in range(24)]
        batches = [rows[i:i + 2] for i in range(0, 24, 2)]
        return [batches[i:i + 3] for i in range(0, 12, 3)]

    options = PoolOptions(num_workers=2, cpus_per_worker=0.5, use_gpus=False, write_interval_s=60.0)
    spec = WorkerSpec(TimedWorker, "run", kwargs={"log_dir": str(logs), "delay_s": BATCH_S})
    with ActorPool(spec, kind="shards", options=options) as pool:
        pool.record(store, "generations", [[{"example_id": "warm0", "run_id": "r"}],
                                           [{"example_id": "warm1", "run_id": "r"}]],
                    failed_rows=failed_generation_rows)  # both actors up
        assert pool.stats.workers == 2

        # Shard after shard, nothing queued ahead: the pool drains at every boundary.
        since = time.time()
        for shard in shards("d"):
            pool.record(store, "generations", shard, failed_rows=failed_generation_rows)
        drained = gaps(logs, since)

        # The flows' way: each shard queued behind the one before (actors.pool.ahead), claimed by its call.
        since = time.time()
        queue = lambda shard: pool.queue(store, "generations", shard, failed_rows=failed_generation_rows)  # noqa: E731
        reported = []
        summaries = [pool.record(store, "generations", shard, failed_rows=failed_generation_rows,
                                 on_batch=lambda event: reported.append(len(event["rows"])))
                     for _, shard in ahead(shards("a"), queue)]
        fed = gaps(logs, since)

    assert max(drained) >= BATCH_S - SLACK_S, drained  # the measurement sees a drain
    assert len(fed) == 12 - 2 and max(fed) <= SLACK_S, fed  # 12 batches on 2 actors: no idle actor between them
    assert [s.ok for s in summaries] == [6, 6, 6, 6] and sum(reported) == 24  # each shard reports its own rows
    ids = [row["example_id"] for row in appended]
    assert len(ids) == len(set(ids)) == 2 + 24 + 24  # every row once


def test_a_failed_shard_drops_its_queued_work_and_its_retry_does_the_rest(ray_cluster, tmp_path, monkeypatch):
    """A shard's call that raises (here: its append) cancels its batches, not the next shard's; the retry
    with the rows still missing writes each of them once, and the next shard's call claims its queued work."""
    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec

    store = Store(str(tmp_path / "store"))
    real_append = Store.append
    failures = []

    def append(self, table, rows, run_id):
        if any(row["example_id"] == "s0-03" for row in rows) and not failures:
            failures.append(len(rows))
            raise OSError("disk full (injected)")
        return real_append(self, table, rows, run_id)

    monkeypatch.setattr(Store, "append", append)
    shard0 = [[{"example_id": f"s0-{i:02d}", "run_id": "r"} for i in range(j, j + 2)] for j in (0, 2, 4)]
    shard1 = [[{"example_id": f"s1-{i:02d}", "run_id": "r"} for i in range(j, j + 2)] for j in (0, 2)]
    options = PoolOptions(num_workers=2, cpus_per_worker=0.5, use_gpus=False, write_interval_s=0.0)
    spec = WorkerSpec(TimedWorker, "run", kwargs={"log_dir": str(tmp_path), "delay_s": 0.2})
    with ActorPool(spec, kind="retry", options=options) as pool:
        pool.queue(store, "generations", shard0, failed_rows=failed_generation_rows)
        pool.queue(store, "generations", shard1, failed_rows=failed_generation_rows)
        with pytest.raises(OSError, match="disk full"):
            pool.record(store, "generations", shard0, failed_rows=failed_generation_rows)
        done = set(stored(store))
        retry = [[row for row in batch if row["example_id"] not in done] for batch in shard0]
        again = pool.record(store, "generations", retry, failed_rows=failed_generation_rows)
        second = pool.record(store, "generations", shard1, failed_rows=failed_generation_rows)
    ids = stored(store)
    assert len(ids) == len(set(ids)) == 10  # every row once, none lost
    assert again.ok == 6 - len(done & {f"s0-{i:02d}" for i in range(6)}) and second.ok == 4
