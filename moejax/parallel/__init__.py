"""Parallel layout: the mesh, the logical-axis rules, expert and pipeline parallelism."""
