"""Schemas (declared once, checked on read) and stable ids/seeds."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import ids
from storage.migrate import migrate_store
from storage.schemas import SCHEMA_VERSION, TABLES, VERSION_KEY, SchemaError, conform, schema
from storage.layout import LAKE
from storage.store import Store

BASE = dict(
    identity_hash="a" * 64,
    prompt="a photo of a person in a park",
    model="hyper",
    preset="ff-am1",
    preset_config={"dcg": {"alpha": [1.0, 3.0, 3.0, 1.0], "variant": "id"}, "am": {"kind": "am1", "blocks": ["up.0"]}},
    ip_adapter_scale=0.8,
    lora_scale=1.0,
    seed=1234,
    steps=4,
    width=1024,
    height=1024,
    code_version="fastface-0.1.0",
)


# -- schemas -------------------------------------------------------------------------


def test_every_table_declared_with_version_metadata():
    assert set(TABLES) == {"runs", "identities", "prompts", "examples", "generations", "metrics"}
    for table in TABLES:
        s = schema(table)
        assert s.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
        assert "run_id" in s.names and "created_at" in s.names
    assert schema("metrics").field("value").type == pa.float64() and schema("metrics").field("value").nullable
    with pytest.raises(SchemaError, match="unknown table 'metric'"):
        schema("metric")


def test_conform_rejects_bad_rows_naming_column():
    ok = {"example_id": "e", "run_id": "r", "status": "ok"}
    with pytest.raises(SchemaError, match=r"'status' has value\(s\) \['done'\]; allowed: \['failed', 'ok'\]"):
        conform("generations", [dict(ok, status="done")], defaults={"created_at": 0})
    with pytest.raises(SchemaError, match="unknown column.*'statsu'"):
        conform("generations", [{"example_id": "e", "run_id": "r", "statsu": "ok"}])
    with pytest.raises(SchemaError, match="required column 'example_id'"):
        conform("generations", [{"run_id": "r", "status": "ok", "created_at": 0}])
    with pytest.raises(SchemaError, match="column 'seconds' cannot be stored as double"):
        conform("generations", [dict(ok, seconds="fast", created_at=0)])
    with pytest.raises(SchemaError, match="column 'value' has type string, expected double"):
        conform("metrics", pa.table({"example_id": ["e"], "metric": ["m"], "value": ["0.5"]}),
                defaults={"run_id": "r", "created_at": 0})
    with pytest.raises(SchemaError, match="'detail' is not valid JSON"):
        conform("metrics", [{"example_id": "e", "run_id": "r", "metric": "m", "detail": "{oops", "created_at": 0}])
    # dicts in JSON columns are serialised canonically
    t = conform("metrics", [{"example_id": "e", "run_id": "r", "metric": "m", "detail": {"b": 1, "a": 2},
                             "created_at": 0}])
    assert t.column("detail").to_pylist() == ['{"a":2,"b":1}']


def _write_raw(tmp_path, table, data: pa.Table):
    """A file as the old one-file-per-batch layout had it (what ``fastface migrate-store`` reads)."""
    d = tmp_path / table / "run_id=r1"
    d.mkdir(parents=True)
    pq.write_table(data, d / "part-bad.parquet")


def test_old_layout_is_checked_when_migrated(tmp_path):
    good = conform("metrics", [{"example_id": "e", "run_id": "r1", "metric": "id", "value": 0.5}],
                   defaults={"created_at": 0})
    bad = good.set_column(3, pa.field("value", pa.string()), pa.array(["0.5"]))
    _write_raw(tmp_path / "a", "metrics", bad.replace_schema_metadata(schema("metrics").metadata))
    with pytest.raises(SchemaError, match=r"table 'metrics' in .*part-bad.parquet: column 'value' has type string, "
                                          r"expected double"):
        migrate_store(str(tmp_path / "a"), str(tmp_path / "new-a"))
    assert not (tmp_path / "new-a").exists()  # checked before anything is written

    newer = good.replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION + 1).encode(), b"fastface.table": b"metrics"})
    _write_raw(tmp_path / "b", "metrics", newer)
    with pytest.raises(SchemaError, match=f"table 'metrics' .*schema version {SCHEMA_VERSION + 1} is newer than "
                                          f"this code's version {SCHEMA_VERSION}"):
        migrate_store(str(tmp_path / "b"), str(tmp_path / "new-b"))

    missing = good.drop_columns(["metric"]).replace_schema_metadata(schema("metrics").metadata)
    _write_raw(tmp_path / "c", "metrics", missing)
    with pytest.raises(SchemaError, match="missing column 'metric' \\(expected type string\\)"):
        migrate_store(str(tmp_path / "c"), str(tmp_path / "new-c"))

    _write_raw(tmp_path / "d", "metrics", good.replace_schema_metadata(None))
    with pytest.raises(SchemaError, match="not written by storage.Store"):
        migrate_store(str(tmp_path / "d"), str(tmp_path / "new-d"))


def test_tables_enforce_the_declared_schema(tmp_path):
    store = Store(str(tmp_path))
    with store.connect() as con:
        described = {r[0]: (r[1], r[2]) for r in con.execute(f"DESCRIBE {LAKE}.generations").fetchall()}
    assert described["example_id"] == ("VARCHAR", "NO") and described["seconds"] == ("DOUBLE", "YES")
    assert described["created_at"] == ("TIMESTAMP WITH TIME ZONE", "NO")
    # a writer that bypasses conform() still cannot store a null key: the format refuses it
    with store.connect() as con, pytest.raises(Exception, match="NOT NULL"):
        con.execute(f"INSERT INTO {LAKE}.generations (example_id, run_id, status, created_at) "
                    "VALUES (NULL, 'r', 'ok', now())")
    # a store whose tables are of a newer schema version is refused, naming the versions
    with store.connect() as con:
        con.execute(f"UPDATE {LAKE}.fastface_store SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this code's version"):
        Store(str(tmp_path))


# -- ids -----------------------------------------------------------------------------


def test_example_id_same_across_processes():
    here = ids.example_id(**BASE)
    code = (
        "import json, sys; from storage.ids import example_id, derive_seed, config_hash;"
        "kw = json.loads(sys.argv[1]);"
        "print(example_id(**kw), derive_seed(7, 'id-3', 'p-12'), config_hash(kw['preset_config']))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(BASE)], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"})
    there_id, there_seed, there_hash = out.stdout.split()
    assert there_id == here and len(here) == 32
    assert int(there_seed) == ids.derive_seed(7, "id-3", "p-12")
    assert there_hash == ids.config_hash(BASE["preset_config"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("identity_hash", "b" * 64),
        ("prompt", "a photo of a person in a parks"),
        ("model", "lightning"),
        ("preset", "ff-am2"),
        ("preset_config", {"dcg": {"alpha": [1.0, 3.0, 3.0, 1.5], "variant": "id"},
                           "am": {"kind": "am1", "blocks": ["up.0"]}}),
        ("ip_adapter_scale", 0.65),
        ("lora_scale", 0.5),
        ("seed", 1235),
        ("steps", 8),
        ("width", 768),
        ("height", 768),
        ("code_version", "fastface-0.1.1"),
    ],
)
def test_example_id_changes_with_every_field(field, value):
    assert ids.example_id(**dict(BASE, **{field: value})) != ids.example_id(**BASE)


def test_example_id_canonicalises_key_order_and_numbers():
    reordered = dict(reversed(list(BASE["preset_config"].items())))
    same = dict(BASE, preset_config=reordered, lora_scale=1, width=1024.0)
    assert ids.example_id(**same) == ids.example_id(**BASE)
    assert ids.config_hash({"a": 1, "b": [1.0, 2]}) == ids.config_hash({"b": [1, 2.0], "a": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        ids.config_hash({"a": float("nan")})


def test_derive_seed_stable_and_paired():
    s = ids.derive_seed(0, "id-1", "p-1")
    assert s == ids.derive_seed(0, "id-1", "p-1") and 0 <= s < 2**63
    others = {ids.derive_seed(0, "id-2", "p-1"), ids.derive_seed(0, "id-1", "p-2"), ids.derive_seed(1, "id-1", "p-1")}
    assert s not in others and len(others) == 3
    # ids are joined unambiguously (no "ab"+"c" == "a"+"bc")
    assert ids.derive_seed(0, "ab", "c") != ids.derive_seed(0, "a", "bc")
    # the seed has no preset/scale input at all: its signature is (run_seed, identity, prompt)
    import inspect

    assert list(inspect.signature(ids.derive_seed).parameters) == ["run_seed", "identity_id", "prompt_id"]
