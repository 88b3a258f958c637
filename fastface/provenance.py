"""What made a result: the versions of the packages that computed it."""

from __future__ import annotations

import platform
from importlib import metadata

#: Packages whose versions every stored run and generation row records.
RECORDED_PACKAGES = ("fastface", "torch", "diffusers", "transformers", "peft", "open-clip-torch", "ray", "prefect",
                     "duckdb", "pyarrow")


def package_versions() -> dict[str, str]:
    """Python's version and those of :data:`RECORDED_PACKAGES` that are installed."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
