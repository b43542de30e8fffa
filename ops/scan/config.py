"""Block sizes of the linear-scan kernels, with per-device-kind heuristics.

GPU (pallas_triton): one program owns `block_c` channels of one batch row and walks time
inside the kernel carrying h in registers. The op is memory-bound and has little parallelism
besides batch*channels, so the kernel keeps `time_chunk` rows of every input in flight
(a ring of prefetched rows, fully unrolled): bytes in flight ~ inputs * time_chunk * B * C *
itemsize, which must cover HBM latency * bandwidth (~2 MB on an H100).
TPU (pallas_tpu): blocks of (tpu_block_t time steps, tpu_block_c channels on lanes).
Mosaic GPU (pallas_mosaic_gpu): one CTA per (batch row, mgpu_block_c channels); tiles of
mgpu_time_chunk steps stream through shared memory, mgpu_stages in flight.
"""
from __future__ import annotations

import dataclasses

MAX_SEGMENT = 256


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  # pallas_triton, forward
  block_c: int = 64
  time_chunk: int = 32
  num_warps: int = 2
  num_stages: int = 1
  # pallas_triton, backward (3 inputs in flight instead of 2)
  bwd_block_c: int = 64
  bwd_time_chunk: int = 24
  bwd_num_warps: int = 2
  # chunks of bwd_time_chunk rows in flight in the serial backward: a longer ring at the same
  # unrolled body (more bytes in flight without more compile time). H200, session 16, B1 T8192
  # C8192 f32 fwd+bwd: 0.774 ms with 1, 0.779 with 2
  bwd_prefetch_chunks: int = 1
  # pallas_triton: >0 runs time segments of this many steps as separate programs chained by
  # their carries (ops/scan/pallas_triton_segments.py), for small batches; forward, backward
  segment: int = 0
  bwd_segment: int = 0
  lookback: bool = False    # decoupled look-back instead of the chain; interpret mode only
  # pallas_tpu
  tpu_block_c: int = 512
  tpu_block_t: int = 64
  # pallas_mosaic_gpu (fwd and bwd): channels per CTA, time steps per shared-memory tile,
  # tiles in flight
  mgpu_block_c: int = 128
  mgpu_time_chunk: int = 32
  mgpu_stages: int = 0      # 0: as many as fit in shared memory (ops/_mosaic_gpu.fit_stages)

  def __post_init__(self):
    for f in ("block_c", "bwd_block_c"):
      v = getattr(self, f)
      if v < 1 or v & (v - 1):
        raise ValueError(f"ScanConfig.{f} must be a power of 2, got {v}")
    if self.time_chunk < 1 or self.bwd_time_chunk < 1:
      raise ValueError("ScanConfig time chunks must be >= 1")
    if self.bwd_prefetch_chunks < 1:
      raise ValueError(f"ScanConfig.bwd_prefetch_chunks must be >= 1, got "
                       f"{self.bwd_prefetch_chunks}")
    for f in ("segment", "bwd_segment"):
      if not 0 <= getattr(self, f) <= MAX_SEGMENT:
        raise ValueError(f"ScanConfig.{f} must be in [0, {MAX_SEGMENT}] (a segment's steps are "
                         f"unrolled and held in registers), got {getattr(self, f)}")
    if self.tpu_block_c % 128 or self.tpu_block_t % 8:
      raise ValueError("ScanConfig: tpu_block_c must be a multiple of 128 and tpu_block_t of 8")

  @staticmethod
  def for_device(device_kind: str | None = None) -> "ScanConfig":
    kind = (device_kind or "").lower()
    if "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind:
      # Best of a 4-config sweep on an H100 (B1 T8192 C8192 f32): 57% of copy fwd, 68% fwd+bwd.
      # Forward in 64-step segments (H200, session 11, same run, copy 3529 GB/s): 0.257 ms
      # (89% of copy) vs 0.349 ms serial. The segment backward lost (64 steps: 1.093 ms
      # fwd+bwd, 32: 0.882, serial 0.877), so the backward stays serial.
      return ScanConfig(block_c=64, time_chunk=48, num_warps=2, bwd_block_c=64,
                        bwd_time_chunk=32, bwd_num_warps=2, segment=64)
    if "a100" in kind:
      return ScanConfig(block_c=64, time_chunk=24, num_warps=2, bwd_time_chunk=16)
    if "tpu" in kind:
      return ScanConfig(tpu_block_c=512, tpu_block_t=64)
    return ScanConfig()
