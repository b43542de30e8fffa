"""Per-op benchmark modules used by experiments/bench_ops.py.

Each module exposes `run(flags_dict) -> list[Row]` and is listed in OPS below.
"""
