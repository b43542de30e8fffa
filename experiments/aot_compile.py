"""Compile a preset's sharded train step and decode step for a TPU slice or NVIDIA GPUs, on
this CPU host.

Needs libtpu (pip install -e '.[tpu]') for TPUs, jax's CUDA plugin (pip install -e '.[gpu]')
for GPUs; no TPU or GPU. Prints per-chip memory against the chip's HBM,
FLOPs per step, the collectives of the compiled program and whether it fits; exits 1 when a
program does not fit (with by how much and which mesh axes to grow) or fails to compile.

  python experiments/aot_compile.py --topology=v5p:4x4x4 --config=dense_1b \
      --set mesh.data=4 --set mesh.fsdp=16
  python experiments/aot_compile.py --topology=v6e:16x16 --config=unipool_978m --xla_ops \
      --set mesh.data=16 --set mesh.fsdp=16
  python experiments/aot_compile.py --topology=v5e:2x2 --config=tiny_cpu --programs=train
  python experiments/aot_compile.py --topology=h200 --config=unipool_469m --programs=train
  python experiments/aot_compile.py --topology=h200 --config=vanilla_moe_469m --programs=train \
      --roofline --set train.batch_size=32

--roofline (GPU topologies) adds experiments/bench/hlo_roofline.py's estimate of each compiled
per-chip program: where its bytes and FLOPs go, kernel by kernel, priced at the copy rate and
matmul peak measured on that GPU (an estimate, not a timing).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The local backend stays CPU; libtpu is loaded as a compile-only client by the topology API.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags

from jaxlm import cli
from jaxlm.config import ConfigError

_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2",
    "TPU slice, e.g. v5e:4x4, v5p:4x4x4, v6e:16x16, or NVIDIA GPUs: h100, h200:2, h200:2x8")
_PROGRAMS = flags.DEFINE_list("programs", ["train", "decode"], "train and/or decode")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 0, "decode batch (0 = train micro-batch)")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 0, "decode KV-cache length (0 = train.seq_len)")
_XLA_OPS = flags.DEFINE_bool(
    "xla_ops", False, "set every ops implementation (attention, gmm, nsa, scan, lif) to xla: "
    "Pallas TPU kernels called outside shard_map cannot be partitioned over a multi-chip mesh")
_ROOFLINE = flags.DEFINE_bool(
    "roofline", False, "GPU topologies: print a per-kernel roofline estimate of each program")
_ROOF_BW = flags.DEFINE_float("roofline_bandwidth_gbs", 0.0,
                              "memory bandwidth for --roofline (0 = the one measured, below)")
_ROOF_PEAK = flags.DEFINE_float("roofline_peak_tflops", 0.0,
                                "matmul peak for --roofline (0 = the one measured, below)")
_ROOF_TOP = flags.DEFINE_integer("roofline_top", 25, "rows of --roofline's per-kernel table")

# (copy GB/s, bf16 matmul TFLOP/s) measured on the device: H200 in session 23's bench_train /
# bench_ops processes, H100 in the issues' runs (matmul 688) and tune_ops (copy 2.68-2.75 TB/s)
_MEASURED = {"NVIDIA H200": (3700.0, 730.0), "NVIDIA H100 80GB HBM3": (2700.0, 688.0)}


def _roofline(report) -> str:
  from experiments.bench import hlo_roofline
  bw, peak = _MEASURED.get(report.device_kind, (0.0, 0.0))
  bw, peak = _ROOF_BW.value or bw, _ROOF_PEAK.value or peak
  if not bw or not peak:
    raise app.UsageError(f"no measured rates for {report.device_kind!r}: pass "
                         "--roofline_bandwidth_gbs and --roofline_peak_tflops")
  ops = hlo_roofline.estimate(report.hlo_text, bw * 1e9, peak * 1e12)
  return (f"\n{report.what} roofline ({report.device_kind}, {bw:.0f} GB/s, {peak:.0f} TFLOP/s; "
          f"an estimate, not a timing):\n" + hlo_roofline.format_estimate(ops, 12, _ROOF_TOP.value))


def main(argv):
  del argv
  try:
    cfg = cli.config_from_flags()
  except ConfigError as e:
    cli.fail(e)
  from jaxlm import aot, gpu_targets
  if _ROOFLINE.value and not gpu_targets.is_gpu_topology(_TOPOLOGY.value):
    cli.fail(ConfigError(f"--roofline prices XLA GPU programs; {_TOPOLOGY.value!r} is not a GPU "
                         "topology (e.g. h100, h200:2)"))
  aot.quiet_libtpu()
  if _XLA_OPS.value:
    cfg = aot.with_xla_ops(cfg)
  try:
    result = aot.check(cfg, _TOPOLOGY.value, _PROGRAMS.value,
                       decode_batch=_DECODE_BATCH.value or None,
                       cache_len=_CACHE_LEN.value or None)
  except (aot.AotUnavailable, ConfigError, ValueError) as e:
    cli.fail(e)
  print(result.text(), flush=True)
  if _ROOFLINE.value:
    for r in result.reports:
      if r.hlo_text:
        print(_roofline(r), flush=True)
  if not result.ok:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
