"""Prefect flows ``evaluate`` (the whole chain from one YAML config) and ``report``.

``evaluate``: validate the config (fails before anything runs) → take the run's slot
(:mod:`flows.run_lock`: overlapping runs of one config never do the same work) → record
the run → ``build-dataset`` → ``generate`` → ``score`` → ``report`` → compact the store
(``execution.compact``: merge small files, expire week-old snapshots; see docs/storage.md).
Every step only does what is missing, so re-running a config adds no rows and a killed run
resumes where it stopped.
Deployments use ``flows/evaluate.py:evaluate_flow`` (see ``prefect.yaml`` and ``flows/serve.py``).
Its ``config`` parameter is the config itself (an :class:`EvaluationConfig`, so Prefect's UI
shows a form and the API takes values) or the path of a YAML file (the CLI, configs baked
into an image). Runs are named after the config (``<name>-<UTC time>``); a failed run posts
to ``$FASTFACE_FAILURE_WEBHOOK`` when it is set (:func:`notify_failure`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from fastface.provenance import package_versions
from flows.build_dataset import build_dataset_flow
from evaluation.config import EvaluationConfig, config_from_dict, load_config
from flows import artifact_key
from flows.generate import check_gpus, generate_flow, score_flow
from evaluation.report import build_report
from evaluation.retries import retry_transient
from flows.run_lock import run_lock
from storage import Store, canonical_json


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def record_run(config: EvaluationConfig, root: str) -> bool:
    """Append a ``runs`` row unless the run's latest row already holds this config; True when one was written."""
    store = Store(root)
    wanted = canonical_json(config.to_dict())
    if config.name in store.run_ids("runs"):
        latest = store.latest("runs", run_id=config.name).to_pylist()
        if latest and canonical_json(json.loads(latest[0]["config"] or "{}")) == wanted:
            return False
    store.append("runs", [{"kind": "evaluate", "config": config.to_dict(), "code_version": config.sweep.code_version,
                           "package_versions": package_versions(), "host": socket.gethostname()}], config.name)
    return True


@flow(name="report", log_prints=True)
def report_flow(config: EvaluationConfig, root: str, ip_adapter_scale: float | None = None) -> dict:
    """Tables, λ-curves, intervals, grids and calibration of ``config.name``, published as Prefect artifacts."""
    r = config.report
    report = build_report(
        root, config.name, ip_adapter_scale=ip_adapter_scale if ip_adapter_scale is not None else config.report_scale(),
        baseline=r.baseline, bootstrap_samples=r.bootstrap.samples, confidence=r.bootstrap.confidence,
        seed=r.bootstrap.seed, grid_identities=r.grid_identities,
        calibration=r.calibration and config.weights != "rehearsal",  # calibration runs the face model
    )
    rounded = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in report["table"]]
    create_table_artifact(key=artifact_key(config.name, "table"), table=rounded or [{"note": "no scored examples"}],
                          description=f"means at ip_adapter_scale {report['counts']['ip_adapter_scale']:g}")
    if report["calibration"]:
        create_table_artifact(key=artifact_key(config.name, "calibration"), table=report["calibration"],
                              description="ID similarity of same-person vs different-person pairs of real photos")
    create_markdown_artifact(key=artifact_key(config.name, "summary"), markdown=report["summary_markdown"],
                             description=f"FastFace evaluation report of run {config.name}")
    create_link_artifact(key=artifact_key(config.name, "report"), link=report_link(config.name, report["files"]["html"]),
                         link_text="report.html")
    return {**{k: v for k, v in report.items() if k in ("run_id", "files", "counts", "tiny_models")},
            "claims": report.get("claims_summary", {})}


APP_URL_ENV = "FASTFACE_APP_URL"


def report_link(run: str, html_uri: str, app_url: str | None = None) -> str:
    """Where the report artifact points: ``fastface app``'s ``/report`` page when ``$FASTFACE_APP_URL`` names
    the app serving this store (a browser opens it from the Prefect UI), else the file's own URI."""
    from urllib.parse import quote

    app_url = app_url if app_url is not None else os.environ.get(APP_URL_ENV, "")
    if app_url.strip():
        return f"{app_url.strip().rstrip('/')}/report?run={quote(run)}"
    return html_uri if "://" in html_uri else f"file://{html_uri}"


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def compact_task(root: str) -> dict[str, int]:
    """DuckLake maintenance once the run's rows are in (:meth:`storage.Store.compact`): the small files
    of the run's appends merged, snapshots older than a week expired, files nothing references deleted."""
    done = Store(root).compact()
    get_run_logger().info("store compacted: %d → %d data files, %d snapshots expired, %d files deleted",
                          done["files_before"], done["files_after"], done["snapshots_expired"], done["files_deleted"])
    return done


FAILURE_WEBHOOK_ENV = "FASTFACE_FAILURE_WEBHOOK"
WEBHOOK_TIMEOUT_S = 10.0


def as_config(config: EvaluationConfig | dict | str | os.PathLike, overrides: dict[str, Any] | None = None
              ) -> EvaluationConfig:
    """The flow's ``config`` parameter as a validated config: a config, its content as a dict, or a YAML path."""
    if isinstance(config, EvaluationConfig):
        if not overrides:
            return config
        return config_from_dict(config.to_dict(), source=config.source_path or "<dict>", overrides=overrides)
    if isinstance(config, dict):
        return config_from_dict(config, overrides=overrides)
    return load_config(config, overrides)


def _config_name(config: Any) -> str:
    if isinstance(config, EvaluationConfig):
        return config.name
    if isinstance(config, dict):
        return str(config.get("name") or "evaluate")
    try:  # a path: its name field (yaml.safe_load: nothing in it runs), else the file's stem
        import yaml

        with open(config, encoding="utf-8") as f:
            return str((yaml.safe_load(f) or {}).get("name") or Path(str(config)).stem)
    except (OSError, ValueError, AttributeError, TypeError):
        return Path(str(config)).stem or "evaluate"


def evaluate_run_name() -> str:
    """``<config name>-<UTC time>``: the flow run's name in the UI, from its ``config`` parameter."""
    from prefect.runtime import flow_run

    name = _config_name(flow_run.parameters.get("config"))
    return f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def failure_payload(flow_run: Any, state: Any) -> dict:
    """What the failure webhook receives: the run, its parameters' run name and root, and the state's message
    (never the environment, never credentials: the parameters hold a config and a root)."""
    parameters = dict(getattr(flow_run, "parameters", None) or {})
    return {"text": f"FastFace run {flow_run.name} failed: {state.message or state.name}",
            "flow_run_id": str(flow_run.id), "flow_run": flow_run.name, "state": state.name,
            "message": state.message, "run": _config_name(parameters.get("config")), "root": parameters.get("root")}


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` hook: POST :func:`failure_payload` as JSON to ``$FASTFACE_FAILURE_WEBHOOK`` (Slack-,
    Teams- or any JSON webhook); a webhook that fails is logged, it never hides the run's own failure."""
    url = os.environ.get(FAILURE_WEBHOOK_ENV)
    if not url:
        return
    body = json.dumps(failure_payload(flow_run, state), default=str).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
            response.read()
    except Exception as exc:  # noqa: BLE001 - the notification is best effort
        logging.getLogger("fastface").warning("failure webhook %s: %s", FAILURE_WEBHOOK_ENV, exc)


@flow(name="evaluate", log_prints=True, flow_run_name=evaluate_run_name, on_failure=[notify_failure])
def evaluate_flow(config: EvaluationConfig | str, root: str, overrides: dict[str, Any] | None = None) -> dict:
    """The whole evaluation of one config into ``root`` (a folder or s3:// URL).

    ``config``: the config's content (a form in Prefect's UI, values through the API) or a YAML path.
    """
    started = time.perf_counter()
    cfg = as_config(config, overrides)
    check_gpus(cfg)  # real weights and no GPU anywhere: fail now, not after the dataset
    with run_lock(cfg.name, root):  # an overlapping run of this config waits, then finds its work done
        written = record_run(cfg, root)
        dataset = build_dataset_flow(cfg, root)
        generation = generate_flow(cfg, root)
        scoring = score_flow(cfg, root)
        report = report_flow(cfg, root)
        compaction = compact_task(root) if cfg.execution.compact else None
    summary = {"run": cfg.name, "root": root, "run_row_written": written, "dataset": dataset,
               "generation": generation, "scoring": scoring, "report": report["files"],
               "claims": report.get("claims", {}), "compaction": compaction,
               "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["FAILURE_WEBHOOK_ENV", "as_config", "compact_task", "evaluate_flow", "evaluate_run_name",
           "failure_payload", "notify_failure", "record_run", "report_flow", "report_link"]
