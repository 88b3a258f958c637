"""Optional dependencies: which extra of ``pip install 'fastface[...]'`` brings which module.

A missing optional module becomes a :class:`MissingExtraError` that names the extra to install,
raised where a layer or feature is entered (:func:`require`) or translated from a
``ModuleNotFoundError`` caught at the command line (:func:`explain`).
"""

from __future__ import annotations

import importlib.util

#: Top-level module → the extra (pyproject ``[project.optional-dependencies]``) that installs it.
EXTRA_OF_MODULE: dict[str, str] = {
    "dlib": "faces", "face_recognition_models": "faces", "insightface": "faces", "onnxruntime": "faces",
    "onnx": "faces",
    "open_clip": "metrics", "ftfy": "metrics", "regex": "metrics",
    "pyarrow": "data", "duckdb": "data", "duckdb_extension_ducklake": "data", "duckdb_extension_httpfs": "data",
    "duckdb_extension_sqlite": "data", "duckdb_extension_postgres": "data", "fsspec": "data", "s3fs": "data",
    "ray": "cluster", "prefect": "cluster", "matplotlib": "cluster",
    "pytest": "test", "moto": "test",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, module: str, extra: str, needed_for: str | None = None) -> None:
        what = f"{needed_for} needs" if needed_for else "this needs"
        super().__init__(
            f"{what} the optional package {module!r} (extra '{extra}'): "
            f"pip install 'fastface[{extra}]'" + ("" if extra == "all" else " (or 'fastface[all]' for everything)"),
            name=module,
        )
        self.module, self.extra = module, extra


def require(*modules: str, needed_for: str | None = None) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` that cannot be imported."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or shadowed package counts as missing
            found = False
        if not found:
            raise MissingExtraError(module, EXTRA_OF_MODULE.get(module, "all"), needed_for)


def explain(exc: ImportError, needed_for: str | None = None) -> ImportError:
    """The same error, with the extra to install when the missing module is an optional one."""
    if isinstance(exc, MissingExtraError):
        return exc
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name in EXTRA_OF_MODULE:
        return MissingExtraError(name, EXTRA_OF_MODULE[name], needed_for)
    return exc


__all__ = ["EXTRA_OF_MODULE", "MissingExtraError", "explain", "require"]
