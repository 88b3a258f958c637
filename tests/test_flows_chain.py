"""The evaluation chain as Prefect flows on a local Prefect server: configs/ci.yaml end to end (tiny models,
Ray pool, tables, report, artifacts), re-runs that add no rows, a run killed with SIGKILL during
generation and resumed, `fastface sql` / `fastface report`, and the scheduled deployment.

The session's Prefect server (tests/conftest.py: a subprocess on 127.0.0.1, PREFECT_HOME in a tmp dir)
serves the module; the in-process flows and the killed subprocess both talk to it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import wait_for_stored_rows

from storage import Catalog, Store

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = str(REPO / "configs" / "ci.yaml")
SQL = "SELECT preset, metric, avg(value) FROM metrics JOIN examples USING (example_id) GROUP BY ALL"
TABLES = ("runs", "identities", "prompts", "examples", "generations", "metrics")


@pytest.fixture(scope="module")
def cache_dir(fastface_cache):
    """The session's cache: tiny models built once, fused checkpoints and identities kept between runs."""
    return str(fastface_cache)


def raw_counts(root: str) -> dict[str, tuple[int, int]]:
    """Per table: (rows in every file, rows after latest-row dedup)."""
    with Catalog(Store(root)) as catalog:
        return {t: (catalog.query(f"SELECT count(*) AS n FROM {t}_raw").column(0)[0].as_py(),
                    catalog.query(f"SELECT count(*) AS n FROM {t}").column(0)[0].as_py()) for t in TABLES}


PLANNING_CALLS: dict[str, int] = {}


@pytest.fixture(scope="module")
def ci_run(prefect_server, ray_cluster, cache_dir, tmp_path_factory):
    import evaluation.sweep
    import flows.generate
    from flows.evaluate import evaluate_flow

    def counted(name, function):
        def planning(*args, **kwargs):
            PLANNING_CALLS[name] = PLANNING_CALLS.get(name, 0) + 1
            return function(*args, **kwargs)
        return planning

    root = str(tmp_path_factory.mktemp("ci-root"))
    started = datetime.now(timezone.utc)
    with pytest.MonkeyPatch.context() as patch:  # planning calls of the flows (the shard tasks share the module)
        for module, name in ((flows.generate, "plan_missing_generations"),
                             (evaluation.sweep, "plan_missing_metrics_table")):
            patch.setattr(module, name, counted(name, getattr(module, name)))
        summary = evaluate_flow(config=CI_CONFIG, root=root, overrides={"execution.cache_dir": cache_dir})
    return root, dict(summary, started=started)


def test_chain_writes_tables_report_and_artifacts(ci_run, prefect_server):
    from prefect.client.orchestration import get_client

    root, summary = ci_run
    counts = raw_counts(root)
    # 2 identities (Tom Hanks, the largest face of t1.jpg) × 2 prompts × {baseline, am1} × λ 0.8 = 8 examples.
    assert {t: c[1] for t, c in counts.items()} == {"runs": 1, "identities": 2, "prompts": 2, "examples": 8,
                                                     "generations": 8, "metrics": 32}
    assert all(raw == dedup for raw, dedup in counts.values())
    assert summary["generation"]["ok"] == 8 and summary["scoring"]["ok"] == 32
    # The run ends compacted: its appends' small files merged (rows unchanged, checked above).
    compaction = summary["compaction"]
    assert 0 < compaction["files_after"] <= compaction["files_before"] and compaction["snapshots_expired"] == 0
    # Each flow planned once; its shards (none retried) trusted that plan.
    assert PLANNING_CALLS == {"plan_missing_generations": 1, "plan_missing_metrics_table": 1}
    # One pool per stage for the run: each model's pipeline and the metric models loaded once (1 actor).
    assert summary["generation"]["pipeline_loads"] == {"tiny-hyper@2": 1}
    assert summary["scoring"]["metric_worker_loads"] == 1
    store = Store(root)
    generations = store.read("generations").to_pylist()
    assert all(g["status"] == "ok" for g in generations)
    import io

    from PIL import Image

    with Image.open(io.BytesIO(store.read_bytes(generations[0]["image_uri"]))) as image:
        assert image.size == (32, 32)
    metrics = store.read("metrics").to_pylist()
    # Tiny models make noise: no face, so ID is NULL (excluded) and FFC counts every image.
    assert {m["value"] for m in metrics if m["metric"] == "ffc"} == {1.0}
    assert all(m["value"] is None and m["error"] is None for m in metrics if m["metric"] == "id")
    html = Path(summary["report"]["html"]).read_text()
    assert "tiny random-weight models" in html and "data:image/png;base64," in html
    # The paper's claims and the failure gallery are in every report; no ablation figure in this one.
    assert "<section id='claims'>" in html and "<section id='failures'>" in html and "class='ablation'" not in html
    assert set(summary["claims"]) == {"dcg-stylistic", "am-realistic", "fastface-ffc"}
    table = Path(summary["report"]["table"]).read_text().splitlines()
    assert table[0].startswith("set,model,preset") and len(table) == 1 + 3 * 2  # 3 prompt sets × 2 presets
    with get_client(sync_client=True) as client:  # this run's artifacts (the session's server has others')
        artifacts = [a for a in client.read_artifacts() if a.created >= summary["started"]]
    keys = {a.key for a in artifacts if a.key}
    progress = [a for a in artifacts if a.type == "progress"]
    assert {"ci-table", "ci-summary", "ci-report", "ci-generation", "ci-scoring", "ci-dataset"} <= keys
    assert progress and all(a.data == 100.0 for a in progress)


def test_rerun_adds_no_rows(ci_run, cache_dir):
    from flows.evaluate import evaluate_flow

    root, _ = ci_run
    before = raw_counts(root)
    summary = evaluate_flow(config=CI_CONFIG, root=root, overrides={"execution.cache_dir": cache_dir})
    assert raw_counts(root) == before
    assert summary["run_row_written"] is False
    assert summary["generation"]["planned"] == 0 and summary["generation"]["shards"] == 0
    assert summary["scoring"]["planned"] == 0 and summary["dataset"]["identities"]["new"] == 0


def test_sql_and_report_commands(ci_run, capsys):
    from fastface.cli import main

    root, _ = ci_run
    assert main(["sql", "--root", root, SQL]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["preset", "|", "metric", "|", 'avg("value")']
    assert "(8 rows)" in out and any(line.startswith("am1") and "clip" in line for line in lines)
    assert main(["sql", "--root", root, "SELECT nope FROM metrics"]) == 2
    assert main(["report", "--root", root, "--ip-adapter-scale", "0.8", "--bootstrap", "50"]) == 0
    assert "# FastFace evaluation: run `ci`" in capsys.readouterr().out
    assert main(["report", "--root", root, "--ip-adapter-scale", "0.5"]) == 2
    assert "was not swept" in capsys.readouterr().err


def test_a_moved_and_a_copied_store_open_report_and_resume_where_they_are(ci_run, cache_dir, tmp_path, capsys):
    """A finished run's folder copied elsewhere and moved: `fastface sql`, `fastface report` and a resumed
    evaluation work there (images found where the store now is), and the evaluation adds nothing."""
    import shutil

    from fastface.cli import main
    from flows.evaluate import evaluate_flow

    root, _ = ci_run
    expected = raw_counts(root)
    copied = shutil.copytree(root, tmp_path / "copied", ignore=shutil.ignore_patterns("*.lock"))
    moved = Path(shutil.move(shutil.copytree(root, tmp_path / "before", ignore=shutil.ignore_patterns("*.lock")),
                             tmp_path / "moved"))
    for where in (str(copied), str(moved)):
        assert main(["sql", "--root", where, "SELECT count(*) AS n FROM generations"]) == 0
        assert capsys.readouterr().out.splitlines()[2].strip() == str(expected["generations"][1])
    shutil.rmtree(moved / "reports")  # the copied report: made again below, from where the store is now
    assert main(["report", "--root", str(moved), "--ip-adapter-scale", "0.8", "--bootstrap", "20"]) == 0
    assert "# FastFace evaluation: run `ci`" in capsys.readouterr().out
    html = (moved / "reports").rglob("*.html")
    assert any("data:image/png;base64," in p.read_text() for p in html)  # images read where the store is
    summary = evaluate_flow(config=CI_CONFIG, root=str(moved), overrides={"execution.cache_dir": cache_dir})
    assert summary["generation"]["planned"] == 0 and summary["scoring"]["planned"] == 0
    assert raw_counts(str(moved)) == expected == raw_counts(root)
    # the copied one too: its report reads the images of the copy, and a resumed run adds nothing
    shutil.rmtree(copied / "reports")
    assert main(["report", "--root", str(copied), "--ip-adapter-scale", "0.8", "--bootstrap", "20"]) == 0
    assert "# FastFace evaluation: run `ci`" in capsys.readouterr().out
    assert any("data:image/png;base64," in p.read_text() for p in (copied / "reports").rglob("*.html"))
    summary = evaluate_flow(config=CI_CONFIG, root=str(copied), overrides={"execution.cache_dir": cache_dir})
    assert summary["generation"]["planned"] == 0 and summary["scoring"]["planned"] == 0
    assert raw_counts(str(copied)) == expected


def test_an_s3_store_copied_to_another_prefix_and_to_a_folder_opens_reports_and_resumes(
        ci_run, cache_dir, tmp_path, capsys, monkeypatch):
    """The ci run's store synced to an s3:// prefix (moto; its SQLite catalog copied beside), that prefix copied
    to another prefix and synced back to a local folder: on each copy `fastface sql`, `fastface report` (images
    read from the copy) and a resumed evaluation (adds nothing) work where the store now is."""
    import shutil
    import uuid

    import fsspec
    from storage_support import create_bucket, moto_endpoint, s3_env

    from fastface.cli import main
    from flows.evaluate import evaluate_flow
    from storage.catalog_spec import CATALOG_ENV

    root, _ = ci_run
    expected = raw_counts(root)
    endpoint, bucket = moto_endpoint(), "fastface-relocated"
    create_bucket(endpoint, bucket)
    s3_env(monkeypatch, endpoint)
    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    first, second = (f"{bucket}/{uuid.uuid4().hex[:8]}/ci" for _ in range(2))
    for folder in ("tables", "images", "identity_photos"):  # a local store synced to S3
        fs.put(f"{root}/{folder}", f"{first}/{folder}", recursive=True)
    first_catalog = shutil.copy(Path(root) / "catalog.sqlite", tmp_path / "first.sqlite")
    fs.copy(f"{first}/", f"{second}/", recursive=True)  # that prefix copied to another one, catalog beside it
    second_catalog = shutil.copy(first_catalog, tmp_path / "second.sqlite")
    local = tmp_path / "synced"  # and the second prefix synced down to a folder (catalog inside, as a local store)
    fs.get(f"{second}/", str(local), recursive=True)
    shutil.copy(second_catalog, local / "catalog.sqlite")
    for where, catalog in ((f"s3://{first}", first_catalog), (f"s3://{second}", second_catalog), (str(local), None)):
        if catalog:
            monkeypatch.setenv(CATALOG_ENV, f"sqlite:{catalog}")
        else:
            monkeypatch.delenv(CATALOG_ENV, raising=False)
        assert main(["sql", "--root", where, "SELECT count(*) AS n FROM generations"]) == 0, where
        assert capsys.readouterr().out.splitlines()[2].strip() == str(expected["generations"][1]), where
        assert main(["report", "--root", where, "--ip-adapter-scale", "0.8", "--bootstrap", "20"]) == 0, where
        assert "# FastFace evaluation: run `ci`" in capsys.readouterr().out
        store = Store(where)
        html = store.read_bytes("reports/ci/report.html").decode()
        assert "data:image/png;base64," in html, where  # the grid's images were read from this copy
        summary = evaluate_flow(config=CI_CONFIG, root=where, overrides={"execution.cache_dir": cache_dir})
        assert summary["generation"]["planned"] == 0 and summary["scoring"]["planned"] == 0, where
        assert raw_counts(where) == expected, where


TRACE_SQL = """
    SELECT e.preset,
           json_extract(e.resolved_config, '$.dcg.alpha') AS alpha,
           json_extract(e.resolved_config, '$.dcg.beta') AS beta,
           CAST(json_extract(e.resolved_config, '$.dcg.rescale') AS DOUBLE) AS phi,
           json_extract(e.resolved_config, '$.am') AS am,
           json_extract(g.metadata, '$.unet_rows_per_step') AS unet_rows,
           json_extract(g.metadata, '$.dcg') AS dcg_used,
           json_extract(g.metadata, '$.am') AS am_used
    FROM examples e JOIN generations g USING (example_id) ORDER BY e.preset"""


def test_sql_traces_each_image_to_its_dcg_and_am(prefect_server, ray_cluster, cache_dir, tmp_path):
    """One `dcg` and one `ff-am2` image made by the generate flow (planning, Ray pool, store); one SQL query
    reads back the α and β lists, φ, the AM schedule and the UNet rows per step each was made with."""
    from metrics_fixtures import sample_photo

    from fastface.presets import get_preset
    from evaluation.config import load_config
    from flows.generate import generate_flow
    from storage.ids import bytes_sha256

    config = load_config(CI_CONFIG, {"sweep.sets": [{"prompts": "joint", "presets": ["dcg", "ff-am2"]}],
                                     "report.baseline": "dcg", "sweep.steps": 4, "execution.cache_dir": cache_dir,
                                     "name": "trace"})
    root = str(tmp_path / "store")
    store = Store(root)  # the dataset flow's rows, written directly: one identity, one stylistic prompt
    photo = sample_photo("Tom_Hanks_54745.png")
    store.append("identities", [{"identity_id": "hanks", "image_uri": str(photo),
                                 "content_hash": bytes_sha256(photo.read_bytes())}], config.dataset_run)
    store.append("prompts", [{"prompt_id": "p0", "text": "oil painting; portrait of a person", "kind": "stylistic"}],
                 config.dataset_run)
    summary = generate_flow(config=config, root=root)
    assert summary["ok"] == 2 and summary["failed"] == 0

    rows = Catalog(Store(root)).rows(TRACE_SQL)
    assert [r["preset"] for r in rows] == ["dcg", "ff-am2"]
    for row in rows:
        preset = get_preset(row["preset"])
        assert json.loads(row["alpha"]) == list(preset.dcg.alpha) == [1.0, 1.5, 1.5, 1.0]
        assert json.loads(row["beta"]) == list(preset.dcg.beta) == [1.0, 3.0, 3.0, 1.0]
        assert row["phi"] == preset.dcg.rescale == 0.75  # exact: 0.75 is a binary fraction, JSON to DOUBLE
        assert json.loads(row["dcg_used"]) == json.loads(json.dumps(preset.dcg.to_dict()))  # what the pipeline ran
    dcg_row, ff_row = rows
    assert json.loads(dcg_row["am"]) is None and json.loads(dcg_row["unet_rows"]) == [2, 3, 3, 2]
    am = json.loads(ff_row["am"])
    assert am == json.loads(json.dumps(get_preset("ff-am2").am.to_dict())) == json.loads(ff_row["am_used"])
    assert json.loads(ff_row["unet_rows"]) == [3, 3, 3, 3]


def test_killed_run_resumes_with_exactly_the_planned_rows(prefect_server, ray_cluster, cache_dir, tmp_path):
    """SIGKILL a real `fastface evaluate` during generation, start it again: every planned row once."""
    from flows.evaluate import evaluate_flow

    root = tmp_path / "killed"
    # One image per batch at 128 px (~0.5 s each; at 32 px the 16 images took ~1 s once the actor was up, and
    # the store's poll could see the first row only after the last): generation is caught working.
    overrides = {"execution.cache_dir": cache_dir, "execution.batch_size": 1, "sweep.ip_adapter_scales": [0.5, 0.8],
                 "sweep.size": 128}
    # The subprocess joins this session's Ray (no Ray processes of its own to leak); Ray ends its actors
    # when the driver dies.
    env = dict(os.environ, PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]),
               PYTHONPATH=str(REPO), RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    command = [sys.executable, "-m", "fastface.cli", "evaluate", "--config", CI_CONFIG, "--root", str(root)]
    command += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    log = open(tmp_path / "evaluate.log", "w")
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    planned = 16  # 2 identities × 2 prompts × 2 presets × 2 scales, one generations append per example
    stored = 0
    try:
        # generation has started: a generations row is committed (one append per example, batch 1). The
        # wait is long because CI's two cores also run the other xdist worker; it ends early if the run does.
        stored = wait_for_stored_rows(root, "generations", 1, timeout=600, alive=lambda: proc.poll() is None)
    finally:
        import psutil

        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        os.killpg(proc.pid, signal.SIGKILL)
        for child in descendants:  # anything it started outside its process group
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        log.close()
    assert 1 <= stored < planned, f"not killed mid-generation ({stored} rows): " + \
        (tmp_path / "evaluate.log").read_text()[-3000:]
    killed_rows = raw_counts(str(root))["generations"][0]
    assert 1 <= killed_rows < planned
    # The killed run still holds its run lock (flows/run_lock.py: a slot with a 60 s lease on this Prefect
    # server). Free it as an operator would (`prefect gcl delete <name>`) instead of waiting ~75 s for the
    # lease to lapse; tests/test_prefect_worker.py resumes a killed run through the lapse.
    from prefect.client.orchestration import get_client

    from flows.run_lock import lock_name

    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(lock_name("ci", str(root)))

    summary = evaluate_flow(config=CI_CONFIG, root=str(root), overrides=overrides)
    counts = raw_counts(str(root))
    assert counts["generations"] == (planned, planned)  # exactly the planned rows, none twice
    assert counts["metrics"] == (planned * 4, planned * 4)
    assert counts["examples"] == (planned, planned)
    assert summary["generation"]["ok"] == planned - killed_rows
    store = Store(str(root))
    assert len(store.image_ids("ci")) == planned


def test_scheduled_deployment_is_registered(prefect_server):
    import yaml
    from prefect.client.orchestration import get_client

    from flows.serve import register_deployment

    deployment_id = register_deployment("configs/smoke.yaml", "runs/nightly", cron="30 2 * * 1", timezone="UTC")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    assert deployment.name == "nightly" and deployment.parameters == {"config": "configs/smoke.yaml",
                                                                       "root": "runs/nightly"}
    assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * 1"]
    assert deployment.schedules[0].schedule.timezone == "UTC"
    # prefect.yaml at the repository root: its entrypoint and schedule are real.
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    entry = project["deployments"][0]
    path, _, name = entry["entrypoint"].partition(":")
    assert (REPO / path).is_file() and name == "evaluate_flow"
    from prefect.client.schemas.schedules import CronSchedule

    assert all(CronSchedule(cron=d["schedules"][0]["cron"]) for d in project["deployments"])  # valid cron
    assert all(Path(REPO / d["parameters"]["config"]).is_file() for d in project["deployments"])


# The paper's ablation configs (configs/ablations/) at their smallest, in ONE evaluate (each evaluate costs
# minutes of Prefect and Ray overhead on a loaded 2-core box): their sweep sets, exactly as the files give
# them, on tiny weights, one identity, one prompt per prompt set, 32 px, tiny-hyper only, LoRA 1.0.
ABLATION_CONFIGS = {"fig3": "fig3-dcg-schedules", "fig15": "fig15-dcg-variants", "fig16": "fig16-am1-components"}
PROMPT_OF_SET = {"stylistic": "oil painting; person in a library writing in a notebook",
                 "realistic": "a photo of a person in a park reading a book"}


def tiny_ablation_overrides(prompts: list[str], cache_dir: str) -> dict:
    return {"weights": "tiny", "face_backend": "dlib", "dataset.folder": None, "dataset.max_identities": None,
            "dataset.max_prompts": None, "dataset.prompts": prompts,
            "dataset.identities": [{"uri": "package://insightface/data/images/Tom_Hanks_54745.png"}],
            "sweep.models": ["tiny-hyper"], "sweep.size": 32, "sweep.lora_scales": [1.0],
            "metrics.names": ["id", "ffc", "clip"], "metrics.fsc_mode": "aligned",
            "metrics.face_size_mode": "clipped", "execution.batch_size": 8, "execution.num_workers": 1,
            "execution.compact": False, "execution.cache_dir": cache_dir,
            "report.bootstrap": {"samples": 50, "seed": 0}}


def test_ablation_configs_run_on_tiny_weights_with_their_report_sections(prefect_server, ray_cluster, cache_dir,
                                                                          tmp_path):
    import re

    import yaml

    from fastface.presets import ABLATION_PRESETS
    from evaluation.config import load_config
    from flows.evaluate import evaluate_flow

    merged, sets = None, []
    for figure, name in ABLATION_CONFIGS.items():
        path = REPO / "configs" / "ablations" / f"{name}.yaml"
        data = yaml.safe_load(path.read_text())
        prompts = [PROMPT_OF_SET[s["prompts"]] for s in data["sweep"]["sets"]]
        config = load_config(path, tiny_ablation_overrides(prompts, cache_dir))  # each file validates at tiny size
        assert set(config.presets()) == {"baseline", *ABLATION_PRESETS[figure]}  # the figure's presets, all of them
        assert config.sweep.steps == 4 and config.sweep.ip_adapter_scales == (0.8,)
        sets += data["sweep"]["sets"]
        merged = merged or dict(data, name="ablations-tiny")
    merged["sweep"]["sets"] = sets
    merged_path = tmp_path / "ablations-tiny.yaml"
    merged_path.write_text(yaml.safe_dump(merged))
    root = str(tmp_path / "ablations")
    summary = evaluate_flow(config=str(merged_path), root=root,
                            overrides=tiny_ablation_overrides(list(PROMPT_OF_SET.values()), cache_dir))
    # One identity; the stylistic prompt: baseline + Fig. 3's 5 + Fig. 15's 27 presets; the realistic one:
    # baseline + Fig. 16's 3.
    images = (1 + 5 + 27) + (1 + 3)
    assert summary["generation"]["ok"] == images, summary["generation"]
    page = Path(summary["report"]["html"]).read_text()
    for figure in ABLATION_CONFIGS:
        section = re.search(rf"<section class='ablation' id='ablation-{figure}'>(.*?)</section>", page, re.S)
        assert section, f"no {figure} section in the report"
        cells = 1 + len(ABLATION_PRESETS[figure])  # one identity × (baseline + the figure's presets)
        assert section.group(1).count("<img src='data:image/png;base64,") == cells, figure  # the grid, every cell
        # The metric table: baseline and each preset of the figure on its prompt set, on tiny-hyper.
        assert section.group(1).count("<td>tiny-hyper</td>") == cells, figure
    failures = re.search(r"<section id='failures'>(.*?)</section>", page, re.S).group(1)
    # Tiny weights make noise: no face anywhere; every image is shown once, as faceless, with its prompt.
    assert failures.count("<img ") == images and failures.count("no face<br>") == images
    assert PROMPT_OF_SET["realistic"] in failures
    summary_md = Path(summary["report"]["summary"]).read_text()
    for heading in ("## Fig. 3:", "## Fig. 15:", "## Fig. 16:", "## Fig. 17: failure cases", "## The paper's claims"):
        assert heading in summary_md, heading
    assert set(summary["claims"]) == {"dcg-stylistic", "am-realistic", "fastface-ffc"}
