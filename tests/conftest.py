"""Shared, session-scoped fixtures: the tiny models are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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

    pipe = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float32)
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
