"""Traceability columns in older stores. (That every image can be traced by SQL to the DCG/AM constants it
was made with, through the flows: tests/test_flows_chain.py::test_sql_traces_each_image_to_its_dcg_and_am.)"""

from __future__ import annotations


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
