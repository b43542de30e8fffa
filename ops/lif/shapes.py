"""Named shape sets of ops.lif: (batch, time, channels, dtype name)."""
SHAPES = {
    "ci": [(2, 7, 130, "float32"), (1, 100, 64, "bfloat16")],
    "bench": [(1, 8192, 8192, "float32"), (1, 8192, 8192, "bfloat16"),
              (8, 2048, 4096, "float32")],
    # the issues' reference case alone (one device call has room for its compiles)
    "b1": [(1, 8192, 8192, "float32")],
}
