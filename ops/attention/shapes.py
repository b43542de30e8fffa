"""Named shape sets of the attention op: `ci` (small, CPU) and `bench` (GPU benchmark)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool = True
  window: int | None = None

  @property
  def name(self) -> str:
    s = f"B{self.batch} T{self.seq} H{self.heads}"
    if self.kv_heads != self.heads:
      s += f"/KV{self.kv_heads}"
    s += f" D{self.head_dim}" + (" causal" if self.causal else "")
    if self.window is not None:
      s += f" w{self.window}"
    return s

  def fwd_flops(self) -> float:
    """4·B·H·T²·D, halved for causal; a window counts only its visible keys."""
    t = self.seq
    if self.window is not None and self.window < t:
      w = self.window
      pairs = w * (w + 1) / 2 + (t - w) * w
    elif self.causal:
      pairs = t * t / 2
    else:
      pairs = t * t
    return 4.0 * self.batch * self.heads * pairs * self.head_dim


SHAPES = {
    "ci": (
        AttentionShape(1, 256, 4, 4, 64),
        AttentionShape(2, 200, 4, 2, 64, window=64),
    ),
    "bench": (
        AttentionShape(1, 8192, 16, 16, 128),
        AttentionShape(1, 16384, 16, 16, 128),
        AttentionShape(1, 32768, 16, 16, 128),
        AttentionShape(1, 16384, 16, 4, 128, window=1024),
    ),
}
