"""Train-step tokens/s and MFU of presets, with the matmul peak measured in the same run.

  python experiments/bench_train.py --config=dense_125m,dense_1b --set train.batch_size=8
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from jaxlm import config as config_lib
from jaxlm import configs

_CONFIGS = flags.DEFINE_list("config", ["dense_125m"], "presets to measure")
_SET = flags.DEFINE_multi_string("set", [], "overrides applied to every preset")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps (median)")


def main(argv):
  del argv
  import jax
  from experiments.bench import timing
  from jaxlm.train.metrics import peak_tflops
  from jaxlm.train.throughput import measure
  cfgs = [config_lib.apply_overrides(configs.get_preset(n), _SET.value) for n in _CONFIGS.value]
  kind = jax.devices()[0].device_kind
  measured = timing.matmul_peak_tflops() if jax.default_backend() != "cpu" else None
  sheet = peak_tflops(kind)
  print(f"device: {jax.device_count()} x {kind}; matmul peak measured "
        f"{measured and round(measured)} TFLOP/s, datasheet {sheet}")
  print("| preset | params | batch×seq | step ms | tokens/s | model TFLOP/s/dev | MFU vs measured peak | MFU vs datasheet | compile s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for cfg in cfgs:
    try:
      r = measure(cfg, steps=_STEPS.value)
    except jax.errors.JaxRuntimeError as e:  # one preset too big for the device: keep the table
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print(f"| {cfg.name} | - | {cfg.train.batch_size}×{cfg.train.seq_len} | out of device "
            f"memory: lower --set train.batch_size or raise train.grad_accum | | | | | |",
            flush=True)
      continue
    mfu_m = f"{r.model_tflops_per_device / measured:.1%}" if measured else "-"
    mfu_s = f"{r.model_tflops_per_device / sheet:.1%}" if sheet else "-"
    print(f"| {r.name} | {r.params / 1e6:.0f}M | {cfg.train.batch_size}×{cfg.train.seq_len} | "
          f"{r.step_ms:.1f} | {r.tokens_per_s:,.0f} | {r.model_tflops_per_device:.0f} | {mfu_m} | "
          f"{mfu_s} | {r.compile_s:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
