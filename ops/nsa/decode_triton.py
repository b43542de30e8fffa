"""NSA one-token decode on GPU (Pallas, Triton lowering): the "pallas_triton" implementation of
ops.nsa.decode.nsa_decode.

Two kernels, each program owning ALL query heads of one GQA group (padded to >= 16 rows for
the tensor cores) so every key is read once per kv head:

1. Compressed branch, flash-decoding style: grid (decode_cmp_splits, b, kvh); a program takes
   one chunk of the compressed cache (up to the row's valid entries), writes its partial
   (o, lse) and its scaled logits s [g, chunk] (the selection needs p = exp(s - lse) with the
   FINAL lse, so the logits are kept instead of reading k_cmp a second time). XLA merges the
   partials by logsumexp and selects with ops.nsa.decode.select_from_cmp, the code the "xla"
   implementation uses (same scores -> same blocks).
2. Selected blocks + window: the selected blocks (select_len tokens each) and the window are cut
   into entries of decode_block_k tokens, given as (load offset, first, last position) int32
   triples; grid (programs, b, kvh) with decode_entries entries per program, the first programs
   reading k_slc / v_slc, the rest k_win / v_win. Partials are merged per branch by
   logsumexp and the three branches gated as the "xla" path does.

The raw caches are never copied or padded (a copy would cost more than the decode): an entry
near the end of a cache loads the last decode_block_k rows (offset clamped) and masks by
absolute position, so any cache length >= decode_block_k works without padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.nsa import decode as _dec
from ops.nsa.config import NSABlockConfig, NSAConfig, default_block_config
from ops.nsa.kernel_common import dot_nt as _dot_nt
from ops.nsa.kernel_common import iota as _iota
from ops.nsa.kernel_common import online_softmax_step as _online
from ops.nsa.kernel_common import pad_axis as _pad_axis
from ops.nsa.kernel_common import pow2 as _pow2
from ops.nsa.kernel_common import prec as _prec
from ops.nsa.kernel_common import triton_compiler as _compiler

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
def _cmp_kernel(nv_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, s_ref, *, scale, bk, steps, prec):
  split = pl.program_id(0)
  nv = nv_ref[()]
  n_max = k_ref.shape[0]
  q = q_ref[...]
  j_lo = split * (steps * bk)
  n_it = jnp.minimum(lax.div(jnp.maximum(nv - j_lo, 0) + (bk - 1), jnp.int32(bk)), steps)

  def body(i, carry):
    j0 = j_lo + i * bk
    jc = jnp.minimum(j0, n_max - bk)     # the last block of the cache may overlap the previous
    k = k_ref[pl.ds(jc, bk), :]
    v = v_ref[pl.ds(jc, bk), :]
    jpos = jc + _iota(bk)
    s = _dot_nt(q, k, prec) * scale
    s = jnp.where((jpos < nv)[None, :], s, -jnp.inf)
    s_ref[:, pl.ds(jc, bk)] = s
    s = jnp.where((jpos >= j0)[None, :], s, -jnp.inf)
    return _online(s, v, carry, prec)

  carry = lax.fori_loop(0, n_it, body, _init(q.shape[0], v_ref.shape[-1]))
  _finish(carry, o_ref, lse_ref)


def _compressed(q4, k_cmp, v_cmp, nv, *, scale, bc: NSABlockConfig, interpret):
  """-> o [S,b,kvh,gp,dv] f32, lse [S,b,kvh,gp], s [b,kvh,gp,n] f32 (valid where j < nv)."""
  b, hk, gp, d = q4.shape
  dv = v_cmp.shape[-1]
  bk = bc.decode_cmp_block_k
  kc = _pad_axis(k_cmp, 1, bk)          # only a cache shorter than one block is copied
  vc = _pad_axis(v_cmp, 1, bk)
  n = kc.shape[1]
  n_blocks = -(-n // bk)
  steps = -(-n_blocks // max(1, bc.decode_cmp_splits))
  splits = -(-n_blocks // steps)
  kern = functools.partial(_cmp_kernel, scale=scale, bk=bk, steps=steps, prec=_prec(q4.dtype))
  return pl.pallas_call(
      kern, grid=(splits, b, hk),
      in_specs=[
          pl.BlockSpec((None,), lambda s, i, j: (i,)),
          pl.BlockSpec((None, None, gp, d), lambda s, i, j: (i, j, 0, 0)),
          pl.BlockSpec((None, n, None, d), lambda s, i, j: (i, 0, j, 0)),
          pl.BlockSpec((None, n, None, dv), lambda s, i, j: (i, 0, j, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, dv), lambda s, i, j: (s, i, j, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda s, i, j: (s, i, j, 0)),
          pl.BlockSpec((None, None, gp, n), lambda s, i, j: (i, j, 0, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((splits, b, hk, gp, dv), _F32),
                 jax.ShapeDtypeStruct((splits, b, hk, gp), _F32),
                 jax.ShapeDtypeStruct((b, hk, gp, n), _F32)],
      interpret=interpret, name="nsa_decode_cmp",
      **_compiler(interpret, bc.decode_num_warps, bc.decode_num_stages),
  )(nv, q4, kc, vc)


# ------------------------------------------------------------------- selected + window branch
def _sw_kernel(off_ref, lo_ref, hi_ref, q_ref, ks_ref, vs_ref, kw_ref, vw_ref, o_ref, lse_ref, *,
               scale, bk, per, n_sel_prog, prec):
  q = q_ref[...]

  def run(k_ref, v_ref):
    def body(e, carry):
      off = off_ref[e]
      k = k_ref[pl.ds(off, bk), :]
      v = v_ref[pl.ds(off, bk), :]
      kpos = off + _iota(bk)
      ok = (kpos >= lo_ref[e]) & (kpos <= hi_ref[e])
      s = jnp.where(ok[None, :], _dot_nt(q, k, prec) * scale, -jnp.inf)
      return _online(s, v, carry, prec)
    return lax.fori_loop(0, per, body, _init(q.shape[0], v_ref.shape[-1]))

  # A program holds `per` entries of one branch: the first n_sel_prog programs read the
  # selected blocks, the rest the window (static loop bounds: a traced lower bound failed
  # Triton's scf.for verifier on the H100).
  carry = lax.cond(pl.program_id(0) < n_sel_prog, lambda: run(ks_ref, vs_ref),
                   lambda: run(kw_ref, vw_ref))
  _finish(carry, o_ref, lse_ref)


def _entries(lo, hi, off, per):
  """Pads [b,kvh,E] entry arrays to a multiple of `per` with empty entries."""
  e = lo.shape[-1]
  ep = -(-e // per) * per
  return (_pad_axis(off, 2, ep, 0), _pad_axis(lo, 2, ep, 1), _pad_axis(hi, 2, ep, 0))


def _selected_window(q4, k_slc, v_slc, k_win, v_win, idx, pos, *, cfg: NSAConfig, scale, bk,
                     bc: NSABlockConfig, interpret):
  """-> o_slc, o_win [b,kvh,gp,dv] f32 (each normalised over its own keys)."""
  b, hk, gp, d = q4.shape
  dv = v_slc.shape[-1]
  per = bc.decode_entries
  ls = cfg.select_len
  len_s, len_w = k_slc.shape[1], k_win.shape[1]
  ks, vs = _pad_axis(k_slc, 1, bk), _pad_axis(v_slc, 1, bk)
  kw, vw = _pad_axis(k_win, 1, bk), _pad_axis(v_win, 1, bk)
  pos3 = pos[:, None, None]

  # selected: block i, sub-block c -> tokens [idx*ls + c*bk, +bk) up to the query
  start = (jnp.maximum(idx, 0)[..., None] * ls + jnp.arange(0, ls, bk, dtype=jnp.int32))
  start = start.reshape(b, hk, -1)
  real = jnp.repeat(idx >= 0, ls // bk, axis=-1)
  s_lo = jnp.where(real, start, 1)
  s_hi = jnp.where(real, jnp.minimum(jnp.minimum(pos3, start + bk - 1), len_s - 1), 0)
  s_off = jnp.clip(start, 0, ks.shape[1] - bk)
  s_off, s_lo, s_hi = _entries(s_lo, s_hi, s_off, per)
  n_sel_prog = s_lo.shape[-1] // per

  # window: positions [max(0, pos-w+1), pos]
  w = min(cfg.window, len_w)
  wstart = jnp.maximum(0, pos - w + 1)[:, None] + jnp.arange(0, w, bk, dtype=jnp.int32)[None]
  w_lo = jnp.broadcast_to(wstart[:, None], (b, hk, wstart.shape[-1]))
  w_hi = jnp.minimum(jnp.minimum(pos3, w_lo + bk - 1), len_w - 1)
  w_off = jnp.clip(w_lo, 0, kw.shape[1] - bk)
  w_off, w_lo, w_hi = _entries(w_lo, w_hi, w_off, per)

  off = jnp.concatenate([s_off, w_off], -1).astype(jnp.int32)
  lo = jnp.concatenate([s_lo, w_lo], -1).astype(jnp.int32)
  hi = jnp.concatenate([s_hi, w_hi], -1).astype(jnp.int32)
  progs = off.shape[-1] // per
  kern = functools.partial(_sw_kernel, scale=scale, bk=bk, per=per, n_sel_prog=n_sel_prog,
                           prec=_prec(q4.dtype))
  ent = pl.BlockSpec((None, None, per), lambda p, i, j: (i, j, p))
  cache = lambda x: pl.BlockSpec((None, x.shape[1], None, x.shape[3]),
                                 lambda p, i, j: (i, 0, j, 0))
  o, lse = pl.pallas_call(
      kern, grid=(progs, b, hk),
      in_specs=[ent, ent, ent,
                pl.BlockSpec((None, None, gp, d), lambda p, i, j: (i, j, 0, 0)),
                cache(ks), cache(vs), cache(kw), cache(vw)],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, dv), lambda p, i, j: (p, i, j, 0, 0)),
          pl.BlockSpec((None, None, None, gp), lambda p, i, j: (p, i, j, 0)),
      ],
      out_shape=[jax.ShapeDtypeStruct((progs, b, hk, gp, dv), _F32),
                 jax.ShapeDtypeStruct((progs, b, hk, gp), _F32)],
      interpret=interpret, name="nsa_decode_slc_win",
      **_compiler(interpret, bc.decode_num_warps, bc.decode_num_stages),
  )(off, lo, hi, q4, ks, vs, kw, vw)
  o_slc, _ = _merge(o[:n_sel_prog], lse[:n_sel_prog])
  o_win, _ = _merge(o[n_sel_prog:], lse[n_sel_prog:])
  return o_slc, o_win


def _merge(o, lse):
  """Logsumexp merge of partials along axis 0: o [P,...,dv] (normalised), lse [P,...]."""
  m = jnp.max(lse, axis=0)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse - m_safe[None])          # 0 for empty partials
  tot = jnp.sum(w, axis=0)
  tot_safe = jnp.where(tot > 0, tot, 1.0)
  out = jnp.sum(w[..., None] * o, axis=0) / tot_safe[..., None]
  return out, jnp.where(tot > 0, m_safe + jnp.log(tot_safe), -jnp.inf)


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
  g = q.shape[1] // k_slc.shape[2]
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
  return bk


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, cfg: NSAConfig,
               interpret=None, config=None):
  """The "pallas_triton" implementation of ops.nsa.decode.nsa_decode: (o [b,h,dv], idx).

  Inference only (no VJP: decoding is never differentiated). Needs head dims that are powers
  of two in [16, 256] and group size <= 128; anything else is an UnsupportedError.
  """
  interpret = resolve_interpret(interpret, GPU)
  bc = config or (NSABlockConfig() if interpret else default_block_config())
  bk = _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, cfg, bc)
  b, h, d = q.shape
  hk = k_slc.shape[2]
  g = h // hk
  gp = _pow2(g)
  scale = float(d ** -0.5 if cfg.scale is None else cfg.scale)
  lengths = lengths.astype(jnp.int32)
  pos = lengths - 1
  q4 = _pad_axis(q.reshape(b, hk, g, d), 2, gp)

  n_cmp = k_cmp.shape[1]
  nv = _dec.n_valid_cmp(lengths, cfg, n_cmp)
  o_c, lse_c, s_c = _compressed(q4, k_cmp, v_cmp, nv, scale=scale, bc=bc, interpret=interpret)
  o_cmp, lse_cmp = _merge(o_c, lse_c)
  cmask = jnp.broadcast_to((jnp.arange(n_cmp) < nv[:, None])[:, None], (b, hk, n_cmp))
  idx = _dec.select_from_cmp(s_c[:, :, :g, :n_cmp], lse_cmp[:, :, :g], cmask, pos, cfg,
                             k_slc.shape[1])
  idx = lax.stop_gradient(idx)

  o_slc, o_win = _selected_window(q4, k_slc, v_slc, k_win, v_win, idx, pos, cfg=cfg,
                                  scale=scale, bk=bk, bc=bc, interpret=interpret)
  o = _dec.gate_combine(gates, o_cmp[:, :, :g], o_slc[:, :, :g], o_win[:, :, :g], q.dtype)
  return o, idx
