"""Benchmarks of pysnap against containerd's built-in plugins (not tests: nothing here asserts on time).

Run from the repository root: `.venv/bin/python -m bench.run [--quick] [--only snapshotter|content|nri]`.
Results are printed and written to docs/benchmarks.md.
"""
