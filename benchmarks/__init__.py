"""Benchmark scripts and the backends they load (run them from the repository root)."""
