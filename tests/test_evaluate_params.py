"""The evaluate flow's Prefect surface without a server: typed parameters (the config's content or a
path), the run name taken from the config, and the failure webhook (a real HTTP server on 127.0.0.1).
The same through a Prefect server, a deployment and a worker: tests/test_prefect_worker.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from test_prefect_worker import Webhook  # noqa: E402

from evaluation.config import ConfigError, EvaluationConfig  # noqa: E402
from flows.evaluate import (FAILURE_WEBHOOK_ENV, as_config, evaluate_flow, evaluate_run_name,  # noqa: E402
                            failure_payload, notify_failure)

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "configs" / "ci.yaml"


def test_config_parameter_takes_values_a_model_or_a_path():
    values = yaml.safe_load(CI.read_text())
    from_values, from_path = as_config(values), as_config(str(CI))
    assert isinstance(from_values, EvaluationConfig) and from_values.name == from_path.name == "ci"
    assert from_values.sweep == from_path.sweep and from_values.metrics == from_path.metrics
    assert as_config(from_path) is from_path
    assert as_config(from_path, {"sweep.size": 64}).sweep.size == 64
    with pytest.raises(ConfigError, match=r"sweep\.size must be a positive multiple of 2"):
        as_config(values, {"sweep.size": 33})
    # Prefect builds the UI form and validates API values from the signature: the config's own schema
    schema = evaluate_flow.parameters.model_dump()
    assert {"$ref": "#/definitions/EvaluationConfig"} in schema["properties"]["config"]["anyOf"]
    assert "sweep" in schema["definitions"]["EvaluationConfig"]["properties"]


def test_run_name_is_the_config_name(monkeypatch):
    import prefect.runtime.flow_run as runtime

    for config in (yaml.safe_load(CI.read_text()), str(CI), as_config(str(CI))):
        monkeypatch.setitem(runtime.FIELDS, "parameters", lambda config=config: {"config": config, "root": "x"})
        name = evaluate_run_name()
        assert name.startswith("ci-") and len(name) == len("ci-20261207-010203"), name


def test_failure_posts_to_the_webhook(monkeypatch):
    webhook = Webhook()
    try:
        run = SimpleNamespace(id="0b7c", name="ci-20261207-010203",
                              parameters={"config": str(CI), "root": "s3://bucket/prefix"})
        state = SimpleNamespace(name="Failed", message="Flow run encountered an exception: disk full")
        monkeypatch.setenv(FAILURE_WEBHOOK_ENV, webhook.url)
        notify_failure(None, run, state)
        assert webhook.received == [failure_payload(run, state)]
        posted = webhook.received[0]
        assert posted["run"] == "ci" and posted["flow_run"] == run.name and "disk full" in posted["text"]
        assert set(posted) == {"text", "flow_run_id", "flow_run", "state", "message", "run", "root"}
        json.dumps(posted)
        # a webhook that is down is logged, never raised over the run's own failure
        monkeypatch.setenv(FAILURE_WEBHOOK_ENV, "http://127.0.0.1:9/down")
        notify_failure(None, run, state)
        monkeypatch.delenv(FAILURE_WEBHOOK_ENV)
        notify_failure(None, run, state)  # unset: nothing to post
        assert len(webhook.received) == 1
    finally:
        webhook.close()
