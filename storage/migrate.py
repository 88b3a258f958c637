"""``fastface migrate-store OLD NEW``: copy a root of the one-Parquet-file-per-batch layout into DuckLake.

The old layout, written by FastFace before the table format::

    <table>/run_id=<run>/part-<uuid>.parquet     one file per append (schema version in its metadata)
    images/<run>/<example_id>.png
    anything else (reports, identity photos)     copied as is

Every old file is read and checked against :mod:`storage.schemas` (version, table name,
column types; files of an older version get their missing nullable columns as nulls),
then each table's rows go into the new store in a few large transactions, keeping
``run_id`` and ``created_at`` so the latest-row-per-key answer is unchanged. Other files
are copied, and ``image_uri`` values that pointed under OLD are rewritten to NEW. The new
root must be empty; the old one is left untouched.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.duck import StorageError
from storage.schemas import TABLES, SchemaError, check_table, schema
from storage.layout import CATALOG_FILE, DATA_DIR
from storage.s3 import s3_endpoint
from storage.store import Store

_CHUNK_ROWS = 500_000
_URI_COLUMNS = {"identities": "image_uri", "generations": "image_uri"}


def _filesystem(root: str, storage_options: Mapping[str, Any] | None):
    options = dict(storage_options or {})
    if root.startswith(("s3://", "s3a://")):
        endpoint = s3_endpoint()
        if endpoint:
            options.setdefault("endpoint_url", endpoint)
        options.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(root, **options)
    local = "://" not in root or root.startswith("file://")
    path = os.path.abspath(path) if local else path.rstrip("/")
    return fs, path, (lambda p: p if local else f"s3://{p}")


def old_layout_files(fs, root: str, table: str) -> list[str]:
    """Visible ``part-*.parquet`` files of ``table`` in the old layout, sorted (the old readers' order)."""
    base = f"{root}/{table}"
    try:
        found = sorted(fs.find(base))
    except FileNotFoundError:
        return []
    out = []
    for path in found:
        rel = path[len(base) + 1:].split("/")
        if (len(rel) == 2 and rel[0].startswith("run_id=") and rel[1].startswith("part-")
                and rel[1].endswith(".parquet") and not any(p.startswith((".", "_")) for p in rel)):
            out.append(path)
    return out


def read_old_table(fs, root: str, table: str, uri: Callable[[str], str]) -> pa.Table:
    """All rows of ``table`` in the old layout, every file schema-checked (errors name the file)."""
    parts = []
    for path in old_layout_files(fs, root, table):
        source = uri(path)
        try:
            with fs.open(path, "rb") as f:
                raw = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise SchemaError(f"table {table!r}: cannot read {source}: {exc}") from exc
        part = check_table(table, raw, source=source)
        partition = path.rsplit("/", 2)[-2][len("run_id="):]
        if part.num_rows and not pc.all(pc.equal(part.column("run_id"), partition)).as_py():
            raise SchemaError(f"table {table!r} in {source}: run_id column disagrees with partition {partition!r}")
        parts.append(part)
    return pa.concat_tables(parts) if parts else schema(table).empty_table()


def migrate_store(old_root: str, new_root: str, *, storage_options: Mapping[str, Any] | None = None,
                  catalog: str | None = None, log: Callable[[str], None] = lambda _: None) -> dict[str, int]:
    """Copy the old-layout root ``old_root`` into a new DuckLake store at ``new_root``; returns rows per table."""
    fs, old, uri = _filesystem(old_root, storage_options)
    if not fs.exists(old):
        raise FileNotFoundError(f"{old_root} does not exist")
    if not any(old_layout_files(fs, old, t) for t in TABLES):
        raise StorageError(f"{old_root} holds no tables in the old layout (<table>/run_id=*/part-*.parquet); "
                           "nothing to migrate")
    new_fs, new, new_uri = _filesystem(new_root, storage_options)
    if new_fs.exists(new) and new_fs.ls(new):
        raise StorageError(f"{new_root} is not empty: migrate into a new, empty root")
    # Read (and check) everything before writing anything, so a bad file leaves NEW untouched.
    tables = {t: read_old_table(fs, old, t, uri) for t in TABLES}
    store = Store(new_root, storage_options, catalog=catalog)
    old_prefix, new_prefix = uri(old) + "/", store.uri(store.root) + "/"
    counts = {}
    for table, data in tables.items():
        column = _URI_COLUMNS.get(table)
        if column and data.num_rows:
            values = data.column(column)
            moved = pc.if_else(pc.starts_with(values, old_prefix),
                               pc.binary_join_element_wise(new_prefix, pc.utf8_slice_codeunits(
                                   values, len(old_prefix)), ""), values)
            data = data.set_column(data.schema.get_field_index(column), schema(table).field(column), moved)
        for start in range(0, data.num_rows, _CHUNK_ROWS):
            store._insert(table, data.slice(start, _CHUNK_ROWS))
        counts[table] = data.num_rows
        log(f"{table}: {data.num_rows} rows")
    copied = 0
    for path in sorted(fs.find(old)):
        rel = path[len(old) + 1:]
        top = rel.split("/", 1)[0]
        if top in TABLES or top in (DATA_DIR, CATALOG_FILE) or rel.rsplit("/", 1)[-1].startswith(".tmp-"):
            continue
        store.write_bytes(rel, fs.cat_file(path))
        copied += 1
    log(f"other files (images, reports): {copied}")
    store.compact()
    store.close()
    return dict(counts, files_copied=copied)
