"""NSA one-token decode on GPU (Pallas, Triton lowering): the "pallas_triton" implementation of
ops.nsa.decode.nsa_decode.

Five kernels, each program owning ALL query heads of one GQA group (padded to >= 16 rows for
the tensor cores) so every key is read once per kv head; between them XLA only reshapes (a
decode step is a few tens of microseconds, so every extra XLA fusion is a visible share):

1. Compressed branch, flash-decoding style: grid (decode_cmp_splits, b, kvh); a program takes
   one chunk of the compressed cache (up to the row's valid entries), writes its partial
   (o, lse) and its scaled logits s (the selection needs p = exp(s - lse) with the FINAL lse,
   so the logits are kept instead of reading k_cmp a second time).
2. Selection scores, grid (selection-block chunks, b, kvh): merges the partial lse of each
   head and sums p over the group's heads straight into selection-block scores (the overlap
   mapping of ops.nsa.compress.slc_from_cmp as row-shifted tile loads of the logits); then
   top-n, grid (b, kvh), as ops/nsa/topn_triton.py does for training (same candidates, forced
   blocks and tie rule as select_from_scores). With decode_fuse_topn the two are one kernel,
   grid (b, kvh): each program scores all its blocks and picks from them. These kernels are
   in ops/nsa/decode_select_triton.py.
3. Selected blocks + window: the selected blocks (select_len tokens each) and the window are cut
   into entries of decode_block_k tokens, each program computing its entries' (load offset,
   first, last position) from the block indices and the row's length; grid (programs, b, kvh)
   with decode_entries entries per program, the first programs reading k_slc / v_slc, the rest
   k_win / v_win.
4. Combine, grid (value-column chunks, b, kvh): merges each branch's partials by logsumexp and gates the three
   branches as the "xla" path does.

The raw caches are never copied or padded (a copy would cost more than the decode): an entry
near the end of a cache loads the last decode_block_k rows (offset clamped) and masks by
absolute position, so any cache length >= decode_block_k works without padding. Caches stacked
over layers ([layers, batch, ...], with `layer`) are indexed at the layer inside the kernels,
so XLA does not copy the layer's slice out either; only a cache shorter than one block gets its
layer's slice copied and padded.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops import _stacked
from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.nsa.config import NSABlockConfig, NSAConfig, default_block_config
from ops.nsa.kernel_common import dot_nt as _dot_nt
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import online_softmax_step as _online
from ops.nsa.kernel_common import pad_axis as _pad_axis
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import prec as _prec
from ops.nsa.kernel_common import triton_compiler as _compiler
from ops.nsa.decode_select_triton import layout, n_valid, select_blocks

_F32 = jnp.float32
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_MAX_ROWS = 128       # group rows per tile (acc [rows, dv] f32 lives in registers)



def _is_tile(x: int) -> bool:
  return x >= 16 and x & (x - 1) == 0


def _finish(carry, o_ref, lse_ref):
  m, l, acc = carry
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o_ref[...] = acc / l_safe[:, None]
  lse_ref[...] = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)


def _init(rows, dv):
  return (jnp.full((rows,), -jnp.inf, _F32), jnp.zeros((rows,), _F32),
          jnp.zeros((rows, dv), _F32))


# ------------------------------------------------------------------------ compressed branch
def _cmp_kernel(len_ref, layer_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, s_ref, *, cfg, n_cmp,
                scale, bk, steps, s_off, prec):
  split = pl.program_id(0)
  nv = n_valid(len_ref, cfg, n_cmp)
  layer = layer_ref[()]
  n_max = k_ref.shape[1]               # k_ref, v_ref: [layers, n, d]
  q = q_ref[...]
  j_lo = split * (steps * bk)
  n_it = jnp.minimum(lax.div(jnp.maximum(nv - j_lo, 0) + (bk - 1), jnp.int32(bk)), steps)

  def body(i, carry):
    j0 = j_lo + i * bk
    jc = jnp.minimum(j0, n_max - bk)     # the last block of the cache may overlap the previous
    k = k_ref[layer, pl.ds(jc, bk), :]
    v = v_ref[layer, pl.ds(jc, bk), :]
    jpos = jc + _iota(bk)
    s = _dot_nt(q, k, prec) * scale
    s = jnp.where((jpos < nv)[None, :], s, -jnp.inf)
    s_ref[:, pl.ds(jc + s_off, bk)] = s
    s = jnp.where((jpos >= j0)[None, :], s, -jnp.inf)
    return _online(s, v, carry, prec)

  carry = lax.fori_loop(0, n_it, body, _init(q.shape[0], v_ref.shape[-1]))
  _finish(carry, o_ref, lse_ref)


def _compressed(q4, k_cmp, v_cmp, lengths, layer, *, cfg: NSAConfig, max_len, scale,
                bc: NSABlockConfig, interpret):
  """k_cmp, v_cmp: [(layers,) b, n_cmp, kvh, d] (stacked with layer).
  -> o [Sp,b,kvh,gp,dv] f32, lse [Sp,b,kvh,gp] (rows >= S unwritten), s [b,kvh,gp,width]
  f32 (logit j at column F*per + j, valid where j < n_valid), S."""
  b, hk, gp, d = q4.shape
  dv = v_cmp.shape[-1]
  n_cmp = k_cmp.shape[-3]
  bk = bc.decode_cmp_block_k
  (kc, vc), layer = _stacked.for_kernel((k_cmp, v_cmp), layer, bk, (d, dv))
  n, n_layers = kc.shape[2], kc.shape[0]
  n_blocks = -(-n // bk)
  steps = -(-n_blocks // max(1, bc.decode_cmp_splits))
  splits = -(-n_blocks // steps)
  sp = _pow2(splits, 1)
  _, front, width = layout(cfg, n, max_len)
  kern = functools.partial(_cmp_kernel, cfg=cfg, n_cmp=n_cmp, scale=scale, bk=bk, steps=steps,
                           s_off=front * (cfg.select_len // cfg.stride), prec=_prec(q4.dtype))
  o, lse, s = pl.pallas_call(
      kern, grid=(splits, b, hk),
      in_specs=[
          pl.BlockSpec((None,), lambda s, i, j: (i,)),
          pl.BlockSpec((None,), lambda s, i, j: (0,)),
          pl.BlockSpec((None, None, gp, d), lambda s, i, j: (i, j, 0, 0)),
          pl.BlockSpec((n_layers, None, n, None, d), lambda s, i, j: (0, i, 0, j, 0)),
          pl.BlockSpec((n_layers, None, n, None, dv), lambda s, i, j: (0, i, 0, j, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, dv), lambda s, i, j: (s, i, j, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda s, i, j: (s, i, j, 0)),
          pl.BlockSpec((None, None, gp, width), lambda s, i, j: (i, j, 0, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((sp, b, hk, gp, dv), _F32),
                 jax.ShapeDtypeStruct((sp, b, hk, gp), _F32),
                 jax.ShapeDtypeStruct((b, hk, gp, width), _F32)],
      interpret=interpret, name="nsa_decode_cmp",
      **_compiler(interpret, bc.decode_num_warps, bc.decode_cmp_num_stages),
  )(lengths, layer.reshape(1), q4, kc, vc)
  return o, lse, s, splits


# ------------------------------------------------------------------- selected + window branch
def _sw_kernel(len_ref, layer_ref, idx_ref, q_ref, ks_ref, vs_ref, kw_ref, vw_ref, o_ref,
               lse_ref, *, cfg: NSAConfig, scale, bk, per, n_sel_prog, len_s, len_w, prec):
  """Program p < n_sel_prog: entries [p*per, (p+1)*per) of the selected blocks (block slot
  e // (select_len/bk), sub-block e % (select_len/bk)); the other programs: entries of the
  window. An entry is bk raw tokens loaded from a clamped offset and masked by position."""
  q = q_ref[...]
  pos = len_ref[()] - 1
  layer = layer_ref[()]
  p = pl.program_id(0)
  subs = cfg.select_len // bk
  w = min(cfg.window, len_w)
  n_win = -(-w // bk)
  n_idx = idx_ref.shape[0]

  def sel_entry(e):
    slot = lax.div(e, jnp.int32(subs))
    blk = idx_ref[jnp.minimum(slot, n_idx - 1)]
    real = (blk >= 0) & (slot < cfg.n_select)
    start = jnp.maximum(blk, 0) * cfg.select_len + lax.rem(e, jnp.int32(subs)) * bk
    hi = jnp.minimum(jnp.minimum(pos, start + bk - 1), len_s - 1)
    return start, jnp.where(real, start, 1), jnp.where(real, hi, 0)

  def win_entry(e):
    start = jnp.maximum(0, pos - w + 1) + e * bk
    real = e < n_win
    hi = jnp.minimum(jnp.minimum(pos, start + bk - 1), len_w - 1)
    return start, jnp.where(real, start, 1), jnp.where(real, hi, 0)

  def run(k_ref, v_ref, entry, first):
    n_rows = k_ref.shape[1]            # [layers, rows, d]

    def body(i, carry):
      start, lo, hi = entry(first + i)
      off = jnp.clip(start, 0, n_rows - bk)
      k = k_ref[layer, pl.ds(off, bk), :]
      v = v_ref[layer, pl.ds(off, bk), :]
      kpos = off + _iota(bk)
      ok = (kpos >= lo) & (kpos <= hi)
      s = jnp.where(ok[None, :], _dot_nt(q, k, prec) * scale, -jnp.inf)
      return _online(s, v, carry, prec)
    return lax.fori_loop(0, per, body, _init(q.shape[0], v_ref.shape[-1]))

  # Static loop bounds: a traced lower bound failed Triton's scf.for verifier on the H100.
  carry = lax.cond(p < n_sel_prog, lambda: run(ks_ref, vs_ref, sel_entry, p * per),
                   lambda: run(kw_ref, vw_ref, win_entry, (p - n_sel_prog) * per))
  _finish(carry, o_ref, lse_ref)


def _selected_window(q4, k_slc, v_slc, k_win, v_win, idx, lengths, layer, *, cfg: NSAConfig,
                     scale, bk, bc: NSABlockConfig, interpret):
  """Raw caches [(layers,) b, len, kvh, d] (stacked with layer).
  -> o [Pp,b,kvh,gp,dv] f32 and lse [Pp,b,kvh,gp] partials (rows >= P unwritten; the first
  n_sel_prog rows are the selected branch's, the next the window's), n_sel_prog, P."""
  b, hk, gp, d = q4.shape
  dv = v_slc.shape[-1]
  per = bc.decode_entries
  len_s, len_w = k_slc.shape[-3], k_win.shape[-3]
  (ks, vs, kw, vw), layer = _stacked.for_kernel(
      (k_slc, v_slc, k_win, v_win), layer, bk, (d, dv, d, dv))
  n_sel_prog = -(-cfg.n_select * (cfg.select_len // bk) // per)
  n_win_prog = -(-(-(-min(cfg.window, len_w) // bk)) // per)
  progs = n_sel_prog + n_win_prog
  pp = _pow2(progs, 1)
  kern = functools.partial(_sw_kernel, cfg=cfg, scale=scale, bk=bk, per=per,
                           n_sel_prog=n_sel_prog, len_s=len_s, len_w=len_w,
                           prec=_prec(q4.dtype))
  cache = lambda x: pl.BlockSpec((x.shape[0], None, x.shape[2], None, x.shape[4]),
                                 lambda p, i, j: (0, i, 0, j, 0))
  o, lse = pl.pallas_call(
      kern, grid=(progs, b, hk),
      in_specs=[pl.BlockSpec((None,), lambda p, i, j: (i,)),
                pl.BlockSpec((None,), lambda p, i, j: (0,)),
                pl.BlockSpec((None, None, idx.shape[-1]), lambda p, i, j: (i, j, 0)),
                pl.BlockSpec((None, None, gp, d), lambda p, i, j: (i, j, 0, 0)),
                cache(ks), cache(vs), cache(kw), cache(vw)],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, dv), lambda p, i, j: (p, i, j, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda p, i, j: (p, i, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((pp, b, hk, gp, dv), _F32),
                 jax.ShapeDtypeStruct((pp, b, hk, gp), _F32)],
      interpret=interpret, name="nsa_decode_slc_win",
      **_compiler(interpret, bc.decode_num_warps, bc.decode_num_stages),
  )(lengths, layer.reshape(1), idx, q4, ks, vs, kw, vw)
  return o, lse, n_sel_prog, progs


# --------------------------------------------------------------------------------- combine
def _merge_rows(o, lse, lo, hi):
  """Logsumexp merge of partial rows [lo, hi) of o [P, gp, dvc] / lse [P, gp] (each partial
  normalised over its own keys) -> [gp, dvc] f32 (0 where no partial has a key)."""
  rows = lax.broadcasted_iota(jnp.int32, lse.shape, 0)
  lse = jnp.where((rows >= lo) & (rows < hi), lse, -jnp.inf)
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  wts = jnp.exp(lse - m_safe[None, :])[:, :, None]      # 0 for empty or unused partials
  tot = jnp.sum(wts, axis=0)
  o = jnp.sum(wts * jnp.where(wts > 0, o, 0.0), axis=0)   # unused rows may hold garbage
  return o / jnp.where(tot > 0, tot, 1.0)


def _combine_kernel(oc_ref, lc_ref, osw_ref, lsw_ref, g_ref, out_ref, *, splits, n_sel_prog,
                    progs):
  gate = lambda r: g_ref[:, r].astype(_F32)[:, None]   # g_ref [gp, 3]: cmp, slc, win
  osw, lsw = osw_ref[...], lsw_ref[...]
  o = (gate(0) * _merge_rows(oc_ref[...], lc_ref[...], 0, splits)
       + gate(1) * _merge_rows(osw, lsw, 0, n_sel_prog)
       + gate(2) * _merge_rows(osw, lsw, n_sel_prog, progs))
  out_ref[...] = o.astype(out_ref.dtype)


def _combine(o_c, lse_c, o_sw, lse_sw, gates3, *, splits, n_sel_prog, progs, dtype, bc,
             interpret):
  """Branch partials and gates [b,kvh,gp,3] -> o [b,kvh,gp,dv] in dtype. The value dim is
  split over programs (decode_combine_dv columns each) to keep the partial tiles small."""
  sp, b, hk, gp, dv = o_c.shape
  pp = o_sw.shape[0]
  dc = min(dv, bc.decode_combine_dv)
  kern = functools.partial(_combine_kernel, splits=splits, n_sel_prog=n_sel_prog, progs=progs)
  return pl.pallas_call(
      kern, grid=(dv // dc, b, hk),
      in_specs=[pl.BlockSpec((sp, None, None, gp, dc), lambda c, i, j: (0, i, j, 0, c)),
                pl.BlockSpec((sp, None, None, gp), lambda c, i, j: (0, i, j, 0)),
                pl.BlockSpec((pp, None, None, gp, dc), lambda c, i, j: (0, i, j, 0, c)),
                pl.BlockSpec((pp, None, None, gp), lambda c, i, j: (0, i, j, 0)),
                pl.BlockSpec((None, None, gp, 3), lambda c, i, j: (i, j, 0, 0))],
      out_specs=pl.BlockSpec((None, None, gp, dc), lambda c, i, j: (i, j, 0, c)),
      out_shape=jax.ShapeDtypeStruct((b, hk, gp, dv), dtype),
      interpret=interpret, name="nsa_decode_combine",
      **_compiler(interpret, bc.decode_select_num_warps, 1),
  )(o_c, lse_c, o_sw, lse_sw, gates3)


# ------------------------------------------------------------------------------------ entry
def _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cfg: NSAConfig, bc):
  if not isinstance(bc, NSABlockConfig):
    raise UnsupportedError(f"config {type(bc).__name__} is not an NSABlockConfig")
  xs = (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win)
  if any(x.dtype != q.dtype for x in xs):
    raise UnsupportedError(f"mixed dtypes {[str(x.dtype) for x in (q,) + xs]}")
  if not any(q.dtype == t for t in _DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  d, dv = q.shape[-1], v_slc.shape[-1]
  if {k_cmp.shape[-1], k_slc.shape[-1], k_win.shape[-1]} != {d}:
    raise UnsupportedError("key head dims differ from the query's")
  if {v_cmp.shape[-1], v_win.shape[-1]} != {dv}:
    raise UnsupportedError("value head dims differ between caches")
  if not (_is_tile(d) and _is_tile(dv)) or max(d, dv) > 256:
    raise UnsupportedError(f"head dims {d}/{dv} must be powers of two in [16, 256] (the caches "
                           "are read in place, not padded)")
  g = q.shape[1] // k_slc.shape[-2]
  if _pow2(g) > _MAX_ROWS:
    raise UnsupportedError(f"group of {g} heads > {_MAX_ROWS} rows per tile")
  bk = bc.decode_block_k or min(cfg.select_len, 64)
  if not _is_tile(bk) or cfg.select_len % bk:
    raise UnsupportedError(f"decode_block_k {bk} must be a power of two >= 16 dividing "
                           f"select_len {cfg.select_len}")
  if not _is_tile(bc.decode_cmp_block_k):
    raise UnsupportedError(f"decode_cmp_block_k {bc.decode_cmp_block_k} must be a power of two "
                           ">= 16")
  if bc.decode_entries < 1 or bc.decode_cmp_splits < 1:
    raise UnsupportedError("decode_entries and decode_cmp_splits must be >= 1")
  for f in ("decode_select_block", "decode_combine_dv"):
    v = getattr(bc, f)
    if v < 1 or v & (v - 1):
      raise UnsupportedError(f"{f} {v} must be a power of two")
  return bk


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, cfg: NSAConfig,
               layer=None, interpret=None, config=None):
  """The "pallas_triton" implementation of ops.nsa.decode.nsa_decode: (o [b,h,dv], idx).
  Caches [b, n, kvh, d], or stacked [layers, b, n, kvh, d] with `layer` (int32 scalar).

  Inference only (no VJP: decoding is never differentiated). Needs head dims that are powers
  of two in [16, 256] and group size <= 128; anything else is an UnsupportedError.
  """
  interpret = resolve_interpret(interpret, GPU)
  bc = config or (NSABlockConfig() if interpret else default_block_config())
  bk = _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cfg, bc)
  b, h, d = q.shape
  hk = k_slc.shape[-2]
  g = h // hk
  gp = _pow2(g)
  scale = float(d ** -0.5 if cfg.scale is None else cfg.scale)
  lengths = lengths.astype(jnp.int32)
  q4 = _pad_axis(q.reshape(b, hk, g, d), 2, gp)
  gates3 = _pad_axis(gates.reshape(b, hk, g, 3), 2, gp)     # a free reshape when g == gp
  max_len = k_slc.shape[-3]
  o_c, lse_c, s_c, splits = _compressed(q4, k_cmp, v_cmp, lengths, layer, cfg=cfg,
                                        max_len=max_len, scale=scale, bc=bc, interpret=interpret)
  idx = select_blocks(lse_c, s_c, lengths, splits, g=g, cfg=cfg, n_cmp=k_cmp.shape[-3],
                max_len=max_len, bc=bc, interpret=interpret)
  o_sw, lse_sw, n_sel_prog, progs = _selected_window(
      q4, k_slc, v_slc, k_win, v_win, idx, lengths, layer, cfg=cfg, scale=scale, bk=bk, bc=bc,
      interpret=interpret)
  o = _combine(o_c, lse_c, o_sw, lse_sw, gates3, splits=splits, n_sel_prog=n_sel_prog,
               progs=progs, dtype=q.dtype, bc=bc, interpret=interpret)
  return o[:, :, :g].reshape(b, h, -1), idx[..., :cfg.n_select]
