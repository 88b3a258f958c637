"""FastFace actors layer (see docs/architecture.md)."""
