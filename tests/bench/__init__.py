"""Benchmarks: on demand only (``make bench``); see ``tests/bench/README.md``."""
