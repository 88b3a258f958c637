"""A DuckDB catalog over a Store: one SQL view per table, deduplicated, offline for ``s3://`` too.

Views (temporary, per connection; re-created by :meth:`Catalog.refresh`):

- ``<table>``: one row per key (:data:`storage.schemas.KEYS`), the latest by
  ``created_at`` (ties: the later file name, then the later row), so a retried write
  never shows a row twice;
- ``<table>_raw``: every row of every visible file.

Both have exactly the schema's columns and types; a table with no files yet is an empty
view with those columns. For remote stores the Store's fsspec filesystem is registered
with DuckDB (``register_filesystem``), so ``s3://`` needs neither the httpfs extension
nor a network beyond the S3 endpoint. Views read only ``run_id=*/part-*.parquet``, so a
writer's temporary or hidden files are never seen.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from storage.schemas import KEYS, SCHEMA_VERSION, TABLES, VERSION_KEY, SchemaError, schema
from storage.store import Store


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class Catalog:
    """DuckDB views over ``store``'s tables. ``database`` is ``":memory:"`` or a file path.

    With ``auto_refresh`` (default) every :meth:`query` first re-creates the views of
    tables that had no files, so tables written after the catalog was opened appear.
    ``check_schemas`` verifies, when a table's view is first built over files, that every
    file's schema version is not newer than this code's and that the column types match.
    """

    def __init__(
        self,
        store: Store,
        database: str = ":memory:",
        *,
        auto_refresh: bool = True,
        check_schemas: bool = True,
        read_only: bool = False,
    ) -> None:
        self.store = store
        self.auto_refresh = auto_refresh
        self.check_schemas = check_schemas
        self.con = duckdb.connect(database, read_only=read_only)
        # Timestamps come back in UTC whatever the machine's zone.
        self.con.execute("SET TimeZone='UTC'")
        # Data files are never rewritten (new rows go to new files), so footers can be cached.
        self.con.execute("SET parquet_metadata_cache=true")
        if not store.is_local:
            self.con.register_filesystem(store.fs)
        self._with_files: set[str] = set()
        self._duck_types = {
            t: [str(x) for x in self.con.from_arrow(schema(t).empty_table()).types] for t in TABLES
        }
        self.refresh(force=True)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- views -----------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """(Re)create the views; without ``force`` only of tables that had no files."""
        for table in TABLES:
            if force or table not in self._with_files:
                self._create_views(table)

    def _create_views(self, table: str) -> None:
        fields = schema(table)
        types = self._duck_types[table]
        has_files = bool(self.store.files(table))
        q = _quote
        if has_files:
            glob = _literal(self.store.parquet_glob(table))
            if self.check_schemas:
                self._check_files(table, glob)
            casts = ", ".join(f"CAST({q(f.name)} AS {t}) AS {q(f.name)}" for f, t in zip(fields, types))
            source = (
                f"SELECT {casts}, filename AS __file, file_row_number AS __row "
                f"FROM read_parquet({glob}, hive_partitioning=true, hive_types_autocast=false, "
                f"union_by_name=true, filename=true, file_row_number=true)"
            )
        else:
            nulls = ", ".join(f"CAST(NULL AS {t}) AS {q(f.name)}" for f, t in zip(fields, types))
            source = f"SELECT {nulls}, CAST(NULL AS VARCHAR) AS __file, CAST(NULL AS BIGINT) AS __row WHERE false"
        columns = ", ".join(q(n) for n in fields.names)
        keys = ", ".join(q(k) for k in KEYS[table])
        try:
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {q('_' + table + '_files')} AS {source}")
        except duckdb.Error as exc:
            raise SchemaError(f"table {table!r}: cannot build its view over {self.store.parquet_glob(table)}: {exc}") from exc
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {q(table + '_raw')} AS SELECT {columns} FROM {q('_' + table + '_files')}")
        self.con.execute(
            f"CREATE OR REPLACE TEMP VIEW {q(table)} AS SELECT {columns} FROM {q('_' + table + '_files')} "
            f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY created_at DESC, __file DESC, __row DESC) = 1"
        )
        if has_files:
            self._with_files.add(table)
        else:
            self._with_files.discard(table)

    def _check_files(self, table: str, glob: str) -> None:
        versions = self.con.sql(
            f"SELECT file_name, decode(value) FROM parquet_kv_metadata({glob}) "
            f"WHERE decode(key) = {_literal(VERSION_KEY.decode())}"
        ).fetchall()
        for file_name, value in versions:
            if int(value) > SCHEMA_VERSION:
                raise SchemaError(
                    f"table {table!r} in {file_name}: schema version {value} is newer than this code's "
                    f"version {SCHEMA_VERSION}; upgrade fastface to read it"
                )
        found = {
            row[0]: row[1]
            for row in self.con.sql(
                f"DESCRIBE SELECT * FROM read_parquet({glob}, union_by_name=true, hive_partitioning=false)"
            ).fetchall()
        }
        for field, duck_type in zip(schema(table), self._duck_types[table]):
            if field.name not in found:
                raise SchemaError(f"table {table!r}: no file has column {field.name!r} (expected type {field.type})")
            if found[field.name] != duck_type:
                raise SchemaError(
                    f"table {table!r}: column {field.name!r} is stored as {found[field.name]} in some file(s) "
                    f"under {self.store.parquet_glob(table)}, expected {field.type} ({duck_type}); "
                    "Store.read names the file"
                )

    # -- queries ---------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run ``sql`` against the views and return the result as a pyarrow table."""
        if self.auto_refresh:
            self.refresh()
        return self.con.sql(sql, params=params).to_arrow_table()

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[dict]:
        return self.query(sql, params).to_pylist()

    def df(self, sql: str, params: Sequence[Any] | None = None):
        """The result as a pandas DataFrame (needs pandas installed)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise ImportError("Catalog.df needs pandas; install it or use Catalog.query (pyarrow)") from None
        return self.query(sql, params).to_pandas()

    def sql_table(self, sql: str, params: Sequence[Any] | None = None, max_rows: int = 50) -> str:
        """The result as an aligned text table, for ``fastface sql``."""
        return format_table(self.query(sql, params), max_rows=max_rows)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_table(table: pa.Table, max_rows: int = 50) -> str:
    """An aligned plain-text rendering of ``table`` (first ``max_rows`` rows, then a count)."""
    names = table.column_names
    shown = table.slice(0, max_rows).to_pylist()
    cells = [[_cell(row[n]) for n in names] for row in shown]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]

    def line(values: list[str]) -> str:
        return " | ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(names), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    more = table.num_rows - len(shown)
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}" + (f", {more} not shown)" if more else ")"))
    return "\n".join(out)
