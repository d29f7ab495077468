"""Worked examples of prunesearch plugins (not installed with the package: run from the repository root)."""
