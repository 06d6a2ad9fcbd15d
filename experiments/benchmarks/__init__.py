"""Benchmark libraries: each exposes run(suite, workdir) -> list[dict]."""
