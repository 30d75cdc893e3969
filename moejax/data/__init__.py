"""Batch sources: deterministic functions of (seed, step)."""
