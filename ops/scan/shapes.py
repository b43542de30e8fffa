"""Named shape sets of ops.scan: (batch, time, channels, dtype name, a_per_channel)."""
SHAPES = {
    # Small shapes for CPU tests and quick GPU checks.
    "ci": [(2, 7, 130, "float32", False), (1, 100, 64, "bfloat16", False),
           (2, 33, 200, "float32", True)],
    # The benchmark set (H100): the lead's reference case, a bf16 case, a batched case.
    "bench": [(1, 8192, 8192, "float32", False), (1, 8192, 8192, "bfloat16", False),
              (8, 2048, 4096, "float32", False), (1, 8192, 8192, "float32", True)],
    # the issues' reference case alone (one device call has room for its compiles)
    "b1": [(1, 8192, 8192, "float32", False)],
}
