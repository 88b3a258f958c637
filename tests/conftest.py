"""Shared, session-scoped fixtures: the tiny models are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The tiny models are dominated by per-op overhead: one intra-op thread is faster and keeps
# Ray workers and pytest from oversubscribing CI's two cores. FASTFACE_TEST_THREADS=2 runs the
# suite with two (float tolerances come from measured noise floors, tests/noise.py, so results
# that round differently with the thread count still pass).
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTFACE_TEST_THREADS", "1")))

DATA = Path(__file__).parent / "data"
AUTHORS_E2E = DATA / "authors_e2e"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTFACE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="needs real weights or a GPU; set FASTFACE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny SDXL + FaceID-Plus-v2 adapter + CLIP encoder, built from seed 0 and written to disk."""
    from fastface.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    """A FastFacePipeline loaded from the tiny models through the real loaders (float32, CPU)."""
    import torch

    from fastface.pipeline import FastFacePipeline, load_faceid_adapter

    pipe = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float32, default_guidance=1.0)
    pipe.set_progress_bar_config(disable=True)
    return load_faceid_adapter(pipe, tiny_models.adapter, image_encoder=tiny_models.image_encoder)


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray per test session (start-up is slow): 2 CPUs and a faked GPU, no dashboard.

    Workers inherit this process's environment (HF_HUB_OFFLINE etc. above).
    """
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def fastface_cache(tiny_models, tmp_path_factory):
    """A FASTFACE cache folder whose tiny-model root is the session's tiny models (built once).

    ``tiny-*`` checkpoints build their tiny distilled weights in it on first use; fused
    checkpoints and identity records are cached there too. Pass it as ``cache_dir`` / ``--cache-dir``.
    """
    from fastface.tiny import TINY_VERSION
    from fastface.tiny_checkpoints import ensure_tiny_checkpoints

    cache = tmp_path_factory.mktemp("fastface-cache")
    root = cache / f"tiny-v{TINY_VERSION}"
    root.symlink_to(Path(tiny_models.sdxl).parent.parent, target_is_directory=True)
    ensure_tiny_checkpoints(root)
    return cache


@pytest.fixture(scope="session")
def face_photo():
    """Tom Hanks, from the installed insightface wheel."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"
