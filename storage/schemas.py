"""The tables of docs/architecture.md, declared once as versioned pyarrow schemas.

:class:`storage.Store` creates the DuckLake tables from them and conforms every append to
them (:func:`conform`: column order and types, JSON columns, the allowed values of a few
columns); the catalog records :data:`SCHEMA_VERSION`, and a store of an older version is
evolved when opened, one of a newer version refused. :func:`check_table` checks the Parquet
files of the retired one-file-per-batch layout, which carry ``fastface.schema_version`` and
``fastface.table`` in their metadata, when ``fastface migrate-store`` imports them.
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from fastface.prompt_sets import PROMPT_KINDS

SCHEMA_VERSION = 3  # 2: generations.node; 3: examples.resolved_config, generations.metadata
"""Bump when a column is added, removed or retyped. A store of this version or older is read (an
older one gets its missing *nullable* columns as nulls); a newer one is refused."""

VERSION_KEY = b"fastface.schema_version"
TABLE_KEY = b"fastface.table"

TIMESTAMP = pa.timestamp("us", tz="UTC")


def _f(name: str, type_: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


_FIELDS: dict[str, list[pa.Field]] = {
    "runs": [
        _f("run_id", pa.string(), False),
        _f("created_at", TIMESTAMP, False),
        _f("kind", pa.string()),  # "dataset", "sweep", "metrics", "report", ...
        _f("config", pa.string()),  # JSON
        _f("code_version", pa.string()),
        _f("package_versions", pa.string()),  # JSON {package: version}
        _f("host", pa.string()),
    ],
    "identities": [
        _f("identity_id", pa.string(), False),
        _f("run_id", pa.string(), False),
        _f("gender", pa.string()),
        _f("age", pa.string()),
        _f("ethnicity", pa.string()),
        _f("image_uri", pa.string()),
        _f("content_hash", pa.string(), False),  # sha256 of the image bytes; see ids.content_hash
        _f("face_backend", pa.string()),
        _f("embedding", pa.list_(pa.float32())),
        _f("provenance", pa.string()),  # JSON
        _f("created_at", TIMESTAMP, False),
    ],
    "prompts": [
        _f("prompt_id", pa.string(), False),
        _f("run_id", pa.string(), False),
        _f("text", pa.string(), False),
        _f("kind", pa.string(), False),  # realistic | stylistic
        _f("style", pa.string()),  # the part before ';' of a stylistic prompt
        _f("created_at", TIMESTAMP, False),
    ],
    "examples": [
        _f("example_id", pa.string(), False),
        _f("run_id", pa.string(), False),
        _f("identity_id", pa.string(), False),
        _f("identity_hash", pa.string(), False),
        _f("prompt_id", pa.string(), False),
        _f("prompt", pa.string(), False),
        _f("prompt_kind", pa.string()),
        _f("model", pa.string(), False),
        _f("preset", pa.string(), False),
        _f("ip_adapter_scale", pa.float64(), False),
        _f("lora_scale", pa.float64(), False),
        _f("seed", pa.int64(), False),
        _f("steps", pa.int32(), False),
        _f("width", pa.int32(), False),
        _f("height", pa.int32(), False),
        _f("config_hash", pa.string(), False),
        _f("resolved_config", pa.string()),  # JSON: the DCG and AM this preset runs with on this model; v3
        _f("code_version", pa.string(), False),
        _f("created_at", TIMESTAMP, False),
    ],
    "generations": [
        _f("example_id", pa.string(), False),
        _f("run_id", pa.string(), False),
        _f("status", pa.string(), False),  # ok | failed
        _f("image_uri", pa.string()),
        _f("seconds", pa.float64()),
        _f("device", pa.string()),
        _f("worker", pa.string()),
        _f("node", pa.string()),  # the Ray node (id) that made the image; added in schema version 2
        _f("versions", pa.string()),  # JSON {package: version}
        _f("metadata", pa.string()),  # JSON: the pipeline's per-image record (resolved DCG/AM, UNet rows); v3
        _f("error", pa.string()),
        _f("created_at", TIMESTAMP, False),
    ],
    "metrics": [
        _f("example_id", pa.string(), False),
        _f("run_id", pa.string(), False),
        _f("metric", pa.string(), False),
        _f("value", pa.float64()),  # null when not defined (e.g. no face) or on error
        _f("detail", pa.string()),  # JSON
        _f("error", pa.string()),
        _f("created_at", TIMESTAMP, False),
    ],
}

TABLES: tuple[str, ...] = tuple(_FIELDS)

KEYS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id",),
    "identities": ("run_id", "identity_id"),
    "prompts": ("run_id", "prompt_id"),
    "examples": ("run_id", "example_id"),
    "generations": ("run_id", "example_id"),
    "metrics": ("run_id", "example_id", "metric"),
}
"""The key of "the" row of each table. A retried write appends another row with the same
key; readers that need one row per key keep the latest by ``created_at``."""

JSON_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset({"config", "package_versions"}),
    "identities": frozenset({"provenance"}),
    "examples": frozenset({"resolved_config"}),
    "generations": frozenset({"versions", "metadata"}),
    "metrics": frozenset({"detail"}),
}

ALLOWED_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("prompts", "kind"): frozenset(PROMPT_KINDS),
    ("examples", "prompt_kind"): frozenset(PROMPT_KINDS),
    ("generations", "status"): frozenset({"ok", "failed"}),
}


class SchemaError(ValueError):
    """A table or file does not match its declared schema."""


def schema(table: str) -> pa.Schema:
    """The pyarrow schema of ``table``, with the version metadata written into every file."""
    if table not in _FIELDS:
        raise SchemaError(f"unknown table {table!r}; the tables are {', '.join(TABLES)}")
    return pa.schema(
        _FIELDS[table], metadata={VERSION_KEY: str(SCHEMA_VERSION).encode(), TABLE_KEY: table.encode()}
    )


def check_table(table: str, data: pa.Table, *, source: str = "") -> pa.Table:
    """Check a table read from storage against the declared schema; return it in schema order.

    Extra columns are dropped; missing nullable columns of an older schema version are
    filled with nulls; anything else raises :class:`SchemaError`.
    """
    expected = schema(table)
    where = f" in {source}" if source else ""
    meta = data.schema.metadata or {}
    if VERSION_KEY not in meta:
        raise SchemaError(
            f"table {table!r}{where}: no {VERSION_KEY.decode()} metadata; the file was not written by "
            f"storage.Store (expected schema version {SCHEMA_VERSION})"
        )
    try:
        version = int(meta[VERSION_KEY])
    except ValueError:
        raise SchemaError(f"table {table!r}{where}: unreadable schema version {meta[VERSION_KEY]!r}") from None
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"table {table!r}{where}: schema version {version} is newer than this code's "
            f"version {SCHEMA_VERSION}; upgrade fastface to read it"
        )
    written_as = meta.get(TABLE_KEY, b"").decode()
    if written_as and written_as != table:
        raise SchemaError(f"table {table!r}{where}: the file was written as table {written_as!r}")
    columns = []
    for field in expected:
        idx = data.schema.get_field_index(field.name)
        if idx < 0:
            if version < SCHEMA_VERSION and field.nullable:
                columns.append(pa.nulls(data.num_rows, field.type))
                continue
            raise SchemaError(
                f"table {table!r}{where}: missing column {field.name!r} (expected type {field.type})"
            )
        column = data.column(idx)
        if not column.type.equals(field.type):
            raise SchemaError(
                f"table {table!r}{where}: column {field.name!r} has type {column.type}, "
                f"expected {field.type}"
            )
        if not field.nullable and column.null_count:
            raise SchemaError(f"table {table!r}{where}: column {field.name!r} has nulls but is required")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=expected)


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Casts that keep meaning: same type, nulls, number widening, string flavours, timestamps."""
    if src.equals(dst) or pa.types.is_null(src):
        return True
    if pa.types.is_floating(dst):
        return pa.types.is_integer(src) or pa.types.is_floating(src)
    if pa.types.is_integer(dst):
        return pa.types.is_integer(src)
    if pa.types.is_string(dst):
        return pa.types.is_string(src) or pa.types.is_large_string(src)
    if pa.types.is_timestamp(dst):
        return pa.types.is_timestamp(src)
    if pa.types.is_list(dst):
        return (pa.types.is_list(src) or pa.types.is_large_list(src)) and _castable(src.value_type, dst.value_type)
    return False


def _json_text(table: str, column: str, i: int, value):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as exc:
            raise SchemaError(f"table {table!r}: row {i} column {column!r} is not valid JSON: {exc}") from None
        return value
    return json_text(value)


def json_text(value) -> str:
    """The stored text of a JSON column's value: sorted keys, no spaces, no NaN. Workers that make
    rows call it themselves, so the driver that writes them only checks texts (a cheap, deduplicated parse)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_texts(table: str, column: str, values: list) -> list:
    """:func:`_json_text` of each value; a text seen before in this column is not parsed again (the
    driver writes every row of a run: a worker's ``versions`` is one text, repeated on each row)."""
    checked: set[str] = set()
    out = []
    for i, value in enumerate(values):
        if isinstance(value, str) and value in checked:
            out.append(value)
            continue
        text = _json_text(table, column, i, value)
        if isinstance(value, str):
            checked.add(value)
        out.append(text)
    return out


def conform(table: str, rows: "Sequence[Mapping] | pa.Table", *, defaults: Mapping | None = None) -> pa.Table:
    """Build a schema-exact table from rows about to be written, validating everything.

    ``rows`` is a list of dicts or a pyarrow table. ``defaults`` fill nulls and missing
    columns (e.g. ``run_id``, ``created_at``). JSON columns accept dicts/lists, which are
    serialised with sorted keys; strings there must parse as JSON. Unknown columns,
    missing required values, wrong types and values outside the allowed set raise
    :class:`SchemaError` naming the table and column.
    """
    expected = schema(table)
    names = set(expected.names)
    defaults = dict(defaults or {})
    columns: dict[str, "list | pa.ChunkedArray"] = {}
    if isinstance(rows, pa.Table):
        unknown = set(rows.column_names) - names
        if unknown:
            raise SchemaError(f"table {table!r}: unknown column(s) {sorted(unknown)}; columns are {expected.names}")
        n = rows.num_rows
        columns = {name: rows.column(name) for name in rows.column_names}
    else:
        rows = list(rows)
        n = len(rows)
        present: set[str] = set()
        for i, row in enumerate(rows):
            unknown = set(row) - names
            if unknown:
                raise SchemaError(
                    f"table {table!r}: row {i} has unknown column(s) {sorted(unknown)}; columns are {expected.names}"
                )
            present.update(row)
        columns = {name: [row.get(name) for row in rows] for name in expected.names if name in present}
    arrays = []
    for field in expected:
        values = columns.get(field.name)
        try:
            if field.name in JSON_COLUMNS.get(table, ()) and values is not None:
                if isinstance(values, pa.ChunkedArray):
                    values = values.to_pylist()
                values = _json_texts(table, field.name, values)
            if values is None:
                array = pa.nulls(n, field.type)
            elif isinstance(values, pa.ChunkedArray):
                if not _castable(values.type, field.type):
                    raise SchemaError(
                        f"table {table!r}: column {field.name!r} has type {values.type}, expected {field.type}"
                    )
                array = values.combine_chunks().cast(field.type)
            else:
                array = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
            raise SchemaError(
                f"table {table!r}: column {field.name!r} cannot be stored as {field.type}: {exc}"
            ) from None
        if field.name in defaults and defaults[field.name] is not None and array.null_count:
            array = pc.fill_null(array, pa.scalar(defaults[field.name], field.type))
        if not field.nullable and array.null_count:
            first = pc.index(pc.is_null(array), True).as_py()
            raise SchemaError(
                f"table {table!r}: required column {field.name!r} ({field.type}) is missing in row {first}"
            )
        allowed = ALLOWED_VALUES.get((table, field.name))
        if allowed is not None:
            bad = set(pc.unique(array.drop_null()).to_pylist()) - allowed
            if bad:
                raise SchemaError(
                    f"table {table!r}: column {field.name!r} has value(s) {sorted(bad)}; allowed: {sorted(allowed)}"
                )
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=expected)
