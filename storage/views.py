"""The deduplicated views stored in the lake, so stock DuckDB sees what ``fastface sql`` sees.

Schema ``latest`` of the DuckLake holds one view per table, ``latest.<table>``: one row per
key (:data:`storage.schemas.KEYS`), the latest by ``created_at`` (ties: the later insert) —
the same SQL as the ``<table>`` views of :class:`storage.catalog.Catalog`
(:func:`latest_rows_sql`). Their SQL names ``main.<table>``, which DuckDB binds
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
from storage.layout import LAKE
from storage.schemas import KEYS, TABLES, schema

VIEW_SCHEMA = "latest"


def latest_rows_sql(source: str, columns: str, keys: str) -> str:
    """SQL for one row per key of ``source``, the latest by ``created_at`` (ties: the later insert).

    Almost every key has one row (a second appears only when a failed write is retried or a
    score redone), so the window that picks the latest row runs only over keys seen more than
    once, found by grouping a 64-bit hash of the key (a hash shared by two keys only sends both
    through the window, which partitions by the keys themselves). At 8.7 M metric rows this is
    ~2.6× cheaper than one window over every row (benchmarks/bench_storage_scale.py).
    """
    repeated = f"(SELECT hash({keys}) AS _h FROM {source} GROUP BY _h HAVING count(*) > 1)"
    return (f"SELECT {columns} FROM {source} ANTI JOIN {repeated} d ON hash({keys}) = d._h "
            f"UNION ALL SELECT {columns} FROM {source} SEMI JOIN {repeated} d ON hash({keys}) = d._h "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY created_at DESC, rowid DESC) = 1")


def view_sql(table: str) -> str:
    columns = ", ".join(_q(n) for n in schema(table).names)
    keys = ", ".join(_q(k) for k in KEYS[table])
    return latest_rows_sql(f"main.{_q(table)}", columns, keys)


def create_views(con: duckdb.DuckDBPyConnection) -> None:
    """The temporary views ``<table>`` (deduplicated) and ``<table>_raw`` on ``con`` (lake attached as
    :data:`storage.layout.LAKE`): what :class:`storage.catalog.Catalog` and ``fastface sql`` query."""
    for table in TABLES:
        columns = ", ".join(_q(n) for n in schema(table).names)
        keys = ", ".join(_q(k) for k in KEYS[table])
        source = f"{LAKE}.main.{_q(table)}"
        con.execute(f"CREATE OR REPLACE TEMP VIEW {_q(table + '_raw')} AS SELECT {columns} FROM {source}")
        con.execute(f"CREATE OR REPLACE TEMP VIEW {_q(table)} AS {latest_rows_sql(source, columns, keys)}")


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
