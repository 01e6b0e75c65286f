"""jobledger benchmarks: ``python -m bench`` (see bench/README in RESULTS.md)."""
