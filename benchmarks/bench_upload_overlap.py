"""Does storing a batch's images hold up the next batch? Seconds per batch on one generator actor, images stored inline vs on upload threads.

    .venv/bin/python benchmarks/bench_upload_overlap.py [--compute-s 1.0] [--upload-s 0.25] [--image-size 1024]
        [--batch-size 4] [--batches 6]

One generator actor (:class:`actors.pool.GeneratorPools`, the real :class:`actors.generator.GeneratorWorker`
and its identity preparation on tiny-hyper, CPU) whose pipeline call is simulated: it sleeps
``--compute-s`` per batch (a GPU batch) and returns ``--image-size``² images (a smooth
gradient with noise, so PNG encoding costs what a real image's does). Every image write to
the store sleeps ``--upload-s`` first (an S3 PUT of a 1024² PNG). Run twice in one process:

- ``inline`` (``upload_threads: 0``, the generator before issue 20): encode and store each
  image one by one after the batch, before the next batch starts;
- ``background`` (``upload_threads: 4``, the default): the images are encoded and stored on 4
  threads while the actor's next batch runs (two batches per actor).

Prints seconds per batch after one warm-up batch (pipeline load and identity preparation).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ray

from storage import Store


class SlowUploadStore(Store):
    """A store whose image writes take ``upload_s`` longer (a remote PUT)."""

    def __init__(self, root: str, upload_s: float) -> None:
        super().__init__(root)
        self.upload_s = float(upload_s)

    def __reduce__(self):
        return (SlowUploadStore, (self._root_arg, self.upload_s))

    def write_image(self, run_id, example_id, data, ext="png"):
        time.sleep(self.upload_s)
        return super().write_image(run_id, example_id, data, ext)


class SimulatedPipeline:
    """The tiny pipeline for everything but the generation itself, which sleeps ``compute_s`` and returns big images."""

    def __init__(self, pipe, compute_s: float, image_size: int) -> None:
        self.pipe, self.compute_s, self.image_size = pipe, compute_s, image_size

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, *, seeds, **kwargs):
        time.sleep(self.compute_s)
        ramp = np.linspace(0.0, 1.0, self.image_size, dtype=np.float32)
        images = []
        for seed in seeds:
            noise = np.random.default_rng(seed).normal(0, 0.02, (self.image_size, self.image_size, 3))
            images.append(np.clip(ramp[None, :, None] * 0.6 + ramp[:, None, None] * 0.3 + noise, 0, 1))
        return SimpleNamespace(images=np.stack(images).astype(np.float32), metadata=[{}] * len(seeds))


def simulated_factory(model, *, compute_s, image_size, **kwargs):
    from actors.generator import default_pipeline_factory

    return SimulatedPipeline(default_pipeline_factory(model, **kwargs), compute_s, image_size)


def seconds_per_batch(root: str, args, upload_threads: int) -> float:
    from actors.pool import GeneratorPools, PoolOptions
    from fastface.presets import get_preset
    from storage import Sweep
    from storage.ids import bytes_sha256

    spec = importlib.util.find_spec("insightface")
    photo = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"
    identity = {"identity_id": "hanks", "image_uri": str(photo), "content_hash": bytes_sha256(photo.read_bytes())}
    store = SlowUploadStore(root, args.upload_s)
    store.append("identities", [identity], "dataset")
    n = args.batch_size * (args.batches + 1)
    prompts = [{"prompt_id": f"p{i}", "text": f"a photo of a person number {i}", "kind": "realistic"}
               for i in range(n)]
    examples = Sweep(run_id="bench", identities=[identity], prompts=prompts, models=["tiny-hyper"],
                     presets={"am1": get_preset("am1").to_dict()}, ip_adapter_scales=[0.8], code_version="bench",
                     steps=2, width=64, height=64).examples()
    options = {"identity_cache_dir": os.path.join(root, "identity-cache"), "device": "cpu",
               "pipeline_factory": simulated_factory, "compute_s": args.compute_s, "image_size": args.image_size,
               "upload_threads": upload_threads}
    with GeneratorPools(store, options=options, pool=PoolOptions(num_workers=1), batch_size=args.batch_size,
                        identities=[identity]) as pools:
        pools.generate(examples[:args.batch_size])  # the pipeline loads, the identity is prepared
        started = time.perf_counter()
        summary = pools.generate(examples[args.batch_size:])
        seconds = time.perf_counter() - started
    assert summary["ok"] == n - args.batch_size and summary["failed"] == 0, summary
    return seconds / args.batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-s", type=float, default=1.0)
    parser.add_argument("--upload-s", type=float, default=0.25)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()
    from fastface.tiny import ensure_tiny_models

    ensure_tiny_models()
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = {mode: seconds_per_batch(os.path.join(tmp, mode), args, threads)
                    for mode, threads in (("inline", 0), ("background", 4))}
    finally:
        ray.shutdown()
    print(f"# bench_upload_overlap: one generator actor, simulated {args.compute_s:g} s batches of "
          f"{args.batch_size} {args.image_size}² images, {args.upload_s:g} s per image write, {args.batches} batches "
          f"after warm-up; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("| images stored | s per batch | ratio to inline |\n|---|---|---|")
    for mode, seconds in rows.items():
        print(f"| {mode} | {seconds:.2f} | {seconds / rows['inline']:.2f} |")


if __name__ == "__main__":
    main()
