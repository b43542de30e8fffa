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


def main(argv):
  del argv
  try:
    cfg = cli.config_from_flags()
  except ConfigError as e:
    cli.fail(e)
  from jaxlm import aot
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
  if not result.ok:
    raise SystemExit(1)


if __name__ == "__main__":
  app.run(main)
