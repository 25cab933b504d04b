"""cpldm benchmarks: ``python -m benchmarks [--quick] [--only NAME ...]`` runs every ``bench_<name>.py``.

See :mod:`benchmarks.harness` for the row format and docs/benchmarks.md for how to read the results.
"""
