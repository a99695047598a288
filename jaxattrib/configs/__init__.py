"""Packaged ml_collections experiment configs (``configs/`` at the repository root links here)."""
