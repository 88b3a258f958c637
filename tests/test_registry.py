"""fastface.registry: names known at once, lazy entries imported on first use, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastface.registry import Registry, UnknownNameError, import_target

REPO = Path(__file__).resolve().parent.parent


def test_lazy_entry_is_listed_at_once_and_imported_on_first_get():
    registry: Registry = Registry("thing")
    registry.register("eager", 1)
    registry.register_lazy("lazy", "json:dumps")
    assert registry.names() == ["eager", "lazy"] and "lazy" in registry
    import json

    assert registry.get("lazy") is json.dumps and registry.get("lazy") is json.dumps  # resolved once, then kept
    assert dict(registry.items()) == {"eager": 1, "lazy": json.dumps}
    with pytest.raises(ValueError, match="already registered"):
        registry.register_lazy("lazy", "json:loads")
    with pytest.raises(UnknownNameError, match="unknown thing 'lazi'. Did you mean 'lazy'"):
        registry.get("lazi")


def test_import_target_names_the_expected_form():
    assert import_target("os.path:join") is __import__("os").path.join
    with pytest.raises(ValueError, match="expected 'package.module:attribute', got 'os.path.join'"):
        import_target("os.path.join")
    broken: Registry = Registry("thing")
    broken.register_lazy("gone", "fastface.no_such_module:thing")
    with pytest.raises(ModuleNotFoundError):
        broken.get("gone")


def test_face_backends_are_listed_without_loading_a_face_library_and_planning_loads_no_diffusers():
    """`fastface --help`, a config check and a flow's driver list backends and plan with the presets: no cv2 for the
    names, no diffusers for the planning (its import is seconds of CPU in every driver and `--check`)."""
    code = ("import sys\n"
            "from fastface.face_backends import FACE_BACKENDS\n"
            "assert FACE_BACKENDS.names() == ['dlib', 'insightface'], FACE_BACKENDS.names()\n"
            "assert 'cv2' not in sys.modules and 'fastface.faces' not in sys.modules\n"
            "import flows.evaluate, evaluation.plan, fastface.presets, fastface.checkpoints\n"
            "assert 'diffusers' not in sys.modules, 'diffusers loaded'\n"
            "assert FACE_BACKENDS.get('dlib').embedding_dim == 128 and 'fastface.faces' in sys.modules\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
