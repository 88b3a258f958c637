"""FastFace storage layer: the result tables as a DuckLake (catalog in SQLite or PostgreSQL, Parquet
data on a folder or ``s3://``), image files, read-only SQL, sweep planning.

Layout under a root (a local folder, or ``s3://bucket/prefix``)::

    catalog.sqlite                                the DuckLake catalog (local roots, by default)
    tables/main/<table>/run_id=<run>/*.parquet    table data, written and merged by DuckLake
    images/<run>/<example_id>.png                 generated images (plain files)

- :mod:`storage.store` — :class:`Store`: connections, one DuckLake transaction per append
  (atomic), image bytes (atomic writes), compaction, snapshots, relocation, outages;
  :mod:`storage.layout` (names of the parts), :mod:`storage.catalog_spec` (where the catalog
  lives), :mod:`storage.faults` (outages waited out, conflicts retried, a full disk final),
  :mod:`storage.s3` (endpoint, client options), :mod:`storage.credentials` (the standard AWS chain).
- :mod:`storage.schemas` — the six tables, declared once as pyarrow schemas with their keys.
- A retried write adds another row with the same key; :mod:`storage.views` defines the
  deduplicated views (the latest row per key by ``created_at``): ``<table>`` in
  :class:`storage.catalog.Catalog` and ``fastface sql``, ``latest.<table>`` in the lake for
  stock DuckDB.
- ``example_id`` (:mod:`storage.ids`) hashes everything that determines an image, so
  :mod:`storage.plan` resumes any sweep by anti-joining planned ids with stored rows.
- :mod:`storage.readonly` opens a store for queries only (``fastface sql``, the app): the
  lake ``READ_ONLY``, the views defined, external access off.
- :mod:`storage.checks` — a store root is checked before anything opens it (one line).

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
