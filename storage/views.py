"""The deduplicated views stored in the lake, so stock DuckDB sees what ``fastface sql`` sees.

Schema ``latest`` of the DuckLake holds one view per table, ``latest.<table>``: one row per
key (:data:`storage.schemas.KEYS`), the latest by ``created_at`` (ties: the later insert) —
the same SQL as the ``<table>`` views of :class:`storage.catalog.Catalog`
(:func:`storage.store.latest_rows_sql`). Their SQL names ``main.<table>``, which DuckDB binds
in the view's own catalog, so they work under any ``ATTACH ... AS <name>``. With only
``duckdb`` and its ``ducklake`` (+ ``sqlite``) extension::

    ATTACH 'ducklake:sqlite:<root>/catalog.sqlite' AS lake (DATA_PATH '<root>/tables/', READ_ONLY);
    SELECT count(*) FROM lake.latest.metrics;       -- = fastface sql "SELECT count(*) FROM metrics"

A store gets (or, after a schema change, updates) the views whenever a writer opens it
(:meth:`storage.store.Store._connection`); a view is rewritten only when its columns differ.
"""

from __future__ import annotations

import duckdb

from storage.duck import quote_identifier as _q
from storage.schemas import KEYS, TABLES, schema

VIEW_SCHEMA = "latest"


def view_sql(table: str) -> str:
    from storage.store import latest_rows_sql

    columns = ", ".join(_q(n) for n in schema(table).names)
    keys = ", ".join(_q(k) for k in KEYS[table])
    return latest_rows_sql(f"main.{_q(table)}", columns, keys)


def ensure_views(con: duckdb.DuckDBPyConnection, lake: str) -> list[str]:
    """Create or update ``<lake>.latest.<table>`` where missing or stale; returns the views written."""
    found: dict[str, list[str]] = {}
    for view, column in con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = ? AND schema_name = ? "
            "ORDER BY table_name, column_index", [lake, VIEW_SCHEMA]).fetchall():
        found.setdefault(view, []).append(column)
    stale = [t for t in TABLES if found.get(t) != list(schema(t).names)]
    if not stale:
        return []
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {lake}.{VIEW_SCHEMA}")
        for table in stale:
            con.execute(f"CREATE OR REPLACE VIEW {lake}.{VIEW_SCHEMA}.{_q(table)} AS {view_sql(table)}")
        con.execute("COMMIT")
    except duckdb.Error:
        con.execute("ROLLBACK")
        raise
    return stale


__all__ = ["VIEW_SCHEMA", "ensure_views", "view_sql"]
