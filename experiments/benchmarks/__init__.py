"""Benchmark libraries collected by `python -m experiments.benchmark`.

Each topic module exposes `run(suite: str, workdir: str) -> list[dict]` with suite in
{'quick', 'cpu_core', 'full'}; rows are flat dicts of measured numbers.
"""
