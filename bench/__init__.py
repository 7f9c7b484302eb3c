"""Benchmarks for cspmirror (run from the repository root: ``python -m bench`` or ``pytest bench/``)."""
