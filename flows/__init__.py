"""FastFace flows layer: the Prefect flows and tasks of a run and their wiring; the evaluation logic they
call is in :mod:`evaluation` (docs/architecture.md)."""
