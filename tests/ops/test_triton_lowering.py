"""Every Pallas Triton kernel of ops/ lowers for an H100 at benchmark shapes and passes the MLIR
verifier, on this CPU-only host (forward and backward where the op has one).

This catches, in CI, what otherwise fails only when the GPU compiles a kernel (a traced loop
lower bound next to a constant one broke the NSA decode kernel that way; see
op_testing.verified_triton_lowering). Numerics are the other test files' job.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from tests.ops import op_testing as ot

pytestmark = pytest.mark.skipif(
    not ot.triton_lowering_on_cpu(),
    reason="this jaxlib compiles Pallas Triton while lowering: run on the device instead")

sds = jax.ShapeDtypeStruct
BF16, F32 = jnp.bfloat16, jnp.float32


def _grad(fn, argnums):
  """fwd + bwd of sum(fn(...)[0] or fn(...)) w.r.t. argnums."""
  def loss(*a):
    out = fn(*a)
    out = out[0] if isinstance(out, tuple) else out
    return out.astype(F32).sum()
  return jax.grad(loss, argnums=argnums)


def test_attention_fwd_bwd_and_decode():
  from ops.attention import attention, decode_attention
  q, kv = sds((1, 8192, 16, 128), BF16), sds((1, 8192, 4, 128), BF16)
  fn = functools.partial(attention, causal=True, window=512, implementation="pallas_triton")
  assert ot.verified_triton_lowering(_grad(fn, (0, 1, 2)), q, kv, kv) >= 2
  dec = functools.partial(decode_attention, implementation="pallas_triton")
  n = ot.verified_triton_lowering(dec, sds((8, 1, 64, 128), BF16), sds((8, 65536, 4, 128), BF16),
                                  sds((8, 65536, 4, 128), BF16), sds((8,), jnp.int32))
  assert n >= 1
  # layer-stacked caches read at a traced layer (a scan over layers)
  stacked = lambda q, k, v, n, layer: dec(q, k, v, n, layer=layer)
  n = ot.verified_triton_lowering(stacked, sds((8, 1, 64, 128), BF16),
                                  sds((16, 8, 65536, 4, 128), BF16),
                                  sds((16, 8, 65536, 4, 128), BF16), sds((8,), jnp.int32),
                                  sds((), jnp.int32))
  assert n >= 1


def test_attention_dkv_kernel_does_not_grow_with_the_gqa_group():
  """NSA's packed compressed branch runs ops.attention with GQA groups of 256 heads. Unrolled
  over the group, the dk/dv module reached 169k lines of MLIR and the NSA backward took minutes
  to compile on the H100; past the unroll limit it must stay the size of a small group's."""
  from ops.attention import AttentionBlockConfig, attention
  kv = sds((1, 512, 1, 128), BF16)
  h100 = AttentionBlockConfig.for_device("NVIDIA H100 80GB HBM3")

  def sizes(h, config):
    fn = functools.partial(attention, causal=True, implementation="pallas_triton", config=config)
    return ot.triton_module_sizes(_grad(fn, (0, 1, 2)), sds((1, 512, h, 128), BF16), kv, kv)

  whole = {h: sizes(h, h100.replace(bwd_min_programs=0)) for h in (16, 256)}   # one program
  assert len(whole[256]) == 3                                                   # fwd, dq, dkv
  assert max(whole[256]) <= max(whole[16]) < 5000, whole
  # the default splits the group over programs (8 kv blocks here): slices stay small too
  split = sizes(256, h100)
  assert len(split) == 3 and max(split) < 5000, split


def test_gmm_fwd_bwd():
  from ops.gmm import gmm
  fn = functools.partial(gmm, implementation="pallas_triton")
  args = (sds((32768, 2048), BF16), sds((64, 2048, 1408), BF16), sds((64,), jnp.int32))
  assert ot.verified_triton_lowering(_grad(fn, (0, 1)), *args) >= 2     # gmm and tgmm (dw)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_lif_and_scan_fwd_bwd(dtype):
  from ops.lif import lif
  from ops.scan import linear_scan
  x = sds((1, 1024, 8192), dtype)
  fn = functools.partial(lif, implementation="pallas_triton")
  assert ot.verified_triton_lowering(_grad(fn, (0,)), x) >= 2
  fn = functools.partial(linear_scan, implementation="pallas_triton")
  assert ot.verified_triton_lowering(_grad(fn, (0, 1)), x, x) >= 2


def test_nsa_fwd_bwd_paper_shape():
  """Compressed (ops.attention), selection scores + top-n, selected fwd / dq / dkv, window."""
  from ops import nsa
  from ops.nsa.config import NSAConfig
  cfg, t = NSAConfig(), 8192
  q = sds((1, t, 64, 128), BF16)
  kc = sds((1, cfg.n_cmp(t), 4, 128), BF16)
  raw = sds((1, t, 4, 128), BF16)
  gates = sds((1, t, 64, 3), BF16)
  fn = functools.partial(nsa.nsa, cfg=cfg, implementation="pallas_triton")
  n = ot.verified_triton_lowering(_grad(fn, tuple(range(8))), q, kc, kc, raw, raw, raw, raw,
                                  gates)
  assert n >= 6


@pytest.mark.parametrize("sel_block_q", [4, 8])
def test_nsa_selected_query_tiles(sel_block_q):
  """The query-tile selected-attention kernels (forward, dq) beside the dk/dv ones."""
  from ops import nsa
  from ops.nsa.config import NSABlockConfig
  t, n = 8192, 16
  q, kv = sds((1, t, 64, 128), BF16), sds((1, t, 4, 128), BF16)
  idx = sds((1, t, 4, n), jnp.int32)
  cfg = NSABlockConfig.for_device("NVIDIA H100 80GB HBM3").replace(
      sel_block_q=sel_block_q, sel_dq_block_q=sel_block_q, sel_dkv_block_q=sel_block_q)
  fn = lambda q, k, v, idx: nsa.selected_attention(q, k, v, idx, select_len=64,
                                                   implementation="pallas_triton", config=cfg)
  sizes = ot.triton_module_sizes(_grad(fn, (0, 1, 2)), q, kv, kv, idx)
  assert len(sizes) == 5       # forward, dq, dk/dv partials, their sums (dk, dv)


@pytest.mark.parametrize("in_place", [False, True])
def test_nsa_selection_scores_q_layouts(in_place):
  """The row score kernel on a transposed copy of q, or reading q's [tile, group, d] blocks."""
  from ops import nsa
  from ops.nsa.config import NSABlockConfig, NSAConfig
  cfg, t = NSAConfig(), 8192
  q, kc = sds((1, t, 64, 128), BF16), sds((1, cfg.n_cmp(t), 4, 128), BF16)
  lse = sds((1, 64, t), jnp.float32)
  bcfg = NSABlockConfig.for_device("NVIDIA H200").replace(score_q_in_place=in_place)
  fn = lambda q, kc, lse: nsa.select_blocks(q, kc, lse, cfg=cfg, implementation="pallas_triton",
                                            config=bcfg)
  assert ot.verified_triton_lowering(fn, q, kc, lse) == 2      # scores, top-n


def test_nsa_decode_64k():
  from ops.nsa import decode
  from ops.nsa.config import NSAConfig
  cfg, b, t = NSAConfig(), 8, 65536
  args = ([sds((b, 64, 128), BF16)] + [sds((b, cfg.n_cmp(t), 4, 128), BF16)] * 2
          + [sds((b, t, 4, 128), BF16)] * 4 + [sds((b, 64, 3), BF16), sds((b,), jnp.int32)])
  fn = functools.partial(decode.nsa_decode, cfg=cfg, implementation="pallas_triton")
  assert ot.verified_triton_lowering(fn, *args) == 5   # compressed, scores, top-n, slc+win, combine
