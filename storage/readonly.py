"""Read-only SQL over a store: what ``fastface sql`` and ``fastface app`` open.

:func:`open_readonly` returns a DuckDB connection with the store's lake attached ``READ_ONLY``
(DuckDB refuses every write to it), the deduplicated views of :func:`storage.views.create_views` defined,
and external access off: only the store's own data files (and its catalog file) can be read,
nothing can be written to disk, no database attached, no extension installed or loaded, and
the configuration is locked so no ``SET`` can give any of it back.

:func:`check_read_only_sql` refuses, before DuckDB sees it, every statement that is not a query
(``SELECT``, ``WITH``, ``FROM``, ``SHOW``, ``DESCRIBE``, ``SUMMARIZE``, ``EXPLAIN``), naming
what it tried; DuckDB's own restrictions stay as the second line of defence.
Changing a store stays the job of the commands made for it (``evaluate``, ``compact``,
``migrate-store``, ``restore``).
"""

from __future__ import annotations

from typing import Any, Mapping

import duckdb

from storage.duck import quote_literal as _lit
from storage.store import Store
from storage.views import create_views

ALLOWED_STATEMENTS = ("SELECT", "EXPLAIN")


class ReadOnlyError(ValueError):
    """A statement that would change something; the message names it and the command that may."""


def statement_kinds(sql: str) -> list[tuple[str, str]]:
    """``(DuckDB statement type, first line of the statement)`` of each statement in ``sql``."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ValueError(f"query failed: {str(exc).splitlines()[0]}") from None
    return [(s.type.name, " ".join(s.query.split())[:60]) for s in statements]


def check_read_only_sql(sql: str) -> None:
    """Raise :class:`ReadOnlyError` for the first statement of ``sql`` that is not a query."""
    for kind, text in statement_kinds(sql):
        if kind not in ALLOWED_STATEMENTS:
            if kind == "LOAD" and text:  # DuckDB's type of both INSTALL and LOAD
                kind = text.split()[0].upper()
            raise ReadOnlyError(
                f"refused: {kind} statement ({text!r}); fastface sql is read-only: it runs queries "
                "(SELECT, WITH, SHOW, DESCRIBE, EXPLAIN) on the store; change a store with fastface "
                "evaluate / compact / migrate-store / restore")


def restrict(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """External access off on ``con``: only ``store``'s own files stay readable; configuration locked."""
    directories = [store.data_path, store.uri(store.root) + "/"]
    paths = []
    if store.catalog.startswith("sqlite:"):
        paths.append(store._attach.split(":", 2)[2])
    elif not store.catalog.startswith(("postgres", "ducklake:postgres")):
        paths.append(store._attach[len("ducklake:"):])
    con.execute(f"SET allowed_directories = [{', '.join(_lit(d) for d in directories)}]")
    if paths:
        con.execute(f"SET allowed_paths = [{', '.join(_lit(p) for p in paths)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def readonly_store(root: str, *, catalog: str | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> Store:
    """A :class:`Store` whose lake is attached read-only (it creates nothing, not even a missing folder)."""
    return Store(root, storage_options, catalog=catalog, read_only=True)


def open_readonly(root: "str | Store", *, catalog: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """A new DuckDB connection on ``root``'s tables: lake read-only, views defined, external access off.

    The views are those of :class:`storage.catalog.Catalog` (``<table>`` deduplicated,
    ``<table>_raw`` every row); the tables are also reachable as ``fastface_lake.<table>``.
    For SQLite catalogs, hold ``store.catalog_lock(exclusive=False)`` around each query when a
    writer may be committing at the same time (see :meth:`Store.catalog_lock`), or use
    :func:`storage.catalog.readonly_catalog`, which does.
    """
    store = root if isinstance(root, Store) else readonly_store(root, catalog=catalog, storage_options=storage_options)
    with store.catalog_lock(exclusive=False):
        con = store.connect()
        try:
            store._check_readable(con)
            create_views(con)
            restrict(con, store)
        except BaseException:
            con.close()
            raise
    return con


__all__ = ["ALLOWED_STATEMENTS", "ReadOnlyError", "check_read_only_sql",
           "open_readonly", "readonly_store", "restrict", "statement_kinds"]
