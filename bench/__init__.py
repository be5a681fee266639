"""Benchmarks: `lmscore bench` (lmscore.bench.cli)."""
