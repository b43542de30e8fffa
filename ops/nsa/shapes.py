"""Named shape sets of the NSA op: `ci` (small, CPU) and `bench` (GPU benchmark)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAShape:
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  decode_batch: int = 8

  @property
  def name(self) -> str:
    return f"B{self.batch} T{self.seq} H{self.heads}/KV{self.kv_heads} D{self.head_dim}"


SHAPES = {
    "ci": (NSAShape(1, 256, 4, 1, 64, decode_batch=2),),
    "bench": tuple(NSAShape(1, t, 64, 4, 128) for t in (8192, 16384, 32768, 65536)),
    # the two ends of the sweep, longest first (short device sessions)
    # 8k and 16k only: the per-branch breakdown in a short device call
    "bench_short": tuple(NSAShape(1, t, 64, 4, 128) for t in (8192, 16384)),
    "bench_ends": tuple(NSAShape(1, t, 64, 4, 128) for t in (65536, 8192)),
    # decode only (experiments/bench/nsa.py runs just the decode rows for sets named *_decode):
    # batch 8, caches of 16k and 64k tokens
    "bench_decode": tuple(NSAShape(1, t, 64, 4, 128) for t in (16384, 65536)),
    "ci_decode": (NSAShape(1, 256, 4, 1, 64, decode_batch=2),),
}
