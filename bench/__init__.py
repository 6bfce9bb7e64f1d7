"""Benchmarks: each module's `main(argv)` measures against a baseline in the same run.

`python -m bench` runs them all; `python -m bench cdr_loader hvs_api` runs the named ones.
"""
