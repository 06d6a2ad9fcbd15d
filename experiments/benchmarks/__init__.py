"""Benchmark libraries: each module exposes `run(suite, workdir) -> list[dict]`."""
