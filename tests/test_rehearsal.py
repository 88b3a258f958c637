"""Rehearsal mode (``weights: rehearsal``) and ``fastface evaluate --plan``.

Pure parts first (config, the model-free dataset and metric values, the id template), then one
rehearsal of configs/paper.yaml cut to 2,160 images on the session's Ray and a module Prefect
server: ``--plan`` on the empty store, the run, exact row counts, the plan's counts equal to
what the run did, and a plan after it with nothing left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
PAPER = str(REPO / "configs" / "paper.yaml")
PAPER_IMAGES = 1_451_520


def test_example_id_maker_gives_example_id():
    from fastface.presets import get_preset
    from storage.ids import example_id, example_id_maker

    settings = dict(model="hyper", preset="ff-am2", preset_config=get_preset("ff-am2").to_dict(), ip_adapter_scale=0.8,
                    lora_scale=1, steps=4, width=1024, height=1024, code_version="fastface-1")
    make = example_id_maker(**settings)
    for identity_hash, prompt, seed in [("ab" * 32, 'oil painting; "quoted" é 東京 \\ tab\t', 123),
                                        ("cd" * 32, "", 2**62), ("ef" * 32, "a photo of a person", 0)]:
        assert make(identity_hash, prompt, seed) == example_id(identity_hash=identity_hash, prompt=prompt, seed=seed,
                                                               **settings)
    with pytest.raises(ValueError, match="seed"):
        make("ab" * 32, "p", 1.5)


def test_rehearsal_config_names_its_runs_and_needs_no_data_folder():
    config = load_config(PAPER, {"weights": "rehearsal"})
    assert (config.name, config.dataset_run) == ("paper-rehearsal", "paper-rehearsal-dataset")
    assert load_config(PAPER, {"weights": "rehearsal", "name": "paper-rehearsal"}).name == "paper-rehearsal"
    assert load_config(PAPER, {"weights": "rehearsal", "dataset.name": "shared"}).dataset_run == "shared-rehearsal"
    with pytest.raises(ConfigError, match="dataset.folder"):  # a real run still needs the authors' data
        load_config(PAPER)
    with pytest.raises(ConfigError, match="rehearsal_batch_seconds: only with weights: rehearsal"):
        load_config(str(REPO / "configs" / "ci.yaml"), {"execution.rehearsal_batch_seconds": 1})


def test_rehearsal_dataset_has_the_papers_shape_without_models():
    from evaluation.sweep import sweep_examples_table
    from evaluation.rehearsal import identity_rows_of, rehearsal_dataset, rehearsal_embeddings

    config = load_config(PAPER, {"weights": "rehearsal"})
    photos, prompts = rehearsal_dataset(config)
    assert len(photos) == 54 and len({p["id"] for p in photos}) == 54
    assert sorted(p["kind"] for p in prompts).count("realistic") == 80
    assert sum(p["kind"] == "stylistic" for p in prompts) == 40
    embeddings = rehearsal_embeddings(photos, "insightface")
    assert {len(e["embedding"]) for e in embeddings} == {512} and all(e["faces"] == 1 for e in embeddings)
    # one model × lora × λ of the sweep: 1/48 of the paper's images
    one = load_config(PAPER, {"weights": "rehearsal", "sweep.models": ["hyper"], "sweep.lora_scales": [1.0],
                              "sweep.ip_adapter_scales": [0.8]})
    table = sweep_examples_table(one, identity_rows_of(photos), prompts)
    assert table.num_rows * 48 == PAPER_IMAGES
    assert len(table.column("example_id").unique()) == table.num_rows
    pairs = {(p, r) for p, r in zip(table.column("preset").to_pylist(), table.column("resolved_config").to_pylist())}
    assert len(pairs) == len({p for p, _ in pairs}) == 6  # one resolved config per preset, stored per example
    assert all(json.loads(r)["preset"] == p for p, r in pairs)


def test_rehearsal_scores_are_deterministic_in_range_and_sometimes_faceless():
    from actors.rehearsal import face_found, rehearsal_score

    ids = [f"example-{i}" for i in range(4000)]
    faceless = [i for i in ids if not face_found(i)]
    assert 0.03 < len(faceless) / len(ids) < 0.07
    for example_id in ids[:500]:
        for metric, low, high in (("id", 0.2, 0.8), ("clip", 0.15, 0.35), ("ae", 4, 7), ("ir", -2, 2)):
            value, _ = rehearsal_score(example_id, metric, "a photo of a person")
            if metric == "id" and not face_found(example_id):
                assert value is None
            else:
                assert low <= value <= high
        assert rehearsal_score(example_id, "ae", "x") == rehearsal_score(example_id, "ae", "x")
    lost = faceless[0]
    assert rehearsal_score(lost, "ffc", "p")[0] == 1.0 and rehearsal_score(ids[0] if face_found(ids[0]) else ids[1],
                                                                         "ffc", "p")[0] == 0.0
    assert rehearsal_score(lost, "face_size", "p", face_size_mode="authors")[0] == 0.0
    assert rehearsal_score(lost, "face_size", "p")[0] is None
    assert rehearsal_score(ids[0], "fsc", "a realistic prompt")[0] is None  # fsc: stylistic prompts only


# -- one small rehearsal of the paper's config ------------------------------------------------------
IDENTITIES = 3
SMALL = {"weights": "rehearsal", "sweep.models": ["hyper", "lcm"], "sweep.ip_adapter_scales": [0.5, 0.8],
         "sweep.lora_scales": [1.0], "dataset.max_identities": IDENTITIES, "dataset.max_prompts": 10,
         "execution.num_workers": 2, "execution.shard_size": 400, "report.bootstrap.samples": 100}
# models × λ × identities × (baseline, dcg, am1/2, ff-am1/2) = 1,080 images: 3 shards of at most 400
SMALL_IMAGES = 2 * 2 * IDENTITIES * (20 + 10 + 2 * 10 + 2 * 20)


@pytest.fixture(scope="module")
def rehearsal(prefect_server, ray_cluster, tmp_path_factory):
    import time

    from evaluation.config import load_config
    from flows.evaluate import evaluate_flow
    from evaluation.plan import evaluation_plan

    root = str(tmp_path_factory.mktemp("rehearsal-root"))
    config = load_config(PAPER, SMALL)
    plan = evaluation_plan(config, root)
    started = time.perf_counter()
    summary = evaluate_flow(config=PAPER, root=root, overrides=SMALL)
    print(f"rehearsal of {SMALL_IMAGES} images: {time.perf_counter() - started:.1f} s")
    return root, config, plan, summary


def test_rehearsal_runs_every_step_with_exact_rows(rehearsal):
    from actors.rehearsal import face_found
    from storage import Catalog, Store

    root, config, _, summary = rehearsal
    assert summary["generation"]["ok"] == SMALL_IMAGES and summary["generation"]["failed"] == 0
    assert summary["scoring"]["ok"] == 7 * SMALL_IMAGES and summary["scoring"]["failed"] == 0
    assert summary["generation"]["shards"] > 2  # shard boundaries crossed
    assert Path(summary["report"]["html"]).is_file() and summary["compaction"] is not None
    with Catalog(Store(root)) as catalog:
        def one(sql: str):
            return catalog.query(sql).column(0)[0].as_py()

        assert one("SELECT count(*) FROM identities") == IDENTITIES
        assert one("SELECT count(*) FROM examples_raw") == SMALL_IMAGES
        assert one("SELECT count(*) FROM generations_raw WHERE status = 'ok'") == SMALL_IMAGES
        per_metric = {r["metric"]: r["n"] for r in
                      catalog.query("SELECT metric, count(*) AS n FROM metrics_raw GROUP BY metric").to_pylist()}
        assert per_metric == {m: SMALL_IMAGES for m in config.metrics.names}
        ids = catalog.query("SELECT example_id FROM examples").column(0).to_pylist()
        assert one("SELECT sum(value) FROM metrics WHERE metric = 'ffc'") == sum(not face_found(i) for i in ids) > 0
        assert one("SELECT count(*) FROM metrics WHERE metric = 'id' AND value IS NULL AND error IS NULL") == \
            sum(not face_found(i) for i in ids)
        assert one("SELECT count(DISTINCT device) FROM generations") == 1
        meta = json.loads(one("SELECT metadata FROM generations LIMIT 1"))
        assert meta["rehearsal"] and meta["batch_ended"] >= meta["batch_started"]
    # every image is a real (8×8) PNG in the store
    store = Store(root)
    uri = store.query("SELECT image_uri FROM fastface_lake.generations LIMIT 1").column(0)[0].as_py()
    assert store.read_bytes(uri)[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_says_what_the_run_did(rehearsal):
    from evaluation.plan import evaluation_plan, format_plan

    root, config, plan, summary = rehearsal
    total = plan["total"]
    assert not plan["store_exists"] and plan["dataset"] == {"built": False, "identities": IDENTITIES, "prompts": 20}
    assert total["examples"] == total["new_examples"] == SMALL_IMAGES
    assert total["images_missing"] == summary["generation"]["ok"] + summary["generation"]["failed"]
    assert total["scores_missing"] == summary["scoring"]["pairs_missing"] == summary["scoring"]["ok"]
    assert plan["pipeline_loads"] == summary["generation"]["pipeline_loads"]
    assert plan["metric_worker_loads"] == summary["scoring"]["metric_worker_loads"]
    assert {(g["model"], g["preset"], g["prompts"]) for g in plan["groups"]} >= {("hyper", "dcg", "stylistic"),
                                                                                  ("lcm", "am2", "realistic")}
    assert not any(g["preset"] == "dcg" and g["prompts"] == "realistic" for g in plan["groups"])
    after = evaluation_plan(config, root, seconds_per_image=2.0)
    assert after["dataset"]["built"] and after["total"]["examples"] == SMALL_IMAGES
    assert (after["total"]["new_examples"], after["total"]["images_missing"], after["total"]["scores_missing"]) == (0, 0, 0)
    assert after["pipeline_loads"] == {} and after["metric_worker_loads"] == 0
    # rehearsal rows never feed the GPU estimate
    assert evaluation_plan(config, root)["seconds_per_image"]["hyper"]["seconds"] is None
    text = format_plan(plan)
    assert f"total: {SMALL_IMAGES} examples ({SMALL_IMAGES} new), {SMALL_IMAGES} images" in text


def test_plan_cli_json_and_bad_flags(tmp_path, capsys):
    from fastface.cli import main

    overrides = [a for k, v in (("weights", "rehearsal"), ("dataset.max_identities", 2), ("dataset.max_prompts", 2),
                                ("sweep.models", "[hyper]"), ("sweep.lora_scales", "[1.0]"),
                                ("sweep.ip_adapter_scales", "[0.8]")) for a in ("--set", f"{k}={v}")]
    assert main(["evaluate", "--config", PAPER, "--root", str(tmp_path / "none"), *overrides, "--plan", "--json",
                 "--seconds-per-image", "1.5"]) == 0
    plan = json.loads(capsys.readouterr().out)
    images = 2 * (4 + 2 + 2 * 2 + 2 * 4)  # identities × (baseline, dcg, am1/2, ff-am1/2) on 2 + 2 prompts
    assert plan["total"]["images_missing"] == images
    assert plan["total"]["gpu_hours"] == pytest.approx(images * 1.5 / 3600)
    assert not (tmp_path / "none").exists()  # --plan writes nothing
    assert main(["evaluate", "--config", PAPER, "--root", str(tmp_path), *overrides, "--seconds-per-image", "2"]) == 2
    assert "--seconds-per-image goes with --plan" in capsys.readouterr().err


def test_rehearsal_workers_look_identities_up_by_point_query(tmp_path, monkeypatch):
    """Without Ray: the model-free workers make rows as the real ones do, and find identities in the
    store by content hash without reading the identities table whole."""
    from actors.rehearsal import RehearsalGenerator, RehearsalScorer, rehearsal_embedding, rehearsal_score
    from storage import Store

    store = Store(str(tmp_path / "store"))
    known = "ab" * 32
    store.append("identities", [{"identity_id": "a", "content_hash": known, "face_backend": "insightface",
                                 "embedding": rehearsal_embedding(known, 512).tolist()}], "d")
    store.append("identities", [{"identity_id": f"x{i}", "content_hash": f"{i:064x}"} for i in range(50)], "other")

    def whole_table(*args, **kwargs):
        raise AssertionError("a worker read a whole table")

    monkeypatch.setattr(Store, "read", whole_table)
    monkeypatch.setattr(Store, "latest", whole_table)
    base = {"run_id": "r", "identity_id": "a", "prompt": "oil painting; person in a park", "model": "hyper",
            "preset": "dcg", "ip_adapter_scale": 0.8, "lora_scale": 1.0, "steps": 4, "width": 1024, "height": 1024}
    batch = [dict(base, example_id="e1", identity_hash=known, seed=1),
             dict(base, example_id="e2", identity_hash="cd" * 32, seed=2)]
    generator = RehearsalGenerator(store, "hyper", face_backend="insightface", rehearsal_batch_seconds=0.05)
    rows = generator.generate(batch)
    assert [r["status"] for r in rows] == ["ok", "failed"] and "no identities row" in rows[1]["error"]
    assert store.read_bytes(rows[0]["image_uri"])[:4] == b"\x89PNG"
    meta = json.loads(rows[0]["metadata"])
    assert meta["batch_ended"] - meta["batch_started"] >= 0.05 and rows[0]["device"] == "rehearsal (no model)"
    assert generator.identities_prepared == 1
    scorer = RehearsalScorer(store, ["id", "fsc"], face_backend="insightface")
    scored = scorer.score([dict(batch[0], image_uri=rows[0]["image_uri"])])
    assert [(r["metric"], r["value"]) for r in scored] == [
        (m, rehearsal_score("e1", m, base["prompt"])[0]) for m in ("id", "fsc")]
    missing = scorer.score([dict(batch[1])])  # no image stored: error rows, as a real scorer writes them
    assert all(r["error"].startswith("cannot read generated image") for r in missing)
