"""DuckDB connections with the DuckLake extensions loaded offline, from their PyPI packages.

DuckDB's extensions ship on PyPI (``duckdb-extension-ducklake``, ``-sqlite``, ``-postgres``,
``-httpfs``, pinned to the duckdb version by ``pip install 'fastface[data]'``). Each package
holds one ``<name>.duckdb_extension`` file; ``INSTALL '<that path>'`` copies it into DuckDB's
extension folder and ``LOAD`` loads it, with no network. This module is the only place that
knows this; everything else calls :func:`connect` (or :func:`open_database` for a database file).

Signatures are checked once per process and file. DuckDB checks an extension's signature at
every ``LOAD`` by hashing the whole file (ducklake's is 36 MB): ~0.12 s of CPU per extension and
connection, ~0.25 s for each Store opened on a SQLite catalog (measured, ``docs/benchmarks.md``).
Here the first load of an installed file in a process is DuckDB's own check, in a database of
its own that refuses unsigned extensions (DuckDB's default); the file's identity (device, inode,
size, modification and change times) is then kept, and the databases this module opens load
that file by its path without hashing it again while its identity is unchanged. A file that
changed is checked again; one that fails the check is never loaded. Those databases allow
unsigned extensions for that reason only: nothing else in FastFace loads an extension, and the
read-only connections of ``fastface sql`` and the app refuse ``LOAD`` and turn external access off
(:mod:`storage.readonly`).
"""

from __future__ import annotations

import importlib
import os
import threading
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


_CHECKED: dict[str, tuple[int, ...]] = {}  # installed file → its identity when DuckDB's signature check passed
_CHECK_LOCK = threading.Lock()
# No extension is fetched or loaded behind our back (the checker's databases and ours).
_NO_AUTO = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# The databases this module opens: unsigned files are allowed because every file they load passed
# DuckDB's signature check in this process (above).
_CONFIG = {**_NO_AUTO, "allow_unsigned_extensions": True}


def _identity(path: str) -> tuple[int, ...]:
    """What changes when a file is written, replaced or touched (the change time cannot be set back)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _extension(con: duckdb.DuckDBPyConnection, name: str) -> tuple[bool, bool, str] | None:
    """``(installed, loaded, install path)`` of extension ``name`` (or an alias such as ``sqlite``) in ``con``."""
    row = con.execute("SELECT installed, loaded, install_path FROM duckdb_extensions() "
                      "WHERE extension_name = ? OR list_contains(aliases, ?)", [name, name]).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]), row[2])


def _check_signature(path: str) -> tuple[int, ...]:
    """DuckDB's signature check of the installed extension file ``path``, once per process and file identity."""
    with _CHECK_LOCK:
        identity = _identity(path)
        if _CHECKED.get(path) != identity:
            checker = duckdb.connect(":memory:", config=dict(_NO_AUTO))  # signatures required: DuckDB's default
            try:
                checker.execute(f"LOAD {quote_literal(path)}")  # unsigned or altered: raises
            finally:
                checker.close()
            if _identity(path) != identity:
                raise duckdb.IOException(f"{path} changed while its signature was checked")
            _CHECKED[path] = identity
        return identity


def _load(con: duckdb.DuckDBPyConnection, name: str, found: tuple[bool, bool, str] | None, trusted: bool) -> None:
    """Load the installed extension ``name`` (``found``: its :func:`_extension` row) into ``con``;
    ``trusted``: ``con`` allows unsigned files."""
    if found is None or not found[0]:
        raise duckdb.IOException(f"extension {name} is not installed")
    if not trusted:
        con.execute(f"LOAD {name}")  # DuckDB checks the signature itself
        return
    path = found[2]
    identity = _check_signature(path)
    con.execute(f"LOAD {quote_literal(path)}")
    if _identity(path) != identity:
        raise duckdb.IOException(f"{path} changed while it was loaded")


def load_extensions(con: duckdb.DuckDBPyConnection, names: Iterable[str]) -> None:
    """Load ``names`` into ``con`` from the packaged files (installed into DuckDB's folder once).

    Works on any DuckDB connection; on those of :func:`open_database` a file's signature is
    checked once per process (see the module's docstring), on others DuckDB checks it each time.
    """
    trusted = str(con.execute("SELECT current_setting('allow_unsigned_extensions')").fetchone()[0]).lower() == "true"
    for name in names:
        found = _extension(con, name)
        if found is not None and found[1]:
            continue
        try:
            _load(con, name, found, trusted)
            continue
        except duckdb.Error:
            pass  # not installed in DuckDB's extension folder yet
        path = str(extension_file(name)).replace("'", "''")
        try:
            con.execute(f"INSTALL '{path}'")
            _load(con, name, _extension(con, name), trusted)
        except duckdb.Error as exc:
            raise StorageError(f"cannot load the DuckDB extension {name!r} from {path}: {exc}; "
                               f"reinstall it: {INSTALL_HINT}") from None


MEMORY_LIMIT_ENV = "FASTFACE_DUCKDB_MEMORY_LIMIT"  # DuckDB's memory_limit per connection (default 4GB)
THREADS_ENV = "FASTFACE_DUCKDB_THREADS"  # DuckDB's threads per connection (default: DuckDB's, the machine's cores)
DUCKDB_ENV_VARS = (MEMORY_LIMIT_ENV, THREADS_ENV)


def open_database(database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A new DuckDB database (``:memory:`` or a file) with this module's extension rules (see above)."""
    return duckdb.connect(database, read_only=read_only, config=dict(_CONFIG))


def connect(extensions: Iterable[str] = ("ducklake",), threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection (UTC session time zone) with ``extensions`` loaded."""
    con = open_database()
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
