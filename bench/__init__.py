"""Benchmark harness for productd: baselines, load generator, live-server runs (issue 4)."""
