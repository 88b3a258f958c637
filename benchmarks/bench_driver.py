"""Is the driver the bottleneck? Rows/s it records with model-free workers, and images/s with 1 vs 2 tiny-model actors.

    .venv/bin/python benchmarks/bench_driver.py [--images 4096] [--batch-size 16] [--actors 4] [--tiny-images 16]

Part 1 runs the real pools (:class:`actors.pool.ActorPool`: scheduling, retries bookkeeping,
atomic appends by the driver) with workers that load no model
and return their rows at once, so everything measured is the driver's work: images/s
recorded to ``generations`` and (example, metric) rows/s recorded to ``metrics`` (4 metrics
per image). The target is 256 images/s plus their metric rows (64 GPUs at 4 images/s). It runs
twice in one process: one append per batch (baseline), then the default that appends the
batches finished within a second in one transaction (``PoolOptions.write_interval_s``).

Part 2 generates ``--tiny-images`` images (tiny-hyper, 64×64, 2 steps, CPU) on pools of 1 and
2 actors (one CPU each) and prints images/s and the ratio 2 ÷ 1, measured in the same process.
On a machine with 2 cores and other load, 2 actors cannot double anything: read the ratio
together with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

METRICS = ("id", "ffc", "clip", "ae")


class InstantGenerator:
    """A generator worker without a model: ok rows at once (what the driver receives from a real one)."""

    def __init__(self, *, worker_id: str) -> None:
        self.worker_id = worker_id

    def run(self, batch: list[dict]) -> list[dict]:
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "status": "ok", "seconds": 0.25,
                 "image_uri": f"memory://{r['example_id']}.png", "device": "none", "worker": self.worker_id,
                 "node": "bench", "versions": "{}"} for r in batch]


class InstantScorer:
    """A metric worker without models: one row per (image, metric) at once."""

    def __init__(self, *, worker_id: str) -> None:
        self.worker_id = worker_id

    def run(self, batch: list[dict]) -> list[dict]:
        return [{"example_id": r["example_id"], "run_id": r["run_id"], "metric": m, "value": 0.5, "detail": None,
                 "error": None} for r in batch for m in METRICS]


def driver_throughput(root: str, images: int, batch_size: int, actors: int, interval: float = 1.0) -> dict:
    from actors.generator import failed_generation_rows
    from actors.pool import ActorPool, PoolOptions, WorkerSpec
    from actors.scorer import failed_metric_rows
    from storage import Store

    store = Store(root)
    rows = [{"example_id": f"e{i:07d}", "run_id": "bench"} for i in range(images)]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    options = PoolOptions(num_workers=actors, cpus_per_worker=1, write_interval_s=interval)
    warm = actors  # one batch per actor: each has imported what its first call needs
    out = {}
    with ActorPool(WorkerSpec(InstantGenerator, "run"), kind="bench-gen", options=options) as pool:
        pool.record(store, "generations", batches[:warm], failed_rows=failed_generation_rows)  # actors up
        started = time.perf_counter()
        stats = pool.record(store, "generations", batches[warm:], failed_rows=failed_generation_rows)
        seconds = time.perf_counter() - started
    out["images/s"] = stats.ok / seconds
    out["generation appends/s"] = stats.files / seconds
    with ActorPool(WorkerSpec(InstantScorer, "run"), kind="bench-score", options=options) as pool:
        failed = lambda batch, error: failed_metric_rows(batch, METRICS, error)  # noqa: E731
        pool.record(store, "metrics", batches[:warm], failed_rows=failed)
        started = time.perf_counter()
        stats = pool.record(store, "metrics", batches[warm:], failed_rows=failed)
        seconds = time.perf_counter() - started
    out["metric rows/s"] = stats.ok / seconds
    out["scored images/s"] = stats.ok / len(METRICS) / seconds
    # Both stages at once on one driver would share its time: the combined rate for images and their metric rows.
    out["images/s with their metric rows"] = 1.0 / (1.0 / out["images/s"] + 1.0 / out["scored images/s"])
    return out


def write_path_throughput(root: str, images: int, batch_size: int) -> dict:
    """The driver's write path alone (no Ray): one ``Store.append`` per batch, as :meth:`ActorPool.record` does."""
    from storage import Store

    store = Store(root)
    gen = InstantGenerator(worker_id="bench")
    score = InstantScorer(worker_id="bench")
    rows = [{"example_id": f"e{i:07d}", "run_id": "bench"} for i in range(images)]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    started = time.perf_counter()
    for batch in batches:
        store.append("generations", gen.run(batch), "bench")
    generation_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for batch in batches:
        store.append("metrics", score.run(batch), "bench")
    metric_seconds = time.perf_counter() - started
    return {"images/s": images / generation_seconds, "metric rows/s": images * len(METRICS) / metric_seconds,
            "scored images/s": images / metric_seconds,
            "images/s with their metric rows": images / (generation_seconds + metric_seconds)}


def print_figures(title: str, figures: dict) -> None:
    print(title)
    print("| figure | per second | ratio to 256 images/s |\n|---|---|---|")
    for name, value in figures.items():
        ratio = value / 256 / (len(METRICS) if name == "metric rows/s" else 1)
        print(f"| {name} | {value:,.0f} | {'—' if 'appends' in name else f'{ratio:.1f}'} |")


def tiny_actor_scaling(root: str, images: int, workers: int) -> float:
    import importlib.util
    from pathlib import Path

    from actors.pool import GeneratorPools, PoolOptions
    from fastface.presets import get_preset
    from fastface.tiny import ensure_tiny_models
    from storage import Store, Sweep
    from storage.ids import bytes_sha256

    spec = importlib.util.find_spec("insightface")
    photo = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"
    identity = {"identity_id": "hanks", "image_uri": str(photo), "content_hash": bytes_sha256(photo.read_bytes())}
    ensure_tiny_models()
    store = Store(root)
    store.append("identities", [identity], "dataset")
    prompts = [{"prompt_id": f"p{i}", "text": f"a photo of a person number {i}", "kind": "realistic"}
               for i in range(images)]
    examples = Sweep(run_id="bench", identities=[identity], prompts=prompts, models=["tiny-hyper"],
                     presets={"am1": get_preset("am1").to_dict()}, ip_adapter_scales=[0.8], code_version="bench",
                     steps=2, width=64, height=64).examples()
    options = {"identity_cache_dir": os.path.join(root, "identity-cache"), "device": "cpu"}
    with GeneratorPools(store, options=options, pool=PoolOptions(num_workers=workers), batch_size=2,
                        identities=[identity]) as pools:
        pools.generate(examples[:2 * workers])  # load the pipelines (once per actor) and warm up
        started = time.perf_counter()
        summary = pools.generate(examples[2 * workers:])
        seconds = time.perf_counter() - started
    assert summary["failed"] == 0, summary
    return summary["ok"] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--tiny-images", type=int, default=16)
    parser.add_argument("--write-only", action="store_true", help="only the driver's write path, without Ray")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = write_path_throughput(os.path.join(tmp, "write"), args.images, args.batch_size)
    print_figures(f"# bench_driver part 0: the driver's write path alone (Store.append per batch of "
                  f"{args.batch_size}, no Ray), {args.images} images; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.1f}", figures)
    if args.write_only:
        return
    # address="local": a Ray of our own, never a cluster left registered on this machine.
    ray.init(address="local", num_cpus=max(2, args.actors), num_gpus=0, include_dashboard=False,
             log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for interval in (0.0, 1.0):
                figures = driver_throughput(os.path.join(tmp, f"driver-{interval}"), args.images, args.batch_size,
                                            args.actors, interval)
                how = ("the batches of each second in one append (write_interval_s=1, the default)" if interval
                       else "one append per batch (write_interval_s=0, baseline)")
                print_figures(f"\n# bench_driver part 1: {args.images} images, batches of {args.batch_size}, "
                              f"{args.actors} model-free actors, local store, {how}; "
                              f"load average {os.getloadavg()[0]:.1f}", figures)
            if args.tiny_images:
                rates = {n: tiny_actor_scaling(os.path.join(tmp, f"tiny-{n}"), args.tiny_images + 2 * n, n)
                         for n in (1, 2)}
                print(f"\n# bench_driver part 2: tiny-hyper 64x64, 2 steps, am1, batches of 2, "
                      f"{args.tiny_images} images after warm-up; load average {os.getloadavg()[0]:.1f}")
                print("| CPU actors | images/s | ratio to 1 actor |\n|---|---|---|")
                for n, rate in rates.items():
                    print(f"| {n} | {rate:.2f} | {rate / rates[1]:.2f} |")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
