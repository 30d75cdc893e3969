"""Reading compiled programs (memory, collectives, FLOPs), the analytic minimum of
communication, and timing: the figures of the benchmark command (moejax/cli/bench.py)."""
