"""NVIDIA GPUs the XLA GPU compiler can target from a host without one (jaxlm/aot.py).

The CUDA PJRT plugin (`pip install -e .[gpu]`) describes a GPU topology that is not attached
when it is given a target config: the device description XLA would otherwise read from the
driver (SM count, shared memory, compute capability…), as a GpuTargetConfigProto in text form.
Compiling for such devices runs XLA's GPU pipeline (fusion, scheduling, buffer assignment,
Triton and cuDNN fusions, Pallas Triton / Mosaic GPU custom calls) on the CPU, without
autotuning (no GPU to time candidates on, so XLA takes its default GEMM configs).

Topology names: "<gpu>" (one GPU), "<gpu>:<n>" (n GPUs of one host), "<gpu>:<hosts>x<n>".
The numbers below are the datasheets' (memory size as the driver reports it).
"""
from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  device_kind: str          # what jax's Device.device_kind says on the real GPU
  sm_count: int
  compute_capability: tuple
  memory_bytes: int
  memory_bandwidth: int     # bytes / s
  l2_bytes: int
  clock_ghz: float
  smem_per_sm: int
  smem_per_block_optin: int


_MIB = 1024 ** 2
SPECS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", sm_count=132, compute_capability=(9, 0),
                    memory_bytes=81559 * _MIB, memory_bandwidth=3_350_000_000_000,
                    l2_bytes=50 * _MIB, clock_ghz=1.98, smem_per_sm=228 * 1024,
                    smem_per_block_optin=227 * 1024),
    "h200": GpuSpec("NVIDIA H200", sm_count=132, compute_capability=(9, 0),
                    memory_bytes=143771 * _MIB, memory_bandwidth=4_800_000_000_000,
                    l2_bytes=50 * _MIB, clock_ghz=1.98, smem_per_sm=228 * 1024,
                    smem_per_block_optin=227 * 1024),
}

# jax's GPU client reserves this fraction of the memory for its allocator unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (or preallocation is off: then the whole card).
DEFAULT_MEM_FRACTION = 0.75


def target_config(spec: GpuSpec) -> str:
  """The GpuTargetConfigProto text the CUDA plugin takes as `target_config`."""
  major, minor = spec.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
  shared_memory_per_block_optin: {spec.smem_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{spec.device_kind}"
"""


_NAME_RE = re.compile(r"^(?P<gpu>[a-z0-9]+)(?::(?:(?P<hosts>\d+)x)?(?P<n>\d+))?$")


def is_gpu_topology(name: str) -> bool:
  return name.split(":")[0].lower() in SPECS


def parse(name: str) -> tuple[GpuSpec, int, int]:
  """"h200:2" -> (spec, hosts=1, gpus per host=2)."""
  m = _NAME_RE.match(name.lower())
  if not m or m.group("gpu") not in SPECS:
    raise ValueError(f"GPU topology {name!r}: expected <gpu>[:<gpus>] or <gpu>:<hosts>x<gpus> "
                     f"with <gpu> one of {sorted(SPECS)}, e.g. h100:8 or h200:2x8")
  hosts, n = int(m.group("hosts") or 1), int(m.group("n") or 1)
  if hosts < 1 or n < 1:
    raise ValueError(f"GPU topology {name!r}: hosts and GPUs per host must be >= 1")
  return SPECS[m.group("gpu")], hosts, n


def usable_memory_bytes(device_kind: str) -> int | None:
  """Memory a jax program gets on this GPU: the card's times jax's allocator fraction
  (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75; the whole card with preallocation off)."""
  spec = next((s for s in SPECS.values() if s.device_kind == device_kind), None)
  if spec is None:
    return None
  if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0"):
    return spec.memory_bytes
  frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))
  return int(spec.memory_bytes * frac)
