"""FastFace flows layer (see docs/architecture.md)."""
