"""Benchmark ops implementations against baselines measured in the same run.

  python experiments/bench_ops.py --op=attention --shapes=bench
  python experiments/bench_ops.py --op=gmm,scan --out=/tmp/bench.md

Each op's module under experiments/bench/ times every implementation that can
run here plus its baselines (cuDNN / XLA attention, lax.ragged_dot, tokamax
where installed) and the hardware ceilings, and returns table rows. The ceilings
are measured before and after the ops; the "copy" ratios and the ceilings table
use the higher of the two.
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from experiments.bench import timing

OPS = ("attention", "gmm", "nsa", "scan", "lif", "moe_layer")

_OP = flags.DEFINE_list("op", ["attention"], f"ops to benchmark, any of {OPS}")
_SHAPES = flags.DEFINE_string("shapes", "bench", "named shape set of each op ('ci' is small)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "input dtype")
_OUT = flags.DEFINE_string("out", "", "also write the markdown tables to this file")


def main(argv):
  del argv
  unknown = [o for o in _OP.value if o not in OPS]
  if unknown:
    raise app.UsageError(f"--op: unknown {unknown}; choose from {OPS}")
  import jax
  ceilings = timing.Row("ceiling", "-", "-", 0.0, note=jax.devices()[0].device_kind)
  if jax.default_backend() != "cpu":
    ceilings.tflops = timing.matmul_peak_tflops()
    ceilings.gbs = timing.copy_bandwidth_gbs()
  results = []
  for op in _OP.value:
    module = importlib.import_module(f"experiments.bench.{op}")
    rows = module.run(shapes=_SHAPES.value, dtype=_DTYPE.value, ceilings=ceilings)
    results.append((op, rows))
    print(timing.format_table(rows, op), flush=True)
  if ceilings.gbs:
    # One H200 kind measured 3348-3755 GB/s and 664-746 TFLOP/s at the start of different
    # processes: the ceilings are measured again and the "copy" ratios are against the higher.
    before = ceilings.gbs
    ceilings.tflops = max(ceilings.tflops, timing.matmul_peak_tflops())
    ceilings.gbs = max(before, timing.copy_bandwidth_gbs())
    ceilings.note += f"; the higher of two measurements (copy before the ops: {before:.0f} GB/s)"
    all_rows = [r for _, rows in results for r in rows]
    if ceilings.gbs > before and timing.rescale_copy_ratios(all_rows, ceilings.gbs):
      print("\ncopy ratios against the higher copy measurement:")
      for op, rows in results:
        if any("copy" in r.ratios for r in rows):
          print(timing.format_table(rows, op))
  tables = [timing.format_table([ceilings], "hardware ceilings (bf16 matmul, f32 copy)")]
  tables += [timing.format_table(rows, op) for op, rows in results]
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write("\n\n".join(tables) + "\n")
  print(tables[0])


if __name__ == "__main__":
  app.run(main)
