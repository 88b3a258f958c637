"""One dtype parser: config files, CLI flags, loaders and generator workers accept the same names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fastface.dtypes import DTYPE_NAMES, dtype_name, parse_dtype

CI_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ci.yaml"


@pytest.mark.parametrize("spelling, dtype", [
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16), ("torch.float16", torch.float16),
    ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp32", torch.float32), ("float32", torch.float32),
    (torch.bfloat16, torch.bfloat16),
])
def test_parse_dtype_spellings(spelling, dtype):
    assert parse_dtype(spelling) is dtype
    assert dtype_name(spelling) == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("bad", ["float8", "int8", torch.int64])
def test_unknown_dtype_lists_the_accepted_names(bad):
    with pytest.raises(ValueError, match="valid: " + ", ".join(DTYPE_NAMES)):
        parse_dtype(bad)


def test_config_check_refuses_half_on_cpu_with_the_accepted_names():
    from evaluation.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"float16 does not run on device cpu.*bfloat16 or float32"):
        load_config(CI_CONFIG, {"execution.dtype": "fp16", "execution.device": "cpu"})
    with pytest.raises(ConfigError, match=r"execution\.dtype: unknown dtype 'float8'; valid: float16, fp16"):
        load_config(CI_CONFIG, {"execution.dtype": "float8"})


@pytest.mark.parametrize("spelling", ["fp16", "float16", "bf16", "float32"])
def test_generator_worker_takes_every_config_spelling(spelling, fastface_cache, tmp_path):
    """What the config check accepts, a generator worker loads with (never a failing actor)."""
    from actors.generator import GeneratorWorker
    from evaluation.config import load_config
    from storage import Store

    execution = load_config(CI_CONFIG, {"execution.dtype": spelling}).execution
    assert execution.dtype == dtype_name(spelling)  # stored canonical
    worker = GeneratorWorker(Store(str(tmp_path / "store")), "tiny-hyper", steps=4, dtype=execution.dtype,
                             device=execution.device, cache_dir=str(fastface_cache),
                             identity_cache_dir=str(tmp_path / "identities"))
    assert worker.pipe.unet.dtype is parse_dtype(spelling)
    assert json.loads(worker.versions)["dtype"] == dtype_name(spelling)
