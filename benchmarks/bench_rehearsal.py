"""The paper's whole run in rehearsal mode (``weights: rehearsal``): wall time per step, peak RSS of
every process, driver CPU per image, and how busy the generator actors were.

    .venv/bin/python benchmarks/bench_rehearsal.py --root /tmp/rehearsal [--scale 0.1] [--busy-only]

Runs the steps of ``fastface evaluate --config configs/paper.yaml --set weights=rehearsal`` in
this process, one flow at a time (build-dataset, generate, score, report, compact), so each is
timed on its own. ``--scale s`` keeps ``round(54 s)`` identities of the 54 (every prompt, model,
scale and preset): 1 is the paper's 1,451,520 images and ~10 M metric rows.

Printed:

- wall seconds per step (the generate step includes planning the sweep);
- peak RSS of the driver (this process, which runs the flows and writes every row) and of each
  Ray process (actors, raylet, GCS), sampled every 0.5 s with psutil;
- the driver's CPU seconds (user + system, all its threads) per image over the generate and score
  steps, i.e. including the image's metric rows;
- the busy fraction of the generator actors from their own batch timestamps (each generations
  row's ``metadata.batch_started`` / ``batch_ended``): per model pool, the time the actors spent
  in batches over actors × the pool's span. ``--busy-seconds`` (default 1) runs a second, small
  rehearsal for this with 4 actors and a simulated ``execution.rehearsal_batch_seconds`` batch,
  on small shards so that shard boundaries are crossed many times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER = str(REPO / "configs" / "paper.yaml")


class RssSampler:
    """Peak RSS of this process and of every descendant (Ray's processes), sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    if proc.pid == self.me.pid:
                        name = "driver (flows, row writes)"
                    else:
                        name = " ".join(proc.cmdline())[:70] or proc.name()
                    label, peak = self.peaks.get(proc.pid, (name, 0))
                    if not name.startswith("ray::IDLE"):  # an actor process is IDLE until its actor starts
                        label = name
                    self.peaks[proc.pid] = (label, max(peak, rss))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def table(self) -> list[dict]:
        rows = [{"pid": pid, "process": name, "peak_rss_gib": rss / 2**30} for pid, (name, rss) in self.peaks.items()]
        return sorted(rows, key=lambda r: -r["peak_rss_gib"])


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def busy_fraction(root: str, run: str) -> list[dict]:
    """Per model pool: actors, batches, Σ batch time / (actors × span of the pool's batches)."""
    from storage import Store

    rows = Store(root).query(
        "WITH b AS (SELECT DISTINCT e.model, g.worker, "
        "CAST(json_extract(g.metadata, '$.batch_started') AS DOUBLE) AS t0, "
        "CAST(json_extract(g.metadata, '$.batch_ended') AS DOUBLE) AS t1 "
        "FROM fastface_lake.generations g JOIN fastface_lake.examples e USING (run_id, example_id) "
        "WHERE g.run_id = ? AND g.status = 'ok') "
        "SELECT model, count(DISTINCT worker) AS actors, count(*) AS batches, sum(t1 - t0) AS busy, "
        "max(t1) - min(t0) AS span FROM b GROUP BY model ORDER BY model", [run]).to_pylist()
    for row in rows:
        row["busy_fraction"] = row["busy"] / (row["actors"] * row["span"]) if row["span"] else None
    return rows


def rehearse(root: str, overrides: dict, label: str) -> dict:
    """Run the evaluate chain's steps one by one; returns the figures."""
    from flows.build_dataset import build_dataset_flow
    from evaluation.config import load_config
    from flows.evaluate import compact_task, record_run, report_flow
    from flows.generate import generate_flow, score_flow

    config = load_config(PAPER, overrides)
    steps: dict[str, float] = {}
    out: dict = {"label": label, "run": config.name, "overrides": overrides}
    with RssSampler() as sampler:
        def step(name, function, *args):
            started_wall, started_cpu = time.perf_counter(), cpu_seconds()
            result = function(*args)
            steps[name] = time.perf_counter() - started_wall
            out.setdefault("driver_cpu_s", {})[name] = cpu_seconds() - started_cpu
            print(f"[{label}] {name}: {steps[name]:.1f} s wall, {out['driver_cpu_s'][name]:.1f} s driver CPU",
                  flush=True)
            return result

        step("record-run", record_run, config, root)
        out["dataset"] = step("build-dataset", build_dataset_flow, config, root)
        out["generation"] = step("generate", generate_flow, config, root)
        out["scoring"] = step("score", score_flow, config, root)
        step("report", report_flow, config, root)
        if config.execution.compact:
            out["compaction"] = step("compact", compact_task, root)
    images = int(out["generation"]["ok"])
    metric_rows = int(out["scoring"]["ok"])
    cpu = out["driver_cpu_s"]["generate"] + out["driver_cpu_s"]["score"]
    out.update(
        images=images, metric_rows=metric_rows, wall_s=steps,
        driver_cpu_ms_per_image=1000 * cpu / max(images, 1),
        driver_cpu_ms_per_image_generate=1000 * out["driver_cpu_s"]["generate"] / max(images, 1),
        driver_cpu_ms_per_image_score=1000 * out["driver_cpu_s"]["score"] / max(images, 1),
        processes=sampler.table(), busy=busy_fraction(root, config.name),
        load_average=os.getloadavg(),
    )
    return out


def print_figures(out: dict) -> None:
    print(f"\n== {out['label']}: run {out['run']}: {out['images']} images, {out['metric_rows']} metric rows")
    for name, seconds in out["wall_s"].items():
        print(f"  {name:14s} {seconds:8.1f} s wall   {out['driver_cpu_s'][name]:8.1f} s driver CPU")
    print(f"  driver CPU per image (generate + score, incl. its metric rows): {out['driver_cpu_ms_per_image']:.3f} ms "
          f"(generate {out['driver_cpu_ms_per_image_generate']:.3f}, score {out['driver_cpu_ms_per_image_score']:.3f})")
    print("  peak RSS per process (GiB):")
    for row in out["processes"][:14]:
        print(f"    {row['peak_rss_gib']:6.2f}  pid {row['pid']:>7}  {row['process']}")
    if not out["overrides"].get("execution.rehearsal_batch_seconds"):
        print("  busy fraction: n/a (no simulated batch time: a batch's pipeline part takes no time)")
    for row in out["busy"] if out["overrides"].get("execution.rehearsal_batch_seconds") else []:
        fraction = "n/a" if row["busy_fraction"] is None else f"{100 * row['busy_fraction']:.1f} %"
        print(f"  generator actors of {row['model']}: {row['actors']} actors, {row['batches']} batches, "
              f"busy {fraction} of {row['span']:.1f} s")
    print(f"  load average during the run (1, 5, 15 min): {out['load_average']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="store root for the rehearsals (a fresh folder)")
    parser.add_argument("--scale", type=float, default=0.02, help="fraction of the 54 identities (1 = full size)")
    parser.add_argument("--max-prompts", type=int, default=None, help="prompts per kind (default: all 80 + 40)")
    parser.add_argument("--workers", type=int, default=2, help="actors per pool of the size run (default 2)")
    parser.add_argument("--busy-seconds", type=float, default=1.0, help="simulated batch of the busy run (0: skip)")
    parser.add_argument("--busy-only", action="store_true", help="only the busy-fraction run")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from actors.pool import connect_ray

    connect_ray(num_cpus=os.cpu_count())
    results = []
    if not args.busy_only:
        identities = max(1, round(54 * args.scale))
        overrides = {"weights": "rehearsal", "name": f"paper-{identities}ids",
                     "dataset.max_identities": identities, "execution.num_workers": args.workers,
                     "execution.cpus_per_worker": 0.5}
        if args.max_prompts:
            overrides["dataset.max_prompts"] = args.max_prompts
        results.append(rehearse(str(Path(args.root) / "size"), overrides, f"scale {args.scale:g}"))
        print_figures(results[-1])
    if args.busy_seconds > 0:
        overrides = {"weights": "rehearsal", "name": "paper-busy", "sweep.models": ["hyper"],
                     "sweep.lora_scales": [1.0], "sweep.ip_adapter_scales": [0.8], "dataset.max_identities": 8,
                     "dataset.max_prompts": 10, "execution.num_workers": 4, "execution.cpus_per_worker": 0.5,
                     "execution.batch_size": 8, "execution.shard_size": 64,
                     "execution.rehearsal_batch_seconds": args.busy_seconds, "execution.compact": False}
        results.append(rehearse(str(Path(args.root) / "busy"), overrides,
                                f"busy: {args.busy_seconds:g} s batches, 4 actors, 64-example shards"))
        print_figures(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
