"""FastFace flows layer: the Prefect flows and tasks of a run and their wiring; the evaluation logic they
call is in :mod:`evaluation` (docs/architecture.md)."""

import re


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from its parts (run name, what it shows): lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
