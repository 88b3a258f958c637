"""DuckDB connections with the DuckLake extensions loaded offline, from their PyPI packages.

DuckDB's extensions ship on PyPI (``duckdb-extension-ducklake``, ``-sqlite``, ``-postgres``,
``-httpfs``, pinned to the duckdb version by ``pip install 'fastface[data]'``). Each package
holds one ``<name>.duckdb_extension`` file; ``INSTALL '<that path>'`` copies it into DuckDB's
extension folder and ``LOAD`` loads it, with no network. This module is the only place that
knows this; everything else calls :func:`connect`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable

import duckdb

INSTALL_HINT = "pip install 'fastface[data]'"


class StorageError(ValueError):
    """The store cannot be opened or used as configured (the message names the fix).

    A ValueError, so the CLI prints it as one line instead of a traceback."""


def extension_file(name: str) -> Path:
    """The ``.duckdb_extension`` file of the PyPI package ``duckdb-extension-<name>``."""
    package = f"duckdb_extension_{name}"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise StorageError(
            f"the DuckDB extension {name!r} is not installed (Python package duckdb-extension-{name}); "
            f"run: {INSTALL_HINT}"
        ) from None
    folder = Path(module.__file__).parent / "extensions"
    wanted = f"v{duckdb.__version__}"
    found = sorted(folder.glob(f"*/{name}.duckdb_extension"))
    exact = [p for p in found if p.parent.name == wanted]
    if not exact:
        have = ", ".join(p.parent.name for p in found) or "none"
        raise StorageError(
            f"duckdb-extension-{name} has no build for duckdb {duckdb.__version__} (it has: {have}); "
            f"install matching versions: {INSTALL_HINT}"
        )
    return exact[0]


def load_extensions(con: duckdb.DuckDBPyConnection, names: Iterable[str]) -> None:
    """Load ``names`` into ``con`` from the packaged files (installed into DuckDB's folder once)."""
    loaded = {r[0] for r in con.execute(
        "SELECT extension_name FROM duckdb_extensions() WHERE loaded").fetchall()}
    for name in names:
        if name in loaded:
            continue
        try:
            con.execute(f"LOAD {name}")
            continue
        except duckdb.Error:
            pass  # not installed in DuckDB's extension folder yet
        path = str(extension_file(name)).replace("'", "''")
        try:
            con.execute(f"INSTALL '{path}'")
            con.execute(f"LOAD {name}")
        except duckdb.Error as exc:
            raise StorageError(f"cannot load the DuckDB extension {name!r} from {path}: {exc}; "
                               f"reinstall it: {INSTALL_HINT}") from None


MEMORY_LIMIT_ENV = "FASTFACE_DUCKDB_MEMORY_LIMIT"  # DuckDB's memory_limit per connection (default 4GB)
THREADS_ENV = "FASTFACE_DUCKDB_THREADS"  # DuckDB's threads per connection (default: DuckDB's, the machine's cores)
DUCKDB_ENV_VARS = (MEMORY_LIMIT_ENV, THREADS_ENV)


def connect(extensions: Iterable[str] = ("ducklake",), threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (UTC session time zone) with ``extensions`` loaded."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    con.execute("SET TimeZone='UTC'")
    # DuckDB's default is 80 % of the machine's memory; a driver shares its machine with pools.
    con.execute(f"SET memory_limit={quote_literal(os.environ.get(MEMORY_LIMIT_ENV, '4GB'))}")
    if threads is None and os.environ.get(THREADS_ENV):
        threads = int(os.environ[THREADS_ENV])
    if threads:
        con.execute(f"SET threads={int(threads)}")
    load_extensions(con, extensions)
    return con


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
