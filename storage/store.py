"""The result tables as DuckLake tables, and image files, under one root (a folder or ``s3://``).

Layout under ``root``::

    catalog.sqlite                          the DuckLake catalog (local roots, by default)
    tables/main/<table>/run_id=<run>/*.parquet   table data, written and merged by DuckLake
    images/<run>/<example_id>.png           generated images (plain files)

The catalog is a SQL database: a SQLite file in the root by default (several processes on
one machine may write), or PostgreSQL for drivers on several machines (``catalog=`` or
``$FASTFACE_CATALOG``; an ``s3://`` root needs one of them, see docs/storage.md).

- Each :meth:`Store.append` is one DuckLake transaction: it commits whole or not at all,
  so a writer killed at any point leaves nothing a reader sees. Each append writes one
  small Parquet file; writers merge a table's small files every :data:`MERGE_EVERY_FILES`
  appends, and :meth:`Store.compact` (``fastface compact``, the end of ``fastface evaluate``) merges
  everything, expires old snapshots and deletes unused files. Readers read one snapshot
  per query, so compaction never shows them a row twice or hides one.
- Tables, columns and types are those of :mod:`storage.schemas`, enforced by the format
  (NOT NULL included) and checked when a store is opened.
- A retried write adds another row with the same key (:data:`storage.schemas.KEYS`);
  :meth:`Store.latest` and the catalog's views keep the latest by ``created_at`` (ties:
  the later insert).
- Images are written atomically through fsspec (local: hidden ``.tmp-*`` name +
  ``os.replace``; S3: one PUT).
- A store opens where it is: every attach passes this root's data path
  (``OVERRIDE_DATA_PATH``), a writer records a new location in the catalog, and
  :meth:`Store.resolve` reads files whose recorded address is that of an earlier location.
- ``read_only=True`` attaches the lake ``READ_ONLY`` and creates nothing (``fastface sql``,
  :mod:`storage.readonly`).
- :meth:`Store.snapshots` and :meth:`Store.restore` list DuckLake snapshots and bring the
  tables back to one (``fastface snapshots`` / ``fastface restore``).
- An unreachable S3 endpoint or catalog database is waited out for :func:`retry_seconds`
  (``$FASTFACE_STORAGE_RETRY_S``), then one line; a full disk is one line at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Mapping, Sequence

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.catalog_spec import catalog_attach_string, own_catalog, redact, store_catalog
from storage.credentials import duckdb_secret_fields, resolve_s3_credentials
from storage.duck import (StorageError, connect, load_extensions, open_database, quote_identifier as _q,
                          quote_literal as _lit)
from storage.faults import RETRY_ENV, Outage, no_space, pause_point, retryable, unreachable
from storage.layout import DATA_DIR, LAKE
from storage.s3 import check_endpoint_reachable, s3_endpoint_settings, s3_endpoint, s3_fs_options
from storage.schemas import KEYS, SCHEMA_VERSION, TABLES, SchemaError, conform, schema
from storage.views import ensure_views, latest_rows_sql

META_TABLE = "fastface_store"
INLINE_ROW_LIMIT = 0
"""DuckLake's data inlining (small inserts kept in the catalog) stays off: in DuckLake 1.5.5 a
flush of inlined rows racing a reader makes that reader miss the rows (measured here with a
SQLite catalog; duckdb/ducklake#1413, #650 report the same with PostgreSQL and duplicates with
concurrent inserts). Every append is one small Parquet file instead, merged as below."""
MERGE_EVERY_FILES = 200
"""A Store merges a table's small files after it has appended this many to it, so planning
and reports read a bounded number of files however long a run is."""
MERGE_MAX_FILE_BYTES = 32 * 2**20
"""Writers' merges leave files above this size alone (no rewriting of large files on every merge)."""
MIGRATE_COMMAND = "fastface migrate-store"

_STORE_KEY = re.compile(r"(?:^|/)((?:images|reports)/[A-Za-z0-9][A-Za-z0-9._-]*/[^/]+|identity_photos/[^/]+)$")
"""The part of a stored file's address that is relative to its store (images, reports, identity photos)."""
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_S3_PROTOCOLS = ("s3", "s3a")
_MAX_SINGLE_PUT = 5 * 2**30  # S3's limit for one PUT
_WRITE_ATTEMPTS = 8


def check_name(kind: str, value: str) -> str:
    """Run ids and example ids become path parts, so they must be plain names."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))


class Store:
    """DuckLake tables and image files under ``root`` (a local folder or ``s3://bucket/prefix``).

    ``catalog``: where the table catalog lives (default ``$FASTFACE_CATALOG``, else the
    SQLite file ``<root>/catalog.sqlite``); see :func:`catalog_attach_string`.
    ``storage_options`` go to the fsspec filesystem used for images. For ``s3://``,
    credentials come from the standard AWS chain (:mod:`storage.credentials`: environment,
    ``AWS_PROFILE`` and the shared files, web identity); the endpoint from
    ``$FASTFACE_S3_ENDPOINT_URL`` or ``$AWS_ENDPOINT_URL`` when set.
    A Store pickles as its (root, storage_options, catalog), so it can be handed to Ray workers.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None, *,
                 catalog: str | None = None, read_only: bool = False) -> None:
        if not root:
            raise ValueError("Store root is empty: pass a local folder or a URL such as s3://bucket/prefix")
        self._root_arg = root
        self.storage_options = dict(storage_options or {})
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        self.is_local = protocol in ("file", "local")
        self.is_s3 = protocol in _S3_PROTOCOLS
        if not (self.is_local or self.is_s3):
            raise StorageError(f"store root {root!r}: tables live in a local folder or on s3://bucket/prefix, "
                               f"not {protocol}://")
        options = dict(self.storage_options)
        if self.is_s3:
            resolve_s3_credentials(root)  # fail now, in one line, when the chain finds none
            self._s3 = s3_endpoint_settings()
            endpoint = s3_endpoint()
            if endpoint:
                check_endpoint_reachable(endpoint)

            options = s3_fs_options(options, endpoint)
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        # DuckDB knows s3fs by its first protocol name, so URIs always say s3://.
        self.protocol = "file" if self.is_local else "s3"
        self.read_only = read_only
        if self.is_local:
            path = os.path.abspath(path)
            if read_only:
                if not os.path.isdir(path):
                    raise StorageError(f"no store at {path}: the folder does not exist")
            else:
                os.makedirs(path, exist_ok=True)
        self.root = path.rstrip("/")
        self._check_not_old_layout()
        self.catalog = store_catalog(catalog, self.root if self.is_local else None)
        self._attach, self._catalog_extension = catalog_attach_string(self.catalog)
        self.data_path = f"{self.uri(self.root)}/{DATA_DIR}/"
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._lock_file = None
        self._appended_files = {t: 0 for t in TABLES}
        self._con: duckdb.DuckDBPyConnection | None = None
        self._pid = None
        if not read_only:
            self._connection()  # fail now, not at the first write (read-only opens check on first use)

    def __reduce__(self):
        return (_restore_store, (self._root_arg, self.storage_options, self.catalog, self.read_only))

    def __repr__(self) -> str:
        return f"Store({self.uri(self.root)!r}, catalog={redact(self.catalog)!r})"

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            if self.read_only and self._catalog_extension == "sqlite":
                _tidy_sqlite_reader_files(self._attach.split(":", 2)[2])

    @contextlib.contextmanager
    def catalog_lock(self, exclusive: bool):
        """Hold the catalog: shared to read, exclusive to commit (SQLite catalogs; a no-op for PostgreSQL).

        DuckLake 1.5.5 reads a snapshot's metadata from SQLite in several statements; a commit
        landing between them (a merge, measured here) can make a query see no rows at all. An
        ``flock`` on ``<catalog>.lock`` keeps commits and reads apart: readers share it,
        each commit takes it alone for the commit's duration. Re-entrant within a Store.
        """
        with self._lock:
            held = None  # the lock file this call flocks (none: PostgreSQL, re-entered, or a read-only medium)
            if self._catalog_extension in ("sqlite", None) and not self._lock_depth:
                held = self._catalog_lock_file()
            if held is not None:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if held is not None:
                    fcntl.flock(held.fileno(), fcntl.LOCK_UN)

    def _catalog_lock_file(self):
        """``<catalog>.lock``, opened once per process; None for a read-only store on a read-only medium (an
        archive: nothing can commit there, so no lock is needed)."""
        if self._lock_file is None or self._pid != os.getpid():
            path = (self._attach.split(":", 2)[2] if self._catalog_extension == "sqlite"
                    else self._attach[len("ducklake:"):]) + ".lock"
            try:
                self._lock_file = open(path, "a+b")
            except OSError:
                if not self.read_only:
                    raise
                return None
        return self._lock_file

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the DuckLake connection --------------------------------------------------

    def _check_not_old_layout(self) -> None:
        """Roots written by the per-file layout (``<table>/run_id=*/part-*.parquet``) need migrating."""
        if self.is_local:
            old = [t for t in TABLES if os.path.isdir(os.path.join(self.root, t))
                   and any(n.startswith("run_id=") for n in os.listdir(os.path.join(self.root, t)))]
        else:
            try:
                names = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)}
            except FileNotFoundError:
                names = set()
            old = [t for t in TABLES if t in names]
        if old:
            raise StorageError(
                f"{self.uri(self.root)} holds tables in the old one-file-per-batch layout ({', '.join(old)}/); "
                f"convert it once with: {MIGRATE_COMMAND} {self.uri(self.root)} NEW_ROOT"
            )

    def attach(self, con: duckdb.DuckDBPyConnection, read_only: bool | None = None) -> None:
        """Attach this store's DuckLake to ``con`` as :data:`LAKE` (extensions, S3 secret, retries).

        Always with this root's data path (``OVERRIDE_DATA_PATH``): the catalog records the data
        path it was created with, and a store that was moved, copied or synced elsewhere keeps its
        files where it now is (DuckLake's paths below the data path are relative).
        ``read_only`` (default: the Store's) attaches the lake ``READ_ONLY``: DuckDB refuses every write.
        """
        read_only = self.read_only if read_only is None else read_only
        needed = ["ducklake"] + ([self._catalog_extension] if self._catalog_extension else [])
        if self.is_s3:
            needed.append("httpfs")
        load_extensions(con, needed)
        con.execute("SET TimeZone='UTC'")
        if self.is_s3:
            # Resolved at each attach: temporary credentials (a role, a web identity) are refreshed.
            settings = {**duckdb_secret_fields(resolve_s3_credentials(self.uri(self.root))), **self._s3}
            fields = ", ".join(f"{k} {_lit(v)}" if k not in ("USE_SSL",) else f"{k} {v}" for k, v in settings.items())
            bucket = self.root.split("/", 1)[0]
            con.execute(f"CREATE OR REPLACE SECRET fastface_s3 (TYPE s3, {fields}, SCOPE {_lit('s3://' + bucket)})")
        # Concurrent appends race for the next snapshot id; DuckLake retries them itself.
        con.execute("SET ducklake_max_retry_count = 50")
        con.execute("SET ducklake_retry_wait_ms = 20")
        con.execute("SET ducklake_retry_backoff = 1.5")
        if self._catalog_extension == "sqlite" and not read_only:
            _sqlite_wal(self._attach.split(":", 2)[2])
        options = f"DATA_PATH {_lit(self.data_path)}, OVERRIDE_DATA_PATH true" + (", READ_ONLY" if read_only else "")
        try:
            con.execute(f"ATTACH {_lit(self._attach)} AS {LAKE} ({options})")
        except duckdb.Error as exc:
            raise StorageError(f"cannot open the table catalog {redact(self.catalog)} of {self.uri(self.root)}: "
                               f"{str(exc).splitlines()[0]}") from None

    def connect(self, database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A new DuckDB connection with this store's lake attached as :data:`LAKE`.

        ``read_only`` opens ``database`` read-only; the lake is attached read-only when the Store is."""
        if database == ":memory:":
            con = connect(())
        else:
            con = open_database(database, read_only=read_only)
        self.attach(con)
        return con

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._lock_file = None  # a forked child needs its own lock file description
            with self.catalog_lock(exclusive=not self.read_only):
                con = self.connect()
                if self.read_only:
                    self._check_readable(con)
                else:
                    self._ensure_tables(con)
            self._con, self._pid = con, os.getpid()
        return self._con

    def _drop_connection(self) -> None:
        """Forget a connection a service fault may have broken; the next use opens a new one."""
        with self._lock:
            if self._con is not None:
                try:
                    self._con.close()
                except duckdb.Error:
                    pass
                self._con = None

    def _committed(self, table: str, data: pa.Table) -> bool:
        """Whether a batch whose COMMIT lost its answer is in the table (its first row's key and time)."""
        try:
            first = data.slice(0, 1).to_pylist()[0]
            keys = [k for k in KEYS[table]] + ["created_at"]
            where = " AND ".join(f"{_q(k)} = ?" for k in keys)
            con = self._connection()
            with self.catalog_lock(exclusive=False):
                return bool(con.execute(f"SELECT count(*) FROM {LAKE}.{table} WHERE {where}",
                                        [first[k] for k in keys]).fetchone()[0])
        except (duckdb.Error, StorageError, OSError):
            return False  # still unreachable: the retry finds out

    def _check_readable(self, con) -> None:
        """A read-only open creates nothing: the tables must exist, in a schema version this code reads."""
        found = self._columns(con)
        if META_TABLE not in found or any(t not in found for t in TABLES):
            raise StorageError(f"{self.uri(self.root)} is not a FastFace store: its catalog {redact(self.catalog)} "
                               "has no FastFace tables (give the --root an evaluation wrote)")
        self._check_root(con, update=False)
        meta = dict(con.execute(f"SELECT key, value FROM {LAKE}.{META_TABLE}").fetchall())
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise SchemaError(f"the tables of {self.uri(self.root)} have schema version {version}, newer than this "
                              f"code's version {SCHEMA_VERSION}; upgrade fastface to read them")

    def _check_root(self, con, *, update: bool) -> None:
        """The catalog's data path is this root's, or the store was moved/copied here (its files are here).

        A catalog shared by two roots is refused (each root needs its own); a store whose files were
        moved, copied or synced to this root opens here, and a writer records the new root and data
        path in the catalog, so stock DuckDB attaching it without a DATA_PATH finds the files too.
        Checked before any table is read (a table's files are looked for under this root)."""
        row = con.execute(f"SELECT value FROM __ducklake_metadata_{LAKE}.ducklake_metadata "
                          "WHERE key = 'data_path'").fetchone()
        recorded = row[0] if row else None
        if recorded in (None, self.data_path):
            return
        own_file = self.catalog == own_catalog(self.root)  # moves with the folder
        if not own_file and not self._holds_catalog_files(con):
            old_root = recorded[: -len(DATA_DIR) - 2] if recorded.endswith(f"/{DATA_DIR}/") else recorded
            raise StorageError(f"catalog {redact(self.catalog)} belongs to the store {old_root}, not "
                               f"{self.uri(self.root)}; give each root its own catalog (database or file)")
        if update:
            self._record_location(con)

    def _holds_catalog_files(self, con) -> bool:
        """Whether this root holds the data file of the catalog's meta table (a copy of the store is here)."""
        try:
            files = con.execute(f"SELECT data_file FROM ducklake_list_files({_lit(LAKE)}, {_lit(META_TABLE)})"
                                ).fetchall()
        except duckdb.Error:
            return False
        if not files:
            return False
        path = files[0][0]
        try:
            return path.startswith(self.data_path) and self.fs.exists(self.fs._strip_protocol(path) if not self.is_local
                                                                       else path)
        except OSError:
            return False

    def _record_location(self, con) -> None:
        """Write this root into the catalog (meta table and DuckLake's ``data_path``) after a move or copy."""
        try:
            con.execute("BEGIN TRANSACTION")
            con.execute(f"UPDATE {LAKE}.{META_TABLE} SET value = ? WHERE key = 'root'", [self.uri(self.root)])
            con.execute("COMMIT")
        except duckdb.Error as exc:
            _rollback(con)
            raise StorageError(f"cannot record the new location {self.uri(self.root)} in the catalog: {exc}") from None
        try:
            con.execute(f"UPDATE __ducklake_metadata_{LAKE}.ducklake_metadata SET value = ? WHERE key = 'data_path'",
                        [self.data_path])
        except duckdb.Error:
            pass  # DuckDB's own opens keep working (they pass DATA_PATH); only stock tools would need it

    def _columns(self, con) -> dict[str, list[tuple[str, str, bool]]]:
        rows = con.execute(
            "SELECT table_name, column_name, data_type, is_nullable FROM duckdb_columns() "
            "WHERE database_name = ? AND schema_name = 'main' ORDER BY table_name, column_index", [LAKE]
        ).fetchall()
        out: dict[str, list[tuple[str, str, bool]]] = {}
        for table, column, type_, nullable in rows:
            out.setdefault(table, []).append((column, type_, nullable))
        return out

    def _ensure_tables(self, con) -> None:
        """Create the tables on first use; check the stored schema version and columns afterwards."""
        expected = {t: duck_columns(con, t) for t in TABLES}
        for attempt in range(_WRITE_ATTEMPTS):
            found = self._columns(con)
            missing = [t for t in (*TABLES, META_TABLE) if t not in found]
            if not missing:
                break
            try:
                # Options first: the meta rows below would otherwise be inlined in the catalog (the
                # default), and the first compaction's flush of them could race a reader opening the store.
                con.execute(f"CALL {LAKE}.set_option('data_inlining_row_limit', {INLINE_ROW_LIMIT})")
                con.execute(f"CALL {LAKE}.set_option('parquet_compression', 'zstd')")
                con.execute("BEGIN TRANSACTION")
                if META_TABLE in missing:
                    con.execute(f"CREATE TABLE IF NOT EXISTS {LAKE}.{META_TABLE} (key VARCHAR NOT NULL, value VARCHAR)")
                    con.execute(f"INSERT INTO {LAKE}.{META_TABLE} VALUES ('schema_version', ?), ('root', ?)",
                                [str(SCHEMA_VERSION), self.uri(self.root)])
                for table in TABLES:
                    if table in missing:
                        cols = ", ".join(f"{_q(n)} {t}{'' if nullable else ' NOT NULL'}"
                                         for n, t, nullable in expected[table])
                        con.execute(f"CREATE TABLE IF NOT EXISTS {LAKE}.{table} ({cols})")
                        con.execute(f"ALTER TABLE {LAKE}.{table} SET PARTITIONED BY (run_id)")
                con.execute("COMMIT")
            except duckdb.Error as exc:
                _rollback(con)
                if attempt == _WRITE_ATTEMPTS - 1 or not retryable(exc) and "already exists" not in str(exc):
                    raise StorageError(f"cannot create the tables of {self.uri(self.root)}: {exc}") from None
                time.sleep(0.05 + random.random() * 0.2)  # another process is creating them: look again
        self._check_root(con, update=True)
        meta = dict(con.execute(f"SELECT key, value FROM {LAKE}.{META_TABLE}").fetchall())
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise SchemaError(f"the tables of {self.uri(self.root)} have schema version {version}, newer than this "
                              f"code's version {SCHEMA_VERSION}; upgrade fastface to read them")
        found = found or self._columns(con)
        self._add_new_nullable_columns(con, expected, found, version)
        found = self._columns(con)
        for table in TABLES:
            have = {n: t for n, t, _ in found[table]}
            for name, type_, _ in expected[table]:
                if name not in have:
                    raise SchemaError(f"table {table!r} in {self.uri(self.root)} has no column {name!r} "
                                      f"(expected type {schema(table).field(name).type})")
                if have[name] != type_:
                    raise SchemaError(f"table {table!r} in {self.uri(self.root)}: column {name!r} is stored as "
                                      f"{have[name]}, expected {schema(table).field(name).type} ({type_})")
        self._ensure_views(con)

    def _ensure_views(self, con) -> None:
        """The deduplicated views stock DuckDB reads (:mod:`storage.views`); another writer may be adding them."""

        for attempt in range(_WRITE_ATTEMPTS):
            try:
                ensure_views(con, LAKE)
                return
            except duckdb.Error as exc:
                if attempt == _WRITE_ATTEMPTS - 1 or not retryable(exc) and "already exists" not in str(exc):
                    raise StorageError(f"cannot create the views of {self.uri(self.root)}: {exc}") from None
                time.sleep(0.05 + random.random() * 0.2)

    def _add_new_nullable_columns(self, con, expected, found, version: int) -> None:
        """Schema evolution: tables of an older schema version get the nullable columns added since
        (DuckLake's ALTER TABLE ADD COLUMN; old rows read them as NULL)."""
        if version >= SCHEMA_VERSION:
            return
        missing = [(table, name, type_) for table in TABLES
                   for name, type_, nullable in expected[table]
                   if nullable and name not in {n for n, _, _ in found[table]}]
        try:  # the caller (_connection) holds the exclusive catalog lock
            con.execute("BEGIN TRANSACTION")
            for table, name, type_ in missing:
                con.execute(f"ALTER TABLE {LAKE}.{table} ADD COLUMN IF NOT EXISTS {_q(name)} {type_}")
            con.execute(f"UPDATE {LAKE}.{META_TABLE} SET value = ? WHERE key = 'schema_version'",
                        [str(SCHEMA_VERSION)])
            con.execute("COMMIT")
        except duckdb.Error as exc:
            _rollback(con)
            raise StorageError(f"cannot upgrade the tables of {self.uri(self.root)} to schema version "
                               f"{SCHEMA_VERSION}: {exc}") from None

    def _sql(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        return self.query(sql, params)

    def _waiting_out_faults(self, work):
        """``work(con)``, retried on a new connection while a service under the store is unreachable
        (up to :func:`retry_seconds`); then one line (StorageError)."""
        outage = Outage()
        while True:
            try:
                return work(self._connection())
            except (duckdb.Error, StorageError) as exc:
                if not unreachable(exc):
                    raise
                self._drop_connection()
                outage.wait(lambda waited: (
                    f"reading {self.uri(self.root)} failed: the store was unreachable for {waited:.0f} s "
                    f"({str(exc).splitlines()[0]}); run again when it is back (${RETRY_ENV} sets the wait)"))

    # -- paths ---------------------------------------------------------------

    def uri(self, path: str) -> str:
        """A user-facing address of a path: a plain absolute path locally, else ``s3://...``."""
        return path if self.is_local else f"{self.protocol}://{path}"

    def _path(self, key_or_uri: str) -> str:
        """A filesystem path from a key relative to the root or a URI/path under the root."""
        if not self.is_local and "://" not in key_or_uri and os.path.isabs(key_or_uri):
            # a local file's address (e.g. recorded by a local store later synced to S3): not a key
            raise ValueError(f"{key_or_uri!r} is a local path, not under this store's root {self.uri(self.root)!r}")
        if "://" in key_or_uri or (self.is_local and os.path.isabs(key_or_uri)):
            path = self.fs._strip_protocol(key_or_uri) if not self.is_local else os.path.abspath(
                key_or_uri.split("://", 1)[-1]
            )
            if not (path == self.root or path.startswith(self.root + "/")):
                raise ValueError(f"{key_or_uri!r} is not under this store's root {self.uri(self.root)!r}")
            rel = path[len(self.root) + 1 :]
        else:
            rel = key_or_uri.strip("/")
        parts = rel.split("/")
        if not rel or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key_or_uri!r}")
        return f"{self.root}/{rel}"

    def image_key(self, run_id: str, example_id: str, ext: str = "png") -> str:
        return f"images/{check_name('run_id', run_id)}/{check_name('example_id', example_id)}.{ext}"

    def image_uri(self, run_id: str, example_id: str, ext: str = "png") -> str:
        return self.uri(self._path(self.image_key(run_id, example_id, ext)))

    # -- atomic byte writes (images, reports) ----------------------------------

    def _commit_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path`` atomically; waits out an unreachable S3 endpoint (:func:`retry_seconds`);
        a full disk or an endpoint gone for longer is one line (StorageError), with nothing left half-written."""
        outage = Outage()
        while True:
            try:
                return self._commit_bytes_once(path, data)
            except Exception as exc:  # OSErrors, our StorageErrors, and botocore errors that are neither
                if isinstance(exc, (OSError, StorageError)) and no_space(exc):
                    raise StorageError(f"writing {self.uri(path)} failed: no space left on the store's disk; nothing "
                                       "was half-written: free space and run again to resume") from None
                if self.is_local or not unreachable(exc):
                    raise
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                outage.wait(lambda waited: (
                    f"writing {self.uri(path)} failed: S3 was unreachable for {waited:.0f} s ({message}); run "
                    f"again when it is back to resume (${RETRY_ENV} sets the wait)"))

    def _commit_bytes_once(self, path: str, data: bytes) -> None:
        if self.is_local:
            directory, name = os.path.split(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{name}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.remove(tmp)
                except FileNotFoundError:
                    pass
                raise
        else:
            if len(data) >= _MAX_SINGLE_PUT:
                raise ValueError(f"{self.uri(path)}: {len(data)} bytes exceed one S3 PUT (5 GiB)")
            bucket, key, _ = self.fs.split_path(path)
            # One PutObject: S3 shows the whole object or nothing (s3fs.pipe_file may go multipart).
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
            self.fs.invalidate_cache(path)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically at ``key`` (relative to the root, or a URI under it); return its URI."""
        path = self._path(key)
        self._commit_bytes(path, bytes(data))
        return self.uri(path)

    def read_bytes(self, key: str) -> bytes:
        """The bytes at ``key``: relative to the root, a URI under it, or an address a moved store recorded
        (:meth:`resolve`)."""
        return self.fs.cat_file(self.resolve(key))

    def resolve(self, key_or_uri: str) -> str:
        """The path of a stored file: ``key_or_uri`` relative to the root or under it, or, for a store that
        was moved, copied or synced here, an address recorded where it was before.

        Tables written before a move hold absolute addresses of the old location
        (``/old/root/images/<run>/<id>.png``, ``s3://bucket/old/identity_photos/<hash>.png``): the
        part from the store's own folder on (:data:`_STORE_KEY`) is looked up under this root, and
        used when the file is here. Anything else outside the root stays a ValueError."""
        try:
            return self._path(key_or_uri)
        except ValueError:
            match = _STORE_KEY.search(key_or_uri)
            if match:
                path = f"{self.root}/{match.group(1)}"
                if self.exists(path if self.is_local else self.uri(path)):
                    return path
            raise

    def exists(self, key: str) -> bool:
        path = self._path(key)
        if not self.is_local:
            self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def write_image(self, run_id: str, example_id: str, data: bytes, ext: str = "png") -> str:
        """Write an image to ``images/<run>/<example_id>.<ext>``; return the URI for ``generations.image_uri``."""
        return self.write_bytes(self.image_key(run_id, example_id, ext), data)

    def image_ids(self, run_id: str, ext: str = "png") -> set[str]:
        """Example ids with an image under ``images/<run>/`` (one listing, not one request per image)."""
        directory = self._path(f"images/{check_name('run_id', run_id)}")
        if not self.is_local:
            self.fs.invalidate_cache(directory)
        try:
            paths = self.fs.find(directory)
        except FileNotFoundError:
            return set()
        suffix = "." + ext
        names = (p.rsplit("/", 1)[-1] for p in paths)
        return {n[: -len(suffix)] for n in names if n.endswith(suffix) and _visible(n)}

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete local ``.tmp-*`` image files left by writers that died (S3 never has any). Returns the count."""
        if not self.is_local:
            return 0
        removed, now = 0, time.time()
        for dirpath, _, names in os.walk(os.path.join(self.root, "images")):
            for name in names:
                full = os.path.join(dirpath, name)
                if name.startswith(".tmp-") and now - os.path.getmtime(full) > older_than_s:
                    os.remove(full)
                    removed += 1
        return removed

    # -- tables --------------------------------------------------------------

    def append(self, table: str, rows: "Sequence[Mapping] | pa.Table", run_id: str) -> int | None:
        """Validate ``rows`` against ``table``'s schema and append them in one transaction.

        ``run_id`` and ``created_at`` (now, UTC) fill rows that lack them; a row with another
        run id is an error. Returns the number of rows written, or None when there were none.
        """
        check_name("run_id", run_id)
        data = conform(table, rows, defaults={"run_id": run_id, "created_at": datetime.now(timezone.utc)})
        if data.num_rows == 0:
            return None
        if not pc.all(pc.equal(data.column("run_id"), run_id)).as_py():
            raise ValueError(f"table {table!r}: rows carry a run_id other than {run_id!r}; append each run separately")
        self._insert(table, data)
        return data.num_rows

    def _insert(self, table: str, data: pa.Table) -> None:
        """Insert a schema-exact table in one transaction, retrying when another writer won the commit.

        While the S3 endpoint or the catalog database is unreachable it waits and retries (a new
        connection each time) for up to :func:`retry_seconds`, then fails with one line; a full
        disk fails at once. Either way nothing of the batch is stored, so a re-run makes it again."""
        schema(table)
        attempt, outage = 0, Outage()
        while True:
            stage = "connect"
            try:
                con = self._connection()
                with self.catalog_lock(exclusive=True):
                    con.register("fastface_rows", data)
                    try:
                        stage = "insert"
                        con.execute("BEGIN TRANSACTION")
                        # By name: a table evolved by ADD COLUMN keeps its older column order.
                        columns = ", ".join(_q(name) for name in data.column_names)
                        con.execute(f"INSERT INTO {LAKE}.{table} ({columns}) SELECT {columns} FROM fastface_rows")
                        pause_point("in-transaction")
                        stage = "commit"
                        con.execute("COMMIT")
                        break
                    except duckdb.Error:
                        _rollback(con)
                        raise
                    finally:
                        try:
                            con.unregister("fastface_rows")
                        except duckdb.Error:
                            pass
            except (duckdb.Error, StorageError, OSError) as exc:
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if no_space(exc):
                    raise StorageError(f"append to {table!r} in {self.uri(self.root)} failed: no space left on the "
                                       f"store's disk ({message}); nothing of this batch was stored: free space and "
                                       "run again to resume") from None
                if unreachable(exc):
                    self._drop_connection()
                    if stage == "commit" and self._committed(table, data):
                        break  # the commit reached the catalog; only its answer was lost
                    outage.wait(lambda waited: (
                        f"append to {table!r} in {self.uri(self.root)} failed: the store was unreachable for "
                        f"{waited:.0f} s ({message}); nothing of this batch was stored: run again "
                        f"when it is back to resume (${RETRY_ENV} sets the wait)"))
                    continue
                attempt += 1
                if attempt >= _WRITE_ATTEMPTS or not retryable(exc):
                    raise StorageError(f"append to {table!r} in {self.uri(self.root)} failed: {message}") from None
            time.sleep(0.05 * 2**attempt * (0.5 + random.random()))
        self._appended_files[table] += 1
        if self._appended_files[table] >= MERGE_EVERY_FILES:
            self._appended_files[table] = 0
            try:
                self.merge(table, max_file_bytes=MERGE_MAX_FILE_BYTES)
            except StorageError:
                pass  # another process is merging or compacting; the next round tries again

    def merge(self, table: str | None = None, *, max_file_bytes: int | None = None) -> None:
        """Merge small adjacent Parquet files (of ``table``, or all); files above ``max_file_bytes`` stay."""
        args = [_lit(LAKE)] + ([_lit(table)] if table else [])
        if max_file_bytes:
            args.append(f"max_file_size => {int(max_file_bytes)}")
        con = self._connection()
        with self.catalog_lock(exclusive=True):
            self._call_retrying(con, f"CALL ducklake_merge_adjacent_files({', '.join(args)})", "merging files of")

    def flush(self, table: str | None = None) -> int:
        """Write the rows inlined in the catalog (of ``table``, or all) to Parquet; returns rows flushed."""
        con = self._connection()
        with self.catalog_lock(exclusive=True):
            extra = f", table_name => {_lit(table)}" if table else ""
            flushed = self._call_retrying(con, f"CALL ducklake_flush_inlined_data({_lit(LAKE)}{extra})", "flushing")
            return int(sum(r[-1] for r in flushed))

    def compact(self, *, expire_older_than: timedelta = timedelta(days=7),
                cleanup_older_than: timedelta = timedelta(hours=1)) -> dict[str, int]:
        """Maintenance: flush inlined rows, merge small Parquet files, expire old snapshots, delete unused files.

        Snapshots older than ``expire_older_than`` stop being readable by time travel (keep it
        longer than the longest query: a query still reading an expired snapshot loses rows); files
        that merging or expiry made unused (and files of writers that died before committing)
        are deleted once older than ``cleanup_older_than``, so queries running meanwhile keep
        their files. Readers never see a row twice or miss one while this runs: each query
        reads one snapshot. Returns counts of what was done.
        """
        now = datetime.now(timezone.utc)
        con = self._connection()
        with self.catalog_lock(exclusive=True):
            before = self._file_count(con)
            flushed = self.flush()  # rows inlined by other tools or older versions (this one inlines none)
            call = self._call_retrying
            self.merge()
            expired = call(con, f"CALL ducklake_expire_snapshots({_lit(LAKE)}, older_than => ?)",
                           "expiring snapshots of", [now - expire_older_than])
            cleaned = call(con, f"CALL ducklake_cleanup_old_files({_lit(LAKE)}, older_than => ?)",
                           "deleting old files of", [now - cleanup_older_than])
            orphans = call(con, f"CALL ducklake_delete_orphaned_files({_lit(LAKE)}, older_than => ?)",
                           "deleting orphaned files of", [now - cleanup_older_than])
            after = self._file_count(con)
        return {"rows_flushed": flushed, "files_before": before, "files_after": after,
                "snapshots_expired": len(expired), "files_deleted": len(cleaned) + len(orphans)}

    # -- snapshots: listing and undo ----------------------------------------------

    def snapshots(self, limit: int | None = 50) -> tuple[list[dict], int]:
        """The latest ``limit`` DuckLake snapshots, newest first, and how many there are.

        Each: ``snapshot_id``, ``time`` (UTC), ``changes`` (one line: what the commit did, tables
        by name) and ``message`` (set by :meth:`restore`). One bounded query."""
        con = self._connection()
        with self.catalog_lock(exclusive=False):
            total = con.execute(f"SELECT count(*) FROM {LAKE}.snapshots()").fetchone()[0]
            rows = con.execute(f"SELECT snapshot_id, snapshot_time, changes, commit_message FROM {LAKE}.snapshots() "
                               "ORDER BY snapshot_id DESC" + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
            names = dict(con.execute(f"SELECT DISTINCT table_id::VARCHAR, table_name FROM "
                                     f"__ducklake_metadata_{LAKE}.ducklake_table").fetchall())
        out = []
        for snapshot_id, when, changes, message in rows:
            parts = []
            for kind, items in (changes or {}).items():
                shown = [names.get(str(i), str(i)).removeprefix("main.") for i in items]
                parts.append(f"{kind.removeprefix('tables_').replace('_', ' ')} {', '.join(shown)}")
            out.append({"snapshot_id": int(snapshot_id), "time": when, "changes": "; ".join(parts),
                        "message": message})
        return out, int(total)

    def snapshot_before(self, when: datetime) -> int:
        """The id of the latest snapshot committed before ``when`` (a timezone-aware time)."""
        con = self._connection()
        with self.catalog_lock(exclusive=False):
            row = con.execute(f"SELECT max(snapshot_id) FROM {LAKE}.snapshots() WHERE snapshot_time < ?",
                              [when]).fetchone()
        if row[0] is None:
            raise ValueError(f"the store {self.uri(self.root)} has no snapshot before {when.isoformat()}")
        return int(row[0])

    def restore(self, snapshot_id: int) -> dict[str, int]:
        """Bring every table back to its contents at ``snapshot_id`` in one new snapshot (one transaction).

        DuckLake time travel (``AT (VERSION => N)``): each table changed since the snapshot is
        emptied and refilled with its rows as of then, so the new snapshot's contents equal
        snapshot N's; later snapshots stay (a restore can itself be undone) until
        :meth:`compact` expires them. The caller holds the runs' locks (``fastface restore``
        does). Returns ``{table: rows now}`` of the tables restored."""
        snapshot_id = int(snapshot_id)
        con = self._connection()
        restored: dict[str, int] = {}
        with self.catalog_lock(exclusive=True):
            current = con.execute(f"SELECT id FROM {LAKE}.current_snapshot()").fetchone()[0]
            known = con.execute(f"SELECT count(*) FROM {LAKE}.snapshots() WHERE snapshot_id = ?",
                                [snapshot_id]).fetchone()[0]
            if not known:
                raise ValueError(f"the store {self.uri(self.root)} has no snapshot {snapshot_id} (list them with "
                                 f"fastface snapshots --root {self.uri(self.root)}; compaction expires old ones)")
            if snapshot_id >= current:
                return {}
            # Rows touched since the snapshot (inserted, deleted or updated), by DuckLake's row ids, and
            # those rows as they were: read before the transaction (snapshot N never changes), so the
            # transaction only deletes and inserts. Sized by the change, not by the table.
            plan = []
            try:
                for table in TABLES:
                    touched, old_rows = f"_restore_touched_{table}", f"_restore_rows_{table}"
                    con.execute(f"CREATE OR REPLACE TEMP TABLE {touched} AS SELECT DISTINCT rowid AS id FROM "
                                f"ducklake_table_changes({_lit(LAKE)}, 'main', {_lit(table)}, ?, ?)",
                                [snapshot_id + 1, current])
                    if not con.execute(f"SELECT count(*) FROM {touched}").fetchone()[0]:
                        con.execute(f"DROP TABLE {touched}")
                        continue
                    con.execute(f"CREATE OR REPLACE TEMP TABLE {old_rows} AS SELECT * FROM {LAKE}.{table} "
                                f"AT (VERSION => {snapshot_id}) WHERE rowid IN (SELECT id FROM {touched})")
                    plan.append((table, touched, old_rows))
                con.execute("BEGIN TRANSACTION")
                for table, touched, old_rows in plan:
                    con.execute(f"DELETE FROM {LAKE}.{table} WHERE rowid IN (SELECT id FROM {touched})")
                    con.execute(f"INSERT INTO {LAKE}.{table} BY NAME SELECT * FROM {old_rows}")
                con.execute(f"CALL {LAKE}.set_commit_message('fastface restore', ?)",
                            [f"restored to snapshot {snapshot_id}"])
                con.execute("COMMIT")
                for table, _, _ in plan:
                    restored[table] = con.execute(f"SELECT count(*) FROM {LAKE}.{table}").fetchone()[0]
            except duckdb.Error as exc:
                _rollback(con)
                raise StorageError(f"restoring {self.uri(self.root)} to snapshot {snapshot_id} failed (nothing "
                                   f"changed): {str(exc).splitlines()[0]}") from None
            finally:
                for _, touched, old_rows in plan:
                    for name in (touched, old_rows):
                        con.execute(f"DROP TABLE IF EXISTS {name}")
        return restored

    def _call_retrying(self, con, sql: str, what: str, params: Sequence[Any] | None = None) -> list[tuple]:
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                return con.execute(sql, params).fetchall()
            except duckdb.Error as exc:
                _rollback(con)
                if attempt == _WRITE_ATTEMPTS - 1 or not retryable(exc):
                    raise StorageError(f"{what} {self.uri(self.root)} failed: {str(exc).splitlines()[0]}") from None
            time.sleep(0.05 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def _file_count(self, con) -> int:
        return sum(con.execute(f"SELECT count(*) FROM ducklake_list_files({_lit(LAKE)}, ?)", [t]).fetchone()[0]
                   for t in TABLES)

    def data_files(self, table: str) -> list[str]:
        """The Parquet files of ``table``'s current snapshot (rows inlined in the catalog have none)."""
        if table != META_TABLE:
            schema(table)
        return sorted(self._sql(f"SELECT data_file FROM ducklake_list_files({_lit(LAKE)}, ?)", [table])
                      .column(0).to_pylist())

    def run_ids(self, table: str) -> list[str]:
        """Runs with at least one row in ``table``."""
        schema(table)
        return self._sql(f"SELECT DISTINCT run_id FROM {LAKE}.{table} ORDER BY run_id").column(0).to_pylist()

    def count(self, table: str, run_id: str | None = None) -> int:
        """Rows of ``table`` (all runs, or one), retried writes included."""
        where, params = _run_filter(run_id)
        schema(table)
        return self._sql(f"SELECT count(*) FROM {LAKE}.{table}{where}", params).column(0)[0].as_py()

    def read(
        self,
        table: str,
        run_id: str | None = None,
        filters: "pc.Expression | Sequence[tuple] | None" = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """All rows of ``table`` (or of one run), in insertion order.

        ``filters`` is a pyarrow compute expression or a list of ``(column, op, value)``
        tuples (ANDed, as in ``pyarrow.parquet``). Retried writes show up as several rows;
        use :meth:`latest` for one row per key.
        """
        fields = schema(table)
        where, params = _run_filter(run_id)
        names = ", ".join(_q(n) for n in fields.names)
        data = self._sql(f"SELECT {names} FROM {LAKE}.{table}{where} ORDER BY rowid", params)
        return _finish(table, data, filters, columns)

    def latest(
        self,
        table: str,
        keys: Sequence[str] | None = None,
        run_id: str | None = None,
        filters: "pc.Expression | Sequence[tuple] | None" = None,
    ) -> pa.Table:
        """One row per key (default :data:`storage.schemas.KEYS`), the latest by ``created_at``.

        Ties are broken by insertion order, as in the catalog's views. ``filters`` apply to
        the latest rows.
        """
        fields = schema(table)
        keys = list(keys or KEYS[table])
        for k in keys:
            if k not in fields.names:
                raise SchemaError(f"table {table!r} has no column {k!r}; columns are {fields.names}")
        where, params = _run_filter(run_id)
        names = ", ".join(_q(n) for n in fields.names)
        latest = latest_rows_sql(f"{LAKE}.{table}", f"{names}, rowid AS __rowid", ", ".join(_q(k) for k in keys))
        data = self._sql(f"SELECT {names} FROM ({latest}){where} ORDER BY __rowid", params)
        return _finish(table, data, filters, None)

    def list_ids(self, table: str, column: str, run_id: str | None = None) -> set:
        """The distinct values of ``column`` in ``table`` (all runs, or one)."""
        if column not in schema(table).names:
            raise SchemaError(f"table {table!r} has no column {column!r}; columns are {schema(table).names}")
        where, params = _run_filter(run_id)
        return set(self._sql(f"SELECT DISTINCT {_q(column)} FROM {LAKE}.{table}{where}", params).column(0).to_pylist())

    def query(self, sql: str, params: Sequence[Any] | None = None, **tables: pa.Table) -> pa.Table:
        """Run ``sql`` on this store's connection (tables as ``fastface_lake.<table>``).

        ``tables`` are pyarrow tables made visible to the query under their keyword names.
        """
        def work(con) -> pa.Table:
            with self.catalog_lock(exclusive=False):
                for name, value in tables.items():
                    con.register(name, value)
                try:
                    return con.execute(sql, params).to_arrow_table()
                finally:
                    for name in tables:
                        try:
                            con.unregister(name)
                        except duckdb.Error:
                            pass  # the connection broke: it is dropped and reopened

        return self._waiting_out_faults(work)


def _restore_store(root: str, storage_options: Mapping[str, Any], catalog: str | None,
                   read_only: bool = False) -> Store:
    return Store(root, storage_options, catalog=catalog, read_only=read_only)


def _sqlite_wal(path: str) -> None:
    """Put a SQLite catalog in WAL mode (persistent in the file): readers then never block a writer's commit."""
    import sqlite3

    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with sqlite3.connect(path, timeout=30) as db:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open the SQLite catalog {path}: {exc}") from None


def _tidy_sqlite_reader_files(path: str) -> None:
    """Remove the empty ``-wal``/``-shm`` files a read-only SQLite reader leaves (it may not delete them).

    Opened read-write for one read and closed: the last connection to a WAL database checkpoints
    an empty log and deletes both files; with another connection open SQLite leaves them, as it should."""
    import sqlite3

    wal = path + "-wal"
    try:
        if not os.path.exists(wal) or os.path.getsize(wal) != 0:
            return
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0.2)
        try:
            db.execute("PRAGMA schema_version").fetchone()
        finally:
            db.close()
    except (OSError, sqlite3.Error):
        pass  # a read-only medium, or a writer busy: the files stay, harmlessly


def _rollback(con) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # no transaction was open


def _run_filter(run_id: str | None) -> tuple[str, list]:
    if run_id is None:
        return "", []
    check_name("run_id", run_id)
    return " WHERE run_id = ?", [run_id]


def _finish(table: str, data: pa.Table, filters, columns) -> pa.Table:
    data = data.cast(schema(table))
    if filters is not None:
        if not isinstance(filters, pc.Expression):
            filters = pq.filters_to_expression(list(filters))
        data = data.filter(filters)
    if columns is not None:
        data = data.select(list(columns))
    return data


def duck_columns(con, table: str) -> list[tuple[str, str, bool]]:
    """``(name, DuckDB type, nullable)`` of ``table``'s declared schema."""
    fields = schema(table)
    types = [str(t) for t in con.from_arrow(fields.empty_table()).types]
    return [(f.name, t, f.nullable) for f, t in zip(fields, types)]


def latest_rows(data: pa.Table, keys: Sequence[str]) -> pa.Table:
    """Keep the last row per ``keys`` after a stable sort by ``created_at`` (ties: input order)."""
    if data.num_rows == 0:
        return data
    ordered = data.append_column("__pos", pa.array(range(data.num_rows), pa.int64()))
    ordered = ordered.sort_by([("created_at", "ascending"), ("__pos", "ascending")])
    ordered = ordered.set_column(ordered.schema.get_field_index("__pos"), "__pos",
                                 pa.array(range(ordered.num_rows), pa.int64()))
    last = ordered.group_by(list(keys), use_threads=False).aggregate([("__pos", "max")]).column("__pos_max")
    return ordered.take(pc.take(last, pc.sort_indices(last))).drop_columns(["__pos"])
