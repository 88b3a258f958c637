"""A missing optional dependency is one line that names the extra to install, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_without(modules: list[str], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``fastface ARGV`` in a fresh interpreter where ``modules`` cannot be imported (None in sys.modules)."""
    code = (
        "import sys\n"
        f"for name in {modules!r}:\n"
        "    sys.modules[name] = None\n"
        "from fastface.cli import main\n"
        f"raise SystemExit(main({argv!r}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)


@pytest.mark.parametrize("missing, argv, extra", [
    (["duckdb"], ["sql", "--root", "store", "SELECT 1"], "data"),
    (["prefect"], ["evaluate", "--config", str(ROOT / "configs" / "ci.yaml"), "--root", "store"], "cluster"),
    (["open_clip"], ["score", "--help"], None),  # --help needs nothing optional: must still work
])
def test_missing_extra_names_it(tmp_path, missing, argv, extra):
    result = run_without(missing, argv, tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    if extra is None:
        assert result.returncode == 0, output
        return
    assert result.returncode == 2, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert f"pip install 'fastface[{extra}]'" in lines[0] and repr(missing[0]) in lines[0]
    assert not (tmp_path / "store").exists()  # nothing created on the way to the error


def test_library_import_names_the_extra(tmp_path):
    code = "import sys; sys.modules['duckdb'] = None\nimport storage\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "MissingExtraError" in result.stderr and "pip install 'fastface[data]'" in result.stderr


def test_require_and_explain_are_consistent(monkeypatch):
    from fastface.extras import EXTRA_OF_MODULE, MissingExtraError, explain, require

    require("json")  # present: nothing happens
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"'ray' \(extra 'cluster'\): pip install 'fastface\[cluster\]'"):
        require("json", "ray")
    translated = explain(ModuleNotFoundError("No module named 'prefect.client'", name="prefect.client"))
    assert isinstance(translated, MissingExtraError) and translated.extra == "cluster"
    unknown = ModuleNotFoundError("No module named 'zzz'", name="zzz")
    assert explain(unknown) is unknown
    # every extra named in the table exists in pyproject.toml
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in set(EXTRA_OF_MODULE.values()):
        assert f"\n{extra} = [" in pyproject, extra
