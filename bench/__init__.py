"""Benchmarks, experiments and full-scale checks (layout and how to run them: bench/README.md).

bench.harness holds what they share; bench.perf, bench.experiments and bench.checks hold one
runnable module each (`python -m bench.perf.load --help`); bench.report writes the tables.
"""
