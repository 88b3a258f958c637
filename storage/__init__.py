"""FastFace storage layer: Parquet tables, images, a DuckDB catalog, sweep planning.

Layout under a root (a local folder, or any fsspec URL such as ``s3://bucket/prefix``)::

    runs/run_id=<run>/part-<uuid>.parquet
    identities/run_id=<run>/part-<uuid>.parquet
    prompts/run_id=<run>/part-<uuid>.parquet
    examples/run_id=<run>/part-<uuid>.parquet
    generations/run_id=<run>/part-<uuid>.parquet
    metrics/run_id=<run>/part-<uuid>.parquet
    images/<run>/<example_id>.png

- Schemas (:mod:`storage.schemas`) are declared once as pyarrow schemas; every file
  carries the schema version and table name in its Parquet metadata, checked on read.
- Files are only ever added, never rewritten, and every write is atomic (local: hidden
  ``.tmp-*`` name + ``os.replace``; S3: one PUT). Readers see only ``part-*.parquet``
  and skip names starting with ``.`` or ``_``.
- A retried write adds another row with the same key (:data:`storage.schemas.KEYS`);
  ``Store.latest`` and the catalog's views keep the latest by ``created_at``.
- ``example_id`` (:mod:`storage.ids`) hashes everything that determines an image, so
  :mod:`storage.plan` can resume any sweep by diffing planned ids against stored rows.
- :class:`storage.catalog.Catalog` puts DuckDB views over the tables (``<table>``
  deduplicated, ``<table>_raw`` all rows), offline for ``s3://`` through the Store's
  fsspec filesystem.

:mod:`storage.readonly` opens a store for queries only (``fastface sql``, the app):
``open_readonly(root)`` — the lake read-only, the views defined, external access off.

This layer imports pyarrow, duckdb and fsspec (s3fs for ``s3://``), never Ray or Prefect.
"""

from fastface.extras import require

require("pyarrow", "duckdb", "fsspec", needed_for="the storage layer (tables, SQL)")

from storage.catalog import Catalog, format_table  # noqa: E402
from storage.ids import bytes_sha256, canonical_json, config_hash, derive_seed, example_id  # noqa: E402
from storage.plan import (  # noqa: E402
    Sweep, plan_missing_examples, plan_missing_generations, plan_missing_metrics, plan_missing_metrics_table,
)
from storage.schemas import KEYS, SCHEMA_VERSION, TABLES, SchemaError, schema  # noqa: E402
from storage.store import Store, latest_rows  # noqa: E402

__all__ = [
    "bytes_sha256",
    "Catalog",
    "KEYS",
    "SCHEMA_VERSION",
    "SchemaError",
    "Store",
    "Sweep",
    "TABLES",
    "canonical_json",
    "config_hash",
    "derive_seed",
    "example_id",
    "format_table",
    "latest_rows",
    "plan_missing_examples",
    "plan_missing_generations",
    "plan_missing_metrics",
    "plan_missing_metrics_table",
    "schema",
]
