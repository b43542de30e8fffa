"""Block sizes of the attention kernels, with per-device-kind heuristics."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionBlockConfig:
  """Tiling of the Pallas attention kernels.

  block_q / block_kv: forward tile (queries per program, keys per inner step).
  bwd_block_q / bwd_block_kv: backward tiles (the dq kernel iterates kv; also the dk/dv
    kernel's unless dkv_* is set).
  dkv_block_q / dkv_block_kv / dkv_num_warps / dkv_num_stages: the dk/dv kernel's own tile
    and launch parameters (None: the bwd_* value). It holds a kv tile and iterates q, so it
    wants the transposed shape of the dq kernel's tile (as in Triton's fused-attention
    tutorial: a tall kv tile, short q steps).
  num_warps / num_stages (+ bwd_*): Triton launch parameters.
  decode_block_kv / decode_splits: flash-decoding tile and number of max_len splits.
  bwd_min_programs: the dk/dv kernel runs one program per (kv block, batch, kv head) and loops
    over the query heads of the GQA group; when that grid is smaller than this, the group is
    split over more programs (f32 partial dK/dV summed afterwards) so the GPU is filled. 0 never
    splits. NSA's packed compressed branch (group 256, ~1k keys at 16k tokens) is the case.
  heavy_first: with a causal mask (no window) the forward and dq grids run the last query
    blocks (the most keys) first, so the short programs fill the tail of the launch.
  mgpu_block_q / mgpu_block_kv / mgpu_stages / mgpu_heavy_first: the Mosaic GPU forward
    (ops/attention/pallas_mosaic_gpu.py): query rows per compute warpgroup (a CTA has two),
    keys per step, K/V shared-memory slots, and heavy_first for its grid. H200, B1 H16 D128
    causal bf16, same run: 128 keys x 2 slots 0.765 / 2.334 / 7.363 ms at 8k / 16k / 32k
    (64 x 2: 0.843 / 2.188 / 8.143; 64 x 3: 0.798 / 2.516 / 8.435); without heavy_first
    0.700 / 2.196 / 7.300 ms.
  mgpu_backward / mgpu_bwd_block / mgpu_bwd_stages: the Mosaic GPU forward's backward runs
    the Mosaic GPU dq and dk/dv kernels (ops/attention/pallas_mosaic_gpu_bwd.py: 2 x block
    query rows / keys per CTA, stages ring slots) instead of the Triton ones. On by default
    on Hopper: H200, B1 H16 D128 causal bf16 fwd+bwd, same process as cuDNN (session 13):
    2 stages 0.998 / 0.918 / 0.914x cuDNN at 8k / 16k / 32k, 3 stages 0.927 / 0.849 / 0.879x,
    the Triton backward 0.806 / 0.771 / 0.807x.
  """
  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 3
  bwd_block_q: int = 64
  bwd_block_kv: int = 64
  bwd_num_warps: int = 4
  bwd_num_stages: int = 2
  decode_block_kv: int = 64
  decode_splits: int = 16
  decode_num_warps: int = 4
  decode_num_stages: int = 2
  bwd_min_programs: int = 0
  dkv_block_q: int | None = None
  dkv_block_kv: int | None = None
  dkv_num_warps: int | None = None
  dkv_num_stages: int | None = None
  heavy_first: bool = True
  mgpu_block_q: int = 64
  mgpu_block_kv: int = 128
  mgpu_stages: int = 2
  mgpu_heavy_first: bool = False
  mgpu_backward: bool = False
  mgpu_bwd_block: int = 64
  mgpu_bwd_stages: int = 2

  def __post_init__(self):
    # the Triton wrapper pads each length once to the largest tile, so every tile must divide it
    for f in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv", "dkv_block_q",
              "dkv_block_kv", "decode_block_kv"):
      v = getattr(self, f)
      if v is not None and (v < 1 or v & (v - 1)):
        raise ValueError(f"AttentionBlockConfig.{f} must be a power of two, got {v}")
    if self.mgpu_block_q % 64 or self.mgpu_block_kv % 64 or not 0 < self.mgpu_block_kv <= 256:
      raise ValueError(f"AttentionBlockConfig mgpu_block_q ({self.mgpu_block_q}) must be a "
                       f"multiple of 64 and mgpu_block_kv ({self.mgpu_block_kv}) one of 64..256")
    if self.mgpu_bwd_block % 64 or self.mgpu_bwd_stages < 1:
      raise ValueError(f"AttentionBlockConfig mgpu_bwd_block ({self.mgpu_bwd_block}) must be a "
                       f"multiple of 64 and mgpu_bwd_stages ({self.mgpu_bwd_stages}) >= 1")
    if self.mgpu_stages < 1:
      raise ValueError(f"AttentionBlockConfig.mgpu_stages must be >= 1, got {self.mgpu_stages}")
    for f in ("num_warps", "bwd_num_warps", "dkv_num_warps", "decode_num_warps", "num_stages",
              "bwd_num_stages", "dkv_num_stages", "decode_num_stages", "decode_splits"):
      v = getattr(self, f)
      if v is not None and v < 1:
        raise ValueError(f"AttentionBlockConfig.{f} must be positive, got {v}")

  @property
  def dkv_tiles(self) -> tuple[int, int, int, int]:
    """(block_q, block_kv, num_warps, num_stages) of the dk/dv kernel."""
    pick = lambda own, bwd: bwd if own is None else own
    return (pick(self.dkv_block_q, self.bwd_block_q), pick(self.dkv_block_kv, self.bwd_block_kv),
            pick(self.dkv_num_warps, self.bwd_num_warps),
            pick(self.dkv_num_stages, self.bwd_num_stages))

  def replace(self, **kw) -> "AttentionBlockConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def for_device(cls, device_kind: str, head_dim: int = 128) -> "AttentionBlockConfig":
    """Defaults for a device kind (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v5p', 'cpu')."""
    kind = device_kind.lower()
    if "tpu" in kind:
      # Mosaic: tiles are multiples of (8, 128); larger tiles amortise per-step overhead.
      return cls(block_q=128, block_kv=128, bwd_block_q=128, bwd_block_kv=128,
                 decode_block_kv=128)
    if "h100" in kind or "h200" in kind or "h800" in kind or "gh200" in kind:
      if head_dim > 128:
        return cls(block_q=64, block_kv=64, num_warps=4, num_stages=2, bwd_block_q=32,
                   bwd_block_kv=64, bwd_num_warps=4, bwd_num_stages=2, bwd_min_programs=528)
      # bwd_min_programs: 4 per SM of an H100 / H200 (132), so causal imbalance between early
      # and late kv blocks evens out over several waves. Backward tiles from a sweep on an
      # H200 (bf16 causal, B1 H16 D128 32k): dq 128x64 on 8 warps / 3 stages 11.2 ms vs
      # 12.3 ms for 64x64 / 4 / 2; dk/dv 64 queries x 128 keys on 8 warps / 3 stages 15.6 ms
      # vs 16.9 ms (32 or 16 queries x 128 keys on 4 warps: 59-94 ms, probably register
      # spills; not checked).
      # Forward tile (H200, B1 H16 D128 causal bf16, device time): 256 x 64 on 8 warps / 3
      # stages 8.45 ms at 32k (0.775x cuDNN) vs 9.73 ms for 128 x 64 (0.673x); at 8k 0.722 vs
      # 0.716 ms. 128 x 128 on 4 warps: 18.1 ms (register-bound).
      return cls(block_q=256, block_kv=64, num_warps=8, num_stages=3, bwd_block_q=128,
                 bwd_block_kv=64, bwd_num_warps=8, bwd_num_stages=3, bwd_min_programs=528,
                 dkv_block_q=64, dkv_block_kv=128, dkv_num_warps=8, dkv_num_stages=3,
                 mgpu_backward=True)
    if head_dim > 128:
      return cls(block_q=64, block_kv=32, num_stages=2, bwd_block_q=32, bwd_block_kv=32)
    return cls()

  @classmethod
  def small(cls) -> "AttentionBlockConfig":
    """Tiny tiles used by interpret-mode tests so several blocks and ragged edges occur."""
    return cls(block_q=16, block_kv=16, bwd_block_q=16, bwd_block_kv=16, decode_block_kv=16,
               decode_splits=3)


def default_config(head_dim: int = 128) -> AttentionBlockConfig:
  from ops._backend import device_kind
  return AttentionBlockConfig.for_device(device_kind(), head_dim)
