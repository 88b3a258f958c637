"""Every image can be traced to the DCG/AM constants it was made with, by SQL over the store."""

from __future__ import annotations

import json
from pathlib import Path

from metrics_fixtures import sample_photo

CI_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ci.yaml"


def test_sql_reads_back_alpha_beta_phi_am_schedule_and_unet_rows(fastface_cache, tmp_path):
    from actors.generator import GeneratorWorker
    from fastface.presets import get_preset
    from flows.config import load_config
    from flows.generate import sweep_examples
    from storage import Catalog, Store
    from storage.ids import bytes_sha256

    config = load_config(CI_CONFIG, {"sweep.sets": [{"prompts": "joint", "presets": ["dcg", "ff-am2"]}],
                                     "sweep.steps": 4, "report.baseline": "dcg"})
    photo = sample_photo("Tom_Hanks_54745.png")
    identities = [{"identity_id": "hanks", "run_id": "dataset", "image_uri": str(photo),
                   "content_hash": bytes_sha256(photo.read_bytes())}]
    prompts = [{"prompt_id": "p0", "text": "oil painting; portrait of a person", "kind": "stylistic"}]
    store = Store(str(tmp_path / "store"))
    store.append("identities", identities, "dataset")
    examples = sweep_examples(config, identities, prompts)  # the flow's planning
    assert sorted(e["preset"] for e in examples) == ["dcg", "ff-am2"]
    store.append("examples", examples, config.name)
    worker = GeneratorWorker(store, "tiny-hyper", steps=4, cache_dir=str(fastface_cache),
                             identity_cache_dir=str(tmp_path / "identities"))
    for example in examples:  # one pipeline call per preset, as the pools batch them
        store.append("generations", worker.generate([example]), config.name)

    rows = Catalog(store).rows("""
        SELECT e.preset,
               json_extract(e.resolved_config, '$.dcg.alpha') AS alpha,
               json_extract(e.resolved_config, '$.dcg.beta') AS beta,
               CAST(json_extract(e.resolved_config, '$.dcg.rescale') AS DOUBLE) AS phi,
               json_extract(e.resolved_config, '$.am') AS am,
               json_extract(g.metadata, '$.unet_rows_per_step') AS unet_rows,
               json_extract(g.metadata, '$.dcg') AS dcg_used
        FROM examples e JOIN generations g USING (example_id) ORDER BY e.preset""")
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
    assert am == json.loads(json.dumps(get_preset("ff-am2").am.to_dict()))
    assert json.loads(ff_row["unet_rows"]) == [3, 3, 3, 3]


def test_an_older_store_gains_the_new_nullable_columns(tmp_path):
    """Schema evolution: a store of an older schema version gets the columns added since, as NULL."""
    import storage.store as store_module
    from storage import Store
    from storage.schemas import SCHEMA_VERSION

    store = Store(str(tmp_path / "old"))
    store.append("runs", [{"run_id": "r", "kind": "test"}], "r")
    con = store._connection()
    lake = store_module.LAKE
    con.execute(f"ALTER TABLE {lake}.generations DROP COLUMN metadata")
    con.execute(f"UPDATE {lake}.{store_module.META_TABLE} SET value = '2' WHERE key = 'schema_version'")
    store.close()
    reopened = Store(str(tmp_path / "old"))
    assert reopened.count("runs") == 1
    reopened.append("generations", [{"example_id": "e", "status": "failed", "error": "x"}], "r")
    columns = reopened.query(f"SELECT * FROM {lake}.generations").column_names
    assert "metadata" in columns
    assert reopened.query(f"SELECT value FROM {lake}.{store_module.META_TABLE} WHERE key = 'schema_version'"
                          ).column(0).to_pylist() == [str(SCHEMA_VERSION)]
