"""Where a store's table catalog lives: ``$FASTFACE_CATALOG`` or the ``catalog=`` argument, else the
SQLite file in a local root; and how a catalog spec becomes DuckDB's ATTACH string."""

from __future__ import annotations

import os
import re

from storage.duck import StorageError
from storage.layout import CATALOG_FILE

CATALOG_ENV = "FASTFACE_CATALOG"


def catalog_attach_string(spec: str) -> tuple[str, str | None]:
    """``(ATTACH string, DuckDB extension it needs)`` of a catalog spec.

    ``sqlite:/path/catalog.sqlite``; ``postgres:dbname=fastface host=db.internal user=ff``
    (a libpq connection string; the password from ``$PGPASSWORD`` or ``~/.pgpass``) or
    ``postgresql://user@host:5432/db``; ``duckdb:/path/catalog.ducklake`` (one process only).
    A leading ``ducklake:`` is accepted too.
    """
    text = spec.strip()
    if text.startswith("ducklake:"):
        text = text[len("ducklake:"):]
    if text.startswith(("postgresql://", "postgres://")):
        return f"ducklake:postgres:{text}", "postgres"
    kind, sep, rest = text.partition(":")
    if sep and kind in ("postgres", "postgresql") and rest.strip():
        return f"ducklake:postgres:{rest.strip()}", "postgres"
    if sep and kind == "sqlite" and rest.strip():
        return f"ducklake:sqlite:{os.path.abspath(os.path.expanduser(rest.strip()))}", "sqlite"
    if sep and kind == "duckdb" and rest.strip():
        return f"ducklake:{os.path.abspath(os.path.expanduser(rest.strip()))}", None
    raise StorageError(
        f"catalog {spec!r} is not understood: use sqlite:/path/catalog.sqlite, "
        "postgres:dbname=NAME host=HOST user=USER (or postgresql://USER@HOST/NAME), or duckdb:/path/catalog.ducklake"
    )


def redact(spec: str) -> str:
    """The catalog spec with any password masked (for messages)."""
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", spec))


def own_catalog(local_root: str) -> str:
    """The catalog spec of a local root's own SQLite file, ``sqlite:<root>/catalog.sqlite`` (it moves with the folder)."""
    return f"sqlite:{os.path.join(local_root, CATALOG_FILE)}"


def store_catalog(catalog: str | None, local_root: str | None) -> str:
    """The catalog spec of a store: ``catalog``, else ``$FASTFACE_CATALOG``, else :func:`own_catalog` for a
    local root (``local_root``); an ``s3://`` root (``local_root=None``) must name a database."""
    spec = catalog or os.environ.get(CATALOG_ENV) or (own_catalog(local_root) if local_root is not None else None)
    if not spec:
        raise StorageError(
            f"an s3:// root keeps its tables' catalog in a database: set {CATALOG_ENV}="
            "postgres:dbname=NAME host=HOST user=USER (several machines) or "
            f"{CATALOG_ENV}=sqlite:/local/path/catalog.sqlite (one machine); see docs/storage.md"
        )
    return spec
