"""Train-step tokens/s and MFU of presets, with the matmul peak measured in the same run.

  python experiments/bench_train.py --config=dense_125m,dense_1b --set train.batch_size=8

Scaling over devices of one host, batch grown with the device count (weak scaling):
  python experiments/bench_train.py --config=dense_1b --device_counts=1,2 --batch_per_device=8

Variants of each preset measured one after another in the same process, against the same
matmul peak (separate processes differ by a few percent in step time and more in the peak).
The peak is measured again after the runs and a last table gives MFU against the higher of the
two (one H200 measured 664 and 746 TFLOP/s in different processes):
  python experiments/bench_train.py --config=dense_1b --set train.batch_size=8 \
      --variant=base: --variant="acts:model.remat=dots_and_acts" \
      --variant="scanned:model.scan_layers=true;model.remat=dots"
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
_DEVICE_COUNTS = flags.DEFINE_list(
    "device_counts", [], "measure each preset on the first N devices for each N given "
    "(default: all devices); the table adds tokens/s relative to the first N")
_BATCH_PER_DEVICE = flags.DEFINE_integer(
    "batch_per_device", 0, "if > 0, train.batch_size = this × the devices of each measurement")
_VARIANT = flags.DEFINE_multi_string(
    "variant", [], "LABEL:OVERRIDE[;OVERRIDE...] (overrides as --set takes them, none after "
    "the colon for the preset as it is): each preset is measured once per variant, in order, "
    "in this process; the table names the variant after the preset")
_PROFILE = flags.DEFINE_integer(
    "profile_top", 0, "if > 0, after each measurement trace two more steps and print the "
    "this many kernels with the most device time (experiments/bench/profile.py)")


def _device_counts(available: int) -> list[int]:
  counts = [int(c) for c in _DEVICE_COUNTS.value] or [available]
  bad = [c for c in counts if not 1 <= c <= available]
  if bad:
    raise app.UsageError(f"--device_counts {bad}: this host has {available} devices")
  return counts


def parse_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
  """--variant values -> [(label, overrides)]; no variants = the preset itself, unlabelled."""
  out = []
  for spec in specs:
    label, sep, rest = spec.partition(":")
    if not sep or not label.strip():
      raise app.UsageError(f"--variant {spec!r}: expected LABEL:OVERRIDE[;OVERRIDE...]")
    out.append((label.strip(), [o.strip() for o in rest.split(";") if o.strip()]))
  labels = [label for label, _ in out]
  if len(set(labels)) != len(labels):
    raise app.UsageError(f"--variant labels repeat: {labels}")
  return out or [("", [])]


def _jobs(cfgs, counts, variants):
  """(config, device count, variant label) triples, all validated before the first compile."""
  jobs = []
  for base in cfgs:
    for label, overrides in variants:
      for n in counts:
        cfg = config_lib.apply_overrides(base, overrides)
        if _BATCH_PER_DEVICE.value > 0:
          cfg = config_lib.apply_overrides(
              cfg, [f"train.batch_size={_BATCH_PER_DEVICE.value * n}"])
        config_lib.validate_for_devices(cfg, n)
        jobs.append((cfg, n, label))
  return jobs


def main(argv):
  del argv
  import jax
  from experiments.bench import timing
  from jaxlm.train.metrics import peak_tflops
  from jaxlm.train.throughput import measure
  cfgs = [config_lib.apply_overrides(configs.get_preset(n), _SET.value) for n in _CONFIGS.value]
  counts = _device_counts(jax.device_count())
  jobs = _jobs(cfgs, counts, parse_variants(_VARIANT.value))
  kind = jax.devices()[0].device_kind
  measured = timing.matmul_peak_tflops() if jax.default_backend() != "cpu" else None
  sheet = peak_tflops(kind)
  print(f"device: {jax.device_count()} x {kind}; matmul peak measured "
        f"{measured and round(measured)} TFLOP/s, datasheet {sheet}")
  print(_HEADER.format(counts[0]))
  print("|---" * 12 + "|")
  tables, done = [], []

  def kernels(one_step):
    from experiments.bench import profile
    if _PROFILE.value > 0:
      prof = profile.kernel_times(one_step, iters=2, top=_PROFILE.value)
      tables.append(profile.format_kernel_table(prof, iters=2, title=f"{name} on {n} devices: "
                                                "device time per step by kernel"))

  for cfg, n, label in jobs:
    name = f"{cfg.name} [{label}]" if label else cfg.name
    if n == counts[0]:
      first_tok_s = None
    try:
      r = measure(cfg, steps=_STEPS.value, devices=jax.devices()[:n], profile=kernels)
    except jax.errors.JaxRuntimeError as e:  # one preset too big for the device: keep the table
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      from jaxlm.aot_report import activation_memory_hints
      hint = activation_memory_hints(cfg)
      print(f"| {name} | {n} | - | {cfg.train.batch_size}×{cfg.train.seq_len} | out of device "
            f"memory: lower --set train.batch_size or raise train.grad_accum"
            f"{'; ' + hint if hint else ''} | | | | | | | |", flush=True)
      continue
    first_tok_s = first_tok_s or r.tokens_per_s
    done.append((name, n, cfg, r, first_tok_s))
    print(_row(name, n, cfg, r, first_tok_s, measured, sheet), flush=True)
  if measured and done:
    # The same card has measured 664 to 746 TFLOP/s at process start (clocks, power, heat):
    # the MFU below is against the higher of that and a second measurement after the runs.
    print(higher_peak_table(done, measured, timing.matmul_peak_tflops(), sheet, counts[0]))
  for table in tables:
    print("\n" + table)


def higher_peak_table(done, before, after, sheet, first_count):
  """The results table again, MFU against max(before, after) matmul peaks (TFLOP/s).
  done: [(name, device count, config, throughput result, first row's tokens/s)]."""
  best = max(before, after)
  lines = [f"\nmatmul peak measured again after the runs: {after:.0f} TFLOP/s; MFU against "
           f"the higher peak, {best:.0f}:", _HEADER.format(first_count), "|---" * 12 + "|"]
  lines += [_row(name, n, cfg, r, first, best, sheet) for name, n, cfg, r, first in done]
  return "\n".join(lines)


_HEADER = ("| preset | devices | params | batch×seq | step ms | tokens/s | tokens/s vs {} dev | "
           "model TFLOP/s/dev | MFU vs measured peak | MFU vs datasheet | compile s | "
           "device GB |")


def _row(name, n, cfg, r, first_tok_s, peak, sheet):
  mfu_m = f"{r.model_tflops_per_device / peak:.1%}" if peak else "-"
  mfu_s = f"{r.model_tflops_per_device / sheet:.1%}" if sheet else "-"
  return (f"| {name} | {n} | {r.params / 1e6:.0f}M | {cfg.train.batch_size}×{cfg.train.seq_len} "
          f"| {r.step_ms:.1f} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / first_tok_s:.2f}× | "
          f"{r.model_tflops_per_device:.0f} | {mfu_m} | {mfu_s} | {r.compile_s:.0f} | "
          f"{'-' if r.device_gb is None else f'{r.device_gb:.2f}'} |")


if __name__ == "__main__":
  app.run(main)
