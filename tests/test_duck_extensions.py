"""storage.duck: an extension's signature is checked by DuckDB once per process and file; an altered file is refused."""

from __future__ import annotations

import os
import shutil

import duckdb
import pytest

from storage import duck
from storage.duck import StorageError, connect, load_extensions, open_database


@pytest.fixture
def installed() -> str:
    """The ducklake file in DuckDB's extension folder (installed from its package when it is not there yet)."""
    con = duckdb.connect()
    load_extensions(con, ["ducklake"])
    return con.execute("SELECT install_path FROM duckdb_extensions() WHERE extension_name = 'ducklake'").fetchone()[0]


@pytest.fixture
def checks(installed, monkeypatch):
    """Every signature check this module makes (the paths DuckDB's own check loaded), with a fresh record."""
    monkeypatch.setattr(duck, "_CHECKED", {})
    seen = []
    real = duckdb.connect

    def counting_connect(database=":memory:", *args, **kwargs):
        con = real(database, *args, **kwargs)
        if not (kwargs.get("config") or {}).get("allow_unsigned_extensions"):
            seen.append("checker")
        return con

    monkeypatch.setattr(duck.duckdb, "connect", counting_connect)
    return seen


def test_the_signature_is_checked_once_per_file_and_again_when_it_changed(tmp_path, installed, checks):
    for _ in range(3):
        con = connect(("ducklake",))
        assert con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'ducklake'").fetchone()[0]
        con.close()
    assert checks == ["checker"]  # the first load only; the other two trusted the checked file

    copy = tmp_path / "ducklake.duckdb_extension"
    shutil.copyfile(installed, copy)
    duck._check_signature(str(copy))
    assert len(checks) == 2
    duck._check_signature(str(copy))
    assert len(checks) == 2  # same file, same identity: not hashed again
    os.utime(copy, ns=(1, 1))  # touched: checked again
    duck._check_signature(str(copy))
    assert len(checks) == 3


def test_an_altered_extension_file_is_never_loaded(tmp_path, installed, checks, monkeypatch):
    altered = tmp_path / "ducklake.duckdb_extension"
    data = bytearray(open(installed, "rb").read())
    data[len(data) // 2] ^= 0xFF  # one byte of the code flipped: the signature no longer matches
    altered.write_bytes(bytes(data))
    with pytest.raises(duckdb.Error, match="signature"):
        duck._check_signature(str(altered))
    assert str(altered) not in duck._CHECKED

    # A database of open_database() (it allows unsigned files) whose installed ducklake is the altered file.
    monkeypatch.setattr(duck, "_extension", lambda con, name: (True, False, str(altered)))
    monkeypatch.setattr(duck, "extension_file", lambda name: altered)
    con = open_database()
    with pytest.raises(StorageError, match="cannot load the DuckDB extension 'ducklake'.*signature"):
        load_extensions(con, ["ducklake"])
    assert not con.execute("SELECT loaded FROM duckdb_extensions() WHERE extension_name = 'ducklake'").fetchone()[0]


def test_read_only_connections_load_no_extension(tmp_path):
    """``fastface sql`` and the app run users' SQL on :func:`storage.readonly.open_readonly`: although its database
    allows unsigned files, DuckDB refuses every LOAD and INSTALL there (external access off, configuration locked)."""
    from storage import Store
    from storage.readonly import open_readonly

    stock = duckdb.connect()
    load_extensions(stock, ["httpfs"])  # installed in DuckDB's folder (a local store does not load it)
    httpfs = stock.execute("SELECT install_path FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()[0]
    Store(str(tmp_path)).append("runs", [{"kind": "evaluate", "config": {}}], "r1")
    con = open_readonly(str(tmp_path))
    assert con.execute("SELECT current_setting('allow_unsigned_extensions')").fetchone()[0] is True
    for statement in (f"LOAD '{httpfs}'", "LOAD postgres", f"INSTALL '{httpfs}'",
                      "SET allow_unsigned_extensions = false", "SET enable_external_access = true"):
        with pytest.raises(duckdb.Error, match="disabled|Cannot access|locked"):
            con.execute(statement)
