"""NSA hyper-parameters (`NSAConfig`) and kernel tiling (`NSABlockConfig`, per device kind)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Structure of Native Sparse Attention (Yuan et al., 2025).

  block_len l: tokens per compression block; stride d: distance between compression blocks
  (block j covers tokens [j*d, j*d + l)); select_len l': tokens per selection block (block s
  covers [s*l', (s+1)*l')); n_select n: selected blocks per query and GQA group (forced ones
  included); window w: sliding-window length (keys pos-w < j <= pos); n_always_first: leading
  selection blocks always selected (of the query's segment); n_local: trailing blocks always
  selected (the block holding the query and the n_local-1 before it); scale: softmax scale of
  every branch (None = 1/sqrt(head_dim)).
  """
  block_len: int = 32
  stride: int = 16
  select_len: int = 64
  n_select: int = 16
  window: int = 512
  n_always_first: int = 1
  n_local: int = 2
  scale: float | None = None

  def __post_init__(self):
    l, d, ls = self.block_len, self.stride, self.select_len
    if min(l, d, ls, self.n_select, self.window) < 1:
      raise ValueError(f"NSAConfig sizes must be >= 1: {self}")
    if l % d or ls % d:
      raise ValueError(f"block_len ({l}) and select_len ({ls}) must be multiples of stride ({d})")
    if self.n_always_first < 0 or self.n_local < 0:
      raise ValueError(f"n_always_first / n_local must be >= 0: {self}")

  def replace(self, **kw) -> "NSAConfig":
    return dataclasses.replace(self, **kw)

  def n_cmp(self, seq_len: int) -> int:
    """Number of FULL compression blocks of a sequence of seq_len tokens."""
    return max(0, (seq_len - self.block_len) // self.stride + 1)

  def n_slc(self, seq_len: int) -> int:
    """Number of selection blocks (the last may be partial)."""
    return -(-seq_len // self.select_len)

  @classmethod
  def small(cls) -> "NSAConfig":
    """Tiny structure for CPU / interpret tests (several blocks at lengths ~100)."""
    return cls(block_len=8, stride=4, select_len=16, n_select=4, window=16)


@dataclasses.dataclass(frozen=True)
class NSABlockConfig:
  """Tiling of the Pallas NSA kernels.

  sel_block_k: keys per inner step of the selected-block kernels (divides select_len; the whole
  block by default). sel_block_q: queries per step of the selected-attention kernels (a power
  of two). 1: a forward / dq program owns one query's group of heads and walks its blocks.
  More: it owns sel_block_q consecutive queries x the group's heads and walks the union of
  their blocks, each loaded once for all of them (neighbouring queries mostly choose the same
  blocks), a row masked off the blocks its query did not choose; the dk/dv kernel gathers
  sel_block_q of a block's queries per step (rows = queries x heads), so its products are
  wider. sel_dq_block_q / sel_dkv_block_q: the same for the dq and the dk/dv kernels alone
  (None: sel_block_q), so the backward can take tiles while the forward does not (H100/H200
  default: forward 1, backward 4; see for_device). score_block_q: query positions per program
  of the selection-score kernel;
  score_block_k: compressed keys per inner step (a multiple of 16*select_len/stride so each step
  covers whole selection blocks). score_head_loop: the score kernel's rows are score_block_q
  query positions and it loops over the GQA group's heads, summing probabilities as it goes
  (False: rows are (query, head) pairs, one matmul per tile, and the group sum reduces the
  head axis). score_q_in_place: the row kernel reads q as [query tile, group, head_dim] blocks
  of [b, t, h, d] (when the group and head_dim are powers of two and the tile divides t)
  instead of from a transposed copy [b, kvh, t * group, head_dim]. The copy moves q twice (1.06
  ms of the 64k paper-shape forward on the H200), but the kernel itself slows more with the
  reshaped tile: 14.84 ms against 11.38 at 64k, 1.04 against 0.82 at 16k (H200, session 15,
  profiled in one process; whole forward 44.5 against 41.4 ms). Off.
  topn_kernel: top-n selection by the Triton kernel of ops/nsa/topn_triton.py (False: XLA
  top_k + sort); topn_tile_elems: score entries per program of it (rows x padded blocks);
  topn_num_warps: its Triton warps. bwd_chunk: queries per work item of the dk/dv kernel (a block
  selected by more queries is split over several items, partial sums reduced afterwards).
  *_warps / *_stages: Triton launch parameters.
  tpu_block_q: query positions per program of the TPU selected-attention kernels (rows =
  GQA group x tpu_block_q; a multiple of 16 so bf16 tiles fill the sublanes).
  tpu_prefetch_max: most int32 entries of one scalar-prefetch (SMEM) array per TPU call;
  longer sequences are split into query chunks of that many (tile, block) entries. SMEM is
  1 MiB on v5e/v6e/v5p; the dk/dv call holds two such arrays (2**18 entries fail to compile,
  2**16 compile). tpu_score_block_k: compressed keys per step of the TPU score kernel (lanes).
  Decode (ops/nsa/decode_triton.py and decode_select_triton.py, five kernels):
  decode_cmp_block_k: compressed entries per inner step of the compressed-branch kernel (a power
  of two >= 16); decode_cmp_splits: its programs per (batch row, kv head) over the compressed
  cache (flash-decoding split, merged by logsumexp); decode_cmp_num_stages: its Triton pipeline
  depth. decode_block_k: raw tokens per entry of the selected/window kernel (a power of two >=
  16 dividing select_len; None = min(select_len, 64)); decode_entries: entries per program of
  that kernel (the selected blocks and the window are cut into programs of this many entries);
  decode_num_warps / decode_num_stages: its Triton launch parameters (the warps also the
  compressed kernel's). decode_select_block: selection blocks per program of the score kernel (a
  power of two); decode_select_num_warps: Triton warps of that kernel and of the
  branch-combining kernel; decode_topn_num_warps: of the top-n kernel (one program per batch row
  and kv head); decode_fuse_topn: score all of a (batch row, kv head)'s selection blocks in one
  program and pick the top n there (one kernel, on decode_topn_num_warps, instead of two);
  decode_combine_dv: value columns per program of the combining kernel (a power of two).
  """
  sel_block_k: int | None = None
  sel_block_q: int = 1
  sel_dq_block_q: int | None = None
  sel_dkv_block_q: int | None = None
  sel_num_warps: int = 4
  sel_num_stages: int = 2
  score_block_q: int = 16
  score_block_k: int | None = None
  score_head_loop: bool = False
  score_q_in_place: bool = False
  topn_kernel: bool = True
  topn_tile_elems: int = 8192
  topn_num_warps: int = 4
  score_num_warps: int = 4
  score_num_stages: int = 2
  bwd_chunk: int = 64
  bwd_num_warps: int = 4
  bwd_num_stages: int = 2
  tpu_block_q: int = 16
  tpu_prefetch_max: int = 1 << 15
  tpu_score_block_k: int = 128
  decode_cmp_block_k: int = 64
  decode_cmp_splits: int = 16
  decode_cmp_num_stages: int = 2
  decode_block_k: int | None = None
  decode_entries: int = 2
  decode_num_warps: int = 4
  decode_num_stages: int = 2
  decode_select_block: int = 128
  decode_select_num_warps: int = 4
  decode_topn_num_warps: int = 4
  decode_fuse_topn: bool = False
  decode_combine_dv: int = 32

  def __post_init__(self):
    for name in ("sel_block_q", "sel_dq_block_q", "sel_dkv_block_q"):
      q = getattr(self, name)
      if q is None and name != "sel_block_q":
        continue
      if not isinstance(q, int) or q < 1 or q & (q - 1):
        raise ValueError(f"NSABlockConfig.{name} must be a power of two >= 1, got {q!r}")

  def bwd_block_q(self) -> tuple[int, int]:
    """Queries per step of the (dq, dk/dv) kernels: their own fields, else sel_block_q."""
    pick = lambda q: self.sel_block_q if q is None else q
    return pick(self.sel_dq_block_q), pick(self.sel_dkv_block_q)

  def replace(self, **kw) -> "NSABlockConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def for_device(cls, device_kind: str) -> "NSABlockConfig":
    kind = device_kind.lower()
    if "tpu" in kind:
      return cls(score_block_q=8, bwd_chunk=128, tpu_block_q=16, tpu_prefetch_max=1 << 15,
                 tpu_score_block_k=128)
    if any(s in kind for s in ("h100", "h200", "h800", "gh200")):
      # score kernel (paper GQA shape, H100, session 4): head loop with 16-query tiles 0.53 ms
      # at 8k / 14.8 ms at 64k (32-query tiles 0.66 / 20.5 ms); the row kernel then summed the
      # group by an f32 matmul (5.3 ms at 8k). 64-query tiles exceed shared memory.
      # top-n kernel (H200, 64k, sorting-network output): 2048 entries on 1 warp 2.19 ms vs
      # 8192 on 4 warps 4.63 ms (the old ascending-output rounds: 7.97 ms). Score kernel
      # (H200, 64k): the row kernel with its head reduction 12.6 ms on 8 warps (12.9 on 4) vs
      # the head loop 14.3 ms.
      # Decode compressed kernel (H200, batch 8, 64k cache, 64/4 heads, device time): 8 splits
      # of 64-entry steps on 3 stages 21.8 us (16 splits / 2 stages: 26.4 us; 67 MB of k/v at
      # ~3.5 TB/s with the logits). Selected/window kernel: 2 entries, 4 warps, 2 stages 7.6 us
      # (3 stages 11.3 us).
      # Selected-attention backward on 4-query tiles, forward on 1 (H200, session 14, paper
      # shape, random inputs; fwd+bwd minus fwd, both measured with the same tiles in one run):
      # backward 5.89 / 10.92 / 22.55 / 45.2 ms on 4-query tiles against 6.91 / 12.80 / 25.36 /
      # 48.7 at 8k / 16k / 32k / 64k, while the 4-query forward lost from 16k (5.17 vs 4.31 ms,
      # 22.4 vs 16.2 at 64k). This mix against 1 query everywhere (session 15, one process, two
      # repeats): NSA fwd+bwd 134.1 / 135.0 vs 137.1 / 137.1 ms at 64k, 28.0 / 28.0 vs 29.5 /
      # 29.4 at 16k; forwards equal.
      return cls(sel_num_warps=4, sel_num_stages=2, sel_dq_block_q=4, sel_dkv_block_q=4,
                 score_block_q=16, score_head_loop=False,
                 score_num_warps=8, topn_tile_elems=2048, topn_num_warps=1,
                 bwd_chunk=64, bwd_num_warps=4, decode_cmp_block_k=64, decode_cmp_splits=8,
                 decode_cmp_num_stages=3, decode_entries=2, decode_num_warps=4,
                 decode_num_stages=2)
    return cls()

  @classmethod
  def small(cls) -> "NSABlockConfig":
    """Small items so interpret tests split blocks over several bwd work items."""
    return cls(score_block_q=4, bwd_chunk=8, tpu_block_q=16, tpu_prefetch_max=256,
               decode_cmp_block_k=16, decode_cmp_splits=3, decode_entries=2,
               decode_select_block=2, decode_combine_dv=8)


def default_block_config() -> NSABlockConfig:
  from ops._backend import device_kind
  return NSABlockConfig.for_device(device_kind())
