"""A folder of Parquet tables and images on a local disk or any fsspec URL (``s3://`` via s3fs).

Layout under ``root``::

    <table>/run_id=<run>/part-<uuid>.parquet     one file per append, never rewritten
    images/<run>/<example_id>.png                generated images

Writes are atomic: a writer that dies at any point leaves nothing a reader sees.
Locally a file is written under a hidden name (``.tmp-...``) in the same folder and
moved into place with ``os.replace``; on S3 the object is sent in one PUT (S3 never
shows a partial object, and no multipart upload is ever started). Readers only see
``part-*.parquet`` files and skip every name that starts with ``.`` or ``_``.
"""

from __future__ import annotations

import io
import os
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from storage.schemas import KEYS, SchemaError, check_table, conform, schema

ENDPOINT_ENV_VARS = ("FASTFACE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
PAUSE_AT_ENV = "FASTFACE_STORAGE_PAUSE_AT"
"""Test hook: name of a point in the write path ("mid-write", "before-commit") at which
the writer touches the file named by ``FASTFACE_STORAGE_PAUSE_MARKER`` and sleeps for
``FASTFACE_STORAGE_PAUSE_S`` seconds (default an hour), so a test can kill it there."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_S3_PROTOCOLS = ("s3", "s3a")
_MAX_SINGLE_PUT = 5 * 2**30  # S3's limit for one PUT
_ROW_GROUP_ROWS = 64 * 1024


def _pause_point(point: str) -> None:
    if os.environ.get(PAUSE_AT_ENV) != point:
        return
    marker = os.environ.get("FASTFACE_STORAGE_PAUSE_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    time.sleep(float(os.environ.get("FASTFACE_STORAGE_PAUSE_S", "3600")))


def check_name(kind: str, value: str) -> str:
    """Run ids and example ids become path parts, so they must be plain names."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"{kind} {value!r} is not a valid name: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _visible(parts: Iterable[str]) -> bool:
    return not any(p.startswith((".", "_")) for p in parts)


class Store:
    """Parquet tables and image bytes under ``root`` (a local folder or an fsspec URL).

    ``storage_options`` go to the fsspec filesystem. For ``s3://`` credentials come from
    the environment / the standard AWS chain only; the endpoint defaults to
    ``$FASTFACE_S3_ENDPOINT_URL`` or ``$AWS_ENDPOINT_URL`` when set.
    A Store pickles as its (root, storage_options), so it can be handed to Ray workers.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not root:
            raise ValueError("Store root is empty: pass a local folder or a URL such as s3://bucket/prefix")
        self._root_arg = root
        self.storage_options = dict(storage_options or {})
        protocol = root.split("://", 1)[0] if "://" in root else "file"
        options = dict(self.storage_options)
        if protocol in _S3_PROTOCOLS:
            endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
            client_kwargs = options.get("client_kwargs") or {}
            if endpoint and "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
                options["endpoint_url"] = endpoint
            # Other processes write here: a cached listing would hide their files.
            options.setdefault("use_listings_cache", False)
            from storage.checks import S3_CLIENT_CONFIG  # a dead endpoint fails in seconds, not after a minute

            options.setdefault("config_kwargs", S3_CLIENT_CONFIG)
        self.fs, path = fsspec.core.url_to_fs(root, **options)
        self.is_local = protocol in ("file", "local")
        self.is_s3 = protocol in _S3_PROTOCOLS
        # DuckDB knows s3fs by its first protocol name, so URIs always say s3://.
        self.protocol = "file" if self.is_local else ("s3" if self.is_s3 else protocol)
        if self.is_local:
            path = os.path.abspath(path)
            os.makedirs(path, exist_ok=True)
        self.root = path.rstrip("/")

    def __reduce__(self):
        return (Store, (self._root_arg, self.storage_options))

    def __repr__(self) -> str:
        return f"Store({self.uri(self.root)!r})"

    # -- paths ---------------------------------------------------------------

    def uri(self, path: str) -> str:
        """A user-facing address of a path: a plain absolute path locally, else ``proto://...``."""
        return path if self.is_local else f"{self.protocol}://{path}"

    def _path(self, key_or_uri: str) -> str:
        """A filesystem path from a key relative to the root or a URI/path under the root."""
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

    def table_dir(self, table: str) -> str:
        schema(table)  # validates the name
        return f"{self.root}/{table}"

    def partition_dir(self, table: str, run_id: str) -> str:
        return f"{self.table_dir(table)}/run_id={check_name('run_id', run_id)}"

    def parquet_glob(self, table: str) -> str:
        """The glob (as a URI) matching every visible data file of ``table``, for DuckDB."""
        return self.uri(f"{self.table_dir(table)}/run_id=*/part-*.parquet")

    def image_key(self, run_id: str, example_id: str, ext: str = "png") -> str:
        return f"images/{check_name('run_id', run_id)}/{check_name('example_id', example_id)}.{ext}"

    def image_uri(self, run_id: str, example_id: str, ext: str = "png") -> str:
        return self.uri(self._path(self.image_key(run_id, example_id, ext)))

    # -- atomic byte writes --------------------------------------------------

    def _commit_bytes(self, path: str, data: bytes) -> None:
        if self.is_local:
            self._commit_local(path, lambda f: f.write(data))
        elif self.is_s3:
            self._put_s3(path, data)
        else:
            # gcs/azure/memory: a one-shot pipe of the whole object is the atomic primitive there.
            _pause_point("before-commit")
            self.fs.pipe_file(path, data)

    def _commit_local(self, path: str, write) -> None:
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            _pause_point("before-commit")
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            raise

    def _put_s3(self, path: str, data: bytes) -> None:
        if len(data) >= _MAX_SINGLE_PUT:
            raise ValueError(
                f"{self.uri(path)}: {len(data)} bytes exceed one S3 PUT (5 GiB); append fewer rows per call"
            )
        bucket, key, _ = self.fs.split_path(path)
        _pause_point("before-commit")
        # One PutObject: S3 shows the whole object or nothing. (s3fs.pipe_file would switch
        # to a multipart upload above its chunk size.)
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data)
        self.fs.invalidate_cache(path)

    def write_bytes(self, key: str, data: bytes) -> str:
        """Write ``data`` atomically at ``key`` (relative to the root, or a URI under it); return its URI."""
        path = self._path(key)
        self._commit_bytes(path, bytes(data))
        return self.uri(path)

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

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
        suffix = "." + ext
        return {
            name[: -len(suffix)]
            for name in (p.rsplit("/", 1)[-1] for p in self._find(directory))
            if name.endswith(suffix) and _visible([name])
        }

    # -- tables --------------------------------------------------------------

    def append(self, table: str, rows: "Sequence[Mapping] | pa.Table", run_id: str) -> str | None:
        """Validate ``rows`` against ``table``'s schema and write them as one new file, atomically.

        ``run_id`` and ``created_at`` (now, UTC) fill rows that lack them; a row with another
        run id is an error. Returns the new file's URI, or None when there were no rows.
        """
        check_name("run_id", run_id)
        data = conform(table, rows, defaults={"run_id": run_id, "created_at": datetime.now(timezone.utc)})
        if data.num_rows == 0:
            return None
        if not pc.all(pc.equal(data.column("run_id"), run_id)).as_py():
            raise ValueError(f"table {table!r}: rows carry a run_id other than {run_id!r}; append each run separately")
        path = f"{self.partition_dir(table, run_id)}/part-{uuid.uuid4().hex}.parquet"
        self._write_parquet(path, data)
        return self.uri(path)

    def _write_parquet(self, path: str, data: pa.Table) -> None:
        def write(f) -> None:
            with pq.ParquetWriter(f, data.schema, compression="zstd") as writer:
                for i, batch in enumerate(data.to_batches(max_chunksize=_ROW_GROUP_ROWS)):
                    writer.write_table(pa.Table.from_batches([batch], schema=data.schema))
                    if i == 0:
                        f.flush()
                        _pause_point("mid-write")

        if self.is_local:
            self._commit_local(path, write)
        else:
            buffer = io.BytesIO()
            write(buffer)
            self._commit_bytes(path, buffer.getvalue())

    def _find(self, directory: str) -> list[str]:
        if not self.is_local:
            self.fs.invalidate_cache(directory)
        try:
            return sorted(self.fs.find(directory))
        except FileNotFoundError:
            return []

    def files(self, table: str, run_id: str | None = None) -> list[str]:
        """Visible data files of ``table`` (all runs, or one), as filesystem paths, sorted."""
        base = self.partition_dir(table, run_id) if run_id is not None else self.table_dir(table)
        out = []
        for path in self._find(base):
            rel = path[len(self.table_dir(table)) + 1 :].split("/")
            if (
                len(rel) == 2
                and rel[0].startswith("run_id=")
                and rel[1].startswith("part-")
                and rel[1].endswith(".parquet")
                and _visible(rel)
            ):
                out.append(path)
        return out

    def run_ids(self, table: str) -> list[str]:
        """Runs with at least one visible file in ``table``."""
        return sorted({p.rsplit("/", 2)[-2][len("run_id=") :] for p in self.files(table)})

    def read(
        self,
        table: str,
        run_id: str | None = None,
        filters: "pc.Expression | Sequence[tuple] | None" = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """All rows of ``table`` (or of one run), every file schema-checked, in file order.

        ``filters`` is a pyarrow compute expression or a list of ``(column, op, value)``
        tuples (ANDed, as in ``pyarrow.parquet``). Retried writes show up as several rows;
        use :meth:`latest` for one row per key.
        """
        paths = self.files(table, run_id)
        if self.is_local:
            blobs = {p: p for p in paths}
        else:
            blobs = {p: pa.BufferReader(b) for p, b in self.fs.cat(paths).items()} if paths else {}
        parts = []
        for path in paths:
            source = self.uri(path)
            try:
                raw = pq.read_table(blobs[path])
            except (pa.ArrowInvalid, OSError) as exc:
                raise SchemaError(f"table {table!r}: cannot read {source}: {exc}") from exc
            part = check_table(table, raw, source=source)
            partition = path.rsplit("/", 2)[-2][len("run_id=") :]
            if part.num_rows and not pc.all(pc.equal(part.column("run_id"), partition)).as_py():
                raise SchemaError(f"table {table!r} in {source}: run_id column disagrees with partition {partition!r}")
            parts.append(part)
        data = pa.concat_tables(parts) if parts else schema(table).empty_table()
        if filters is not None:
            if not isinstance(filters, pc.Expression):
                filters = pq.filters_to_expression(list(filters))
            data = data.filter(filters)
        if columns is not None:
            data = data.select(list(columns))
        return data

    def latest(
        self,
        table: str,
        keys: Sequence[str] | None = None,
        run_id: str | None = None,
        filters: "pc.Expression | Sequence[tuple] | None" = None,
    ) -> pa.Table:
        """One row per key (default :data:`storage.schemas.KEYS`), the latest by ``created_at``.

        Ties are broken by file name and row order, as in the catalog's views.
        """
        return latest_rows(self.read(table, run_id=run_id, filters=filters), keys or KEYS[table])

    def list_ids(self, table: str, column: str, run_id: str | None = None) -> set:
        """The distinct values of ``column`` in ``table`` (all runs, or one)."""
        if column not in schema(table).names:
            raise SchemaError(f"table {table!r} has no column {column!r}; columns are {schema(table).names}")
        return set(pc.unique(self.read(table, run_id=run_id).column(column)).to_pylist())

    def remove_stale_temp_files(self, older_than_s: float = 3600.0) -> int:
        """Delete local ``.tmp-*`` files left by writers that died (S3 never has any). Returns the count."""
        if not self.is_local:
            return 0
        removed, now = 0, time.time()
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                full = os.path.join(dirpath, name)
                if name.startswith(".tmp-") and now - os.path.getmtime(full) > older_than_s:
                    os.remove(full)
                    removed += 1
        return removed


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
