"""Do the actors idle at shard boundaries? Busy fraction of model-free actors fed shard by shard, with and without queueing ahead.

    .venv/bin/python benchmarks/bench_shard_boundaries.py [--actors 4] [--batch-s 1.0] [--jitter 0.3]
        [--shards 4] [--batches-per-shard 32] [--task-overhead-s 0.2] [--write-interval-s 1.0]

The real pool (:class:`actors.pool.ActorPool`, the driver's appends to a local store) runs
workers that load no model and sleep a simulated batch time (``--batch-s``, each batch drawn
uniformly within ± ``--jitter`` of it, seeded, the same draws for both modes). Shards are fed
as the flows feed them, one call per shard with ``--task-overhead-s`` between calls (what a
Prefect task's start and end cost the driver), twice in one process on the same actors:

- ``drain``: shard after shard (the flows before issue 20): every boundary waits for the
  shard's slowest batch, then for the next task to start;
- ``ahead``: the next shard queued behind the current one (:func:`actors.pool.ahead`, what the
  flows do now).

Each actor logs every batch's start and end; the busy fraction is the actors' summed batch
time over ``actors × (last end − first start)``. Target (issue 20): ≥ 95 % with 1 s batches on
4 actors.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import ray


class SleepWorker:
    """No model: sleeps each batch's ``delay_s`` and logs ``start end`` of the batch to its own file."""

    def __init__(self, *, worker_id: str, log_dir: str) -> None:
        self.worker_id, self.log = worker_id, Path(log_dir) / worker_id

    def run(self, batch: list[dict]) -> list[dict]:
        started = time.time()
        time.sleep(float(batch[0]["delay_s"]))
        with self.log.open("a") as out:
            out.write(f"{started} {time.time()}\n")
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "status": "ok", "seconds": r["delay_s"],
                 "worker": self.worker_id} for r in batch]


def busy(log_dir: Path, since: float) -> dict:
    spans = {}
    for log in log_dir.iterdir():
        rows = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
        spans[log.name] = sorted(s for s in rows if s[0] >= since)
    first = min(s[0][0] for s in spans.values() if s)
    last = max(s[-1][1] for s in spans.values() if s)
    work = sum(end - start for s in spans.values() for start, end in s)
    gaps = [b[0] - a[1] for s in spans.values() for a, b in zip(s, s[1:])]
    return {"seconds": last - first, "busy": work / (len(spans) * (last - first)), "max_gap": max(gaps, default=0.0),
            "batches": sum(len(s) for s in spans.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--batch-s", type=float, default=1.0)
    parser.add_argument("--jitter", type=float, default=0.3, help="each batch takes batch-s × (1 ± jitter)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batches-per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--task-overhead-s", type=float, default=0.2)
    parser.add_argument("--write-interval-s", type=float, default=1.0, help="PoolOptions.write_interval_s")
    args = parser.parse_args()

    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec, ahead
    from storage import Store

    draw = random.Random(0)
    delays = [args.batch_s * (1 + draw.uniform(-args.jitter, args.jitter))
              for _ in range(args.shards * args.batches_per_shard)]

    def shards(prefix: str) -> list[list[list[dict]]]:
        batches = [[{"example_id": f"{prefix}{b:05d}-{i}", "run_id": "bench", "delay_s": delay}
                    for i in range(args.batch_size)] for b, delay in enumerate(delays)]
        n = args.batches_per_shard
        return [batches[i:i + n] for i in range(0, len(batches), n)]

    ray.init(address="local", num_cpus=max(2, args.actors), num_gpus=0, include_dashboard=False, log_to_driver=False)
    print(f"# bench_shard_boundaries: {args.actors} model-free actors, batches of {args.batch_s:g} s ± "
          f"{100 * args.jitter:.0f} %, {args.shards} shards of {args.batches_per_shard} batches, "
          f"{args.task_overhead_s:g} s between shard calls, appends every {args.write_interval_s:g} s; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| mode | wall s | actors busy | longest idle between batches s |\n|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            logs = Path(tmp) / "logs"
            logs.mkdir()
            store = Store(os.path.join(tmp, "store"))
            options = PoolOptions(num_workers=args.actors, cpus_per_worker=0.5, use_gpus=False,
                                  write_interval_s=args.write_interval_s)
            spec = WorkerSpec(SleepWorker, "run", kwargs={"log_dir": str(logs)})
            with ActorPool(spec, kind="bench-shards", options=options) as pool:
                warm = [[{"example_id": f"warm{i}", "run_id": "bench", "delay_s": 0.0}] for i in range(args.actors)]
                pool.record(store, "generations", warm, failed_rows=failed_generation_rows)
                for mode in ("drain", "ahead"):
                    parts = shards(mode)
                    since = time.time()
                    queue = (lambda shard: pool.queue(store, "generations", shard,  # noqa: E731
                                                      failed_rows=failed_generation_rows)) \
                        if mode == "ahead" else (lambda shard: 0)
                    for _, shard in ahead(parts, queue):
                        time.sleep(args.task_overhead_s / 2)  # the task starting
                        pool.record(store, "generations", shard, failed_rows=failed_generation_rows)
                        time.sleep(args.task_overhead_s / 2)  # the task ending
                    figures = busy(logs, since)
                    assert figures["batches"] == len(delays), figures
                    print(f"| {mode} | {figures['seconds']:.1f} | {100 * figures['busy']:.1f} % | "
                          f"{figures['max_gap']:.2f} |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
