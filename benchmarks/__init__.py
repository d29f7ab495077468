"""Benchmarks: scripts that write JSON (and PNG) results into benchmarks/results/.

Run one with ``python -m benchmarks.<name> [--quick]``; helpers shared by all of them
(machine info, git commit, JSON writing) live in :mod:`benchmarks.common`.
"""
