"""Flash attention for GPUs in Pallas (Triton lowering): forward, dq and dk/dv kernels.

Layout stays [batch, len, heads, head_dim] (no transposes). GQA: the forward and dq grids run
over query heads and read kv head h // group; the dk/dv grid runs over kv heads and loops over
the group's query heads, so repeated k/v are never materialised. Lengths are padded to the
block size and head dims to a power of two inside the wrapper; padded keys are masked.
Fully masked kv blocks are skipped (causal / window cost O(T·w)); interior blocks skip the
positional mask.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as plgpu
  _CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
except (ImportError, AttributeError):  # very old / new jax without the Triton backend module
  _CompilerParams = getattr(pl, "TritonCompilerParams", None)
  if _CompilerParams is None:
    raise ImportError("Pallas Triton compiler params not available")

from ops._backend import GPU, UnsupportedError, resolve_interpret
from ops.attention import _blocks
from ops.attention._blocks import Mask
from ops.attention.config import AttentionBlockConfig, default_config

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The dk/dv kernel walks the GQA group's query heads: unrolled for ordinary groups, a loop for
# large ones (NSA's packed compressed branch has groups of stride x heads = 256; unrolling 256
# heads x 3 ranges made that backward take minutes to compile on the H100).
_UNROLL_GROUP = 8


def _dot_nt(a, b):
  """a [m, k] @ b[n, k]^T -> [m, n] f32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a [k, m]^T @ b[k, n] -> [m, n] f32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _logits(raw, scale, soft_cap):
  """raw q·k -> (logits in log2 units, tanh value or None)."""
  if soft_cap is None:
    return raw * (scale * LOG2E), None
  t = jnp.tanh(raw * (scale / soft_cap))
  return t * (soft_cap * LOG2E), t


# ----------------------------------------------------------------------------- forward


def _q_map(nq: int, reverse: bool):
  """Query block of grid index i (grid axis 0): last-first when `reverse`, so a causal grid
  launches its longest programs first instead of leaving them for the tail."""
  return (lambda i: nq - 1 - i) if reverse else (lambda i: i)


def _heavy_first(cfg, mask: Mask) -> bool:
  return cfg["heavy_first"] and mask.causal and mask.window is None


def _fwd_kernel(*refs, mask: Mask, scale, soft_cap, block_q, block_kv, nq, reverse):
  it = iter(refs)
  q_ref, k_ref, v_ref = next(it), next(it), next(it)
  qseg_ref = kvseg_ref = valid_ref = None
  if mask.has_segments:
    qseg_ref, kvseg_ref = next(it), next(it)
  if mask.has_valid:
    valid_ref = next(it)
  o_ref, lse_ref = next(it), next(it)

  q_start = _q_map(nq, reverse)(pl.program_id(0)) * block_q
  q = q_ref[...]
  q_pos = (q_start + mask.q_offset + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0))
  qseg = qseg_ref[...][:, None] if mask.has_segments else None
  dv = v_ref.shape[-1]

  def body(positional, j, carry):
    acc, m, l = carry
    ks = j * block_kv
    k = k_ref[pl.ds(ks, block_kv), :]
    v = v_ref[pl.ds(ks, block_kv), :]
    s, _ = _logits(_dot_nt(q, k), scale, soft_cap)
    ok = None
    if positional:
      k_pos = ks + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
      ok = _blocks.positional_mask(mask, q_pos, k_pos)
    if mask.has_segments:
      seg_ok = qseg == kvseg_ref[pl.ds(ks, block_kv)][None, :]
      ok = seg_ok if ok is None else ok & seg_ok
    if mask.has_valid:
      v_ok = valid_ref[pl.ds(ks, block_kv)][None, :] != 0
      ok = v_ok if ok is None else ok & v_ok
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros((block_q, dv), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  for lo, hi, positional in _blocks.kv_ranges(mask, q_start, block_q, block_kv):
    carry = lax.fori_loop(lo, hi, functools.partial(body, positional), carry)
  acc, m, l = carry
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  m_use = jnp.where(m == -jnp.inf, 0.0, m)
  lse_ref[...] = jnp.where(empty, -jnp.inf, (m_use + jnp.log2(l_safe)) * LN2)


def _mask_inputs(mask, qseg, kvseg, valid):
  args = []
  if mask.has_segments:
    args += [qseg, kvseg]
  if mask.has_valid:
    args.append(valid)
  return args


def _fwd(q, k, v, qseg, kvseg, valid, *, mask, scale, soft_cap, cfg, interpret):
  b, lq, h, d = q.shape
  lk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
  g = h // hk
  bq, bk = cfg["block_q"], cfg["block_kv"]
  nq = lq // bq
  rev = _heavy_first(cfg, mask)
  qm = _q_map(nq, rev)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qm(i), hi, 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      pl.BlockSpec((None, lk, None, dv), lambda i, bi, hi: (bi, 0, hi // g, 0)),
  ]
  if mask.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qm(i))),
                 pl.BlockSpec((None, lk), lambda i, bi, hi: (bi, 0))]
  if mask.has_valid:
    in_specs.append(pl.BlockSpec((None, lk), lambda i, bi, hi: (bi, 0)))
  kernel = functools.partial(_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap,
                             block_q=bq, block_kv=bk, nq=nq, reverse=rev)
  return pl.pallas_call(
      kernel,
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, bi, hi: (bi, qm(i), hi, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qm(i)))],
      out_shape=[jax.ShapeDtypeStruct((b, lq, h, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
      compiler_params=_CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, *_mask_inputs(mask, qseg, kvseg, valid))


# ----------------------------------------------------------------------------- backward


def _dq_kernel(*refs, mask: Mask, scale, soft_cap, block_q, block_kv, nq, reverse):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref = kvseg_ref = valid_ref = None
  if mask.has_segments:
    qseg_ref, kvseg_ref = next(it), next(it)
  if mask.has_valid:
    valid_ref = next(it)
  dq_ref = next(it)

  q_start = _q_map(nq, reverse)(pl.program_id(0)) * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse_ref[...][:, None]
  delta = delta_ref[...][:, None]
  q_pos = (q_start + mask.q_offset + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0))
  qseg = qseg_ref[...][:, None] if mask.has_segments else None

  def body(positional, j, dq):
    ks = j * block_kv
    k = k_ref[pl.ds(ks, block_kv), :]
    v = v_ref[pl.ds(ks, block_kv), :]
    s, t = _logits(_dot_nt(q, k), scale, soft_cap)
    ok = None
    if positional:
      k_pos = ks + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
      ok = _blocks.positional_mask(mask, q_pos, k_pos)
    if mask.has_segments:
      seg_ok = qseg == kvseg_ref[pl.ds(ks, block_kv)][None, :]
      ok = seg_ok if ok is None else ok & seg_ok
    if mask.has_valid:
      v_ok = valid_ref[pl.ds(ks, block_kv)][None, :] != 0
      ok = v_ok if ok is None else ok & v_ok
    p = jnp.exp2(s - lse2)
    if ok is not None:
      p = jnp.where(ok, p, 0.0)
    dp = _dot_nt(do, v)
    ds = p * (dp - delta)
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros(q.shape, jnp.float32)
  for lo, hi, positional in _blocks.kv_ranges(mask, q_start, block_q, block_kv):
    dq = lax.fori_loop(lo, hi, functools.partial(body, positional), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, mask: Mask, scale, soft_cap, block_q, block_kv, group):
  it = iter(refs)
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
  qseg_ref = kvseg_ref = valid_ref = None
  if mask.has_segments:
    qseg_ref, kvseg_ref = next(it), next(it)
  if mask.has_valid:
    valid_ref = next(it)
  dk_ref, dv_ref = next(it), next(it)

  kv_start = pl.program_id(0) * block_kv
  k = k_ref[...]
  v = v_ref[...]
  k_pos = kv_start + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
  kvseg = kvseg_ref[...][:, None] if mask.has_segments else None
  kv_ok = (valid_ref[...][:, None] != 0) if mask.has_valid else None

  def body(hh, positional, i, carry):
    dk, dv = carry
    qs = i * block_q
    q = q_ref[pl.ds(qs, block_q), hh, :]
    do = do_ref[pl.ds(qs, block_q), hh, :]
    lse2 = lse_ref[hh, pl.ds(qs, block_q)][None, :]
    delta = delta_ref[hh, pl.ds(qs, block_q)][None, :]
    st, t = _logits(_dot_nt(k, q), scale, soft_cap)  # [bk, bq]
    ok = kv_ok
    if positional:
      q_pos = qs + mask.q_offset + lax.broadcasted_iota(jnp.int32, (1, block_q), 1)
      pos_ok = _blocks.positional_mask(mask, q_pos, k_pos)
      ok = pos_ok if ok is None else ok & pos_ok
    if mask.has_segments:
      seg_ok = kvseg == qseg_ref[pl.ds(qs, block_q)][None, :]
      ok = seg_ok if ok is None else ok & seg_ok
    pt = jnp.exp2(st - lse2)
    if ok is not None:
      pt = jnp.where(ok, pt, 0.0)
    dv = dv + _dot(pt.astype(do.dtype), do)
    dpt = _dot_nt(v, do)
    dst = pt * (dpt - delta)
    if t is not None:
      dst = dst * (1.0 - t * t)
    dk = dk + _dot(dst.astype(q.dtype), q)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  ranges = _blocks.q_ranges(mask, kv_start, block_q, block_kv)

  def head(hh, carry):
    for lo, hi, positional in ranges:
      carry = lax.fori_loop(lo, hi, functools.partial(body, hh, positional), carry)
    return carry

  if group <= _UNROLL_GROUP:
    for hh in range(group):
      carry = head(hh, carry)
  else:
    carry = lax.fori_loop(0, group, head, carry)
  dk, dv = carry
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd(q, k, v, qseg, kvseg, valid, o, lse, do, dlse, *, mask, scale, soft_cap, cfg,
         interpret):
  b, lq, h, d = q.shape
  lk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
  g = h // hk
  delta = _blocks.bwd_delta(o, do, dlse)
  lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
  extra = _mask_inputs(mask, qseg, kvseg, valid)
  params = _CompilerParams(num_warps=cfg["bwd_num_warps"], num_stages=cfg["bwd_num_stages"])

  bq, bk = cfg["bwd_block_q"], cfg["bwd_block_kv"]
  nq = lq // bq
  rev = _heavy_first(cfg, mask)
  qm = _q_map(nq, rev)
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qm(i), hi, 0)),
      pl.BlockSpec((None, lk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      pl.BlockSpec((None, lk, None, dv), lambda i, bi, hi: (bi, 0, hi // g, 0)),
      pl.BlockSpec((None, bq, None, dv), lambda i, bi, hi: (bi, qm(i), hi, 0)),
      pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qm(i))),
      pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qm(i))),
  ]
  if mask.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qm(i))),
                 pl.BlockSpec((None, lk), lambda i, bi, hi: (bi, 0))]
  if mask.has_valid:
    in_specs.append(pl.BlockSpec((None, lk), lambda i, bi, hi: (bi, 0)))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, nq=nq, reverse=rev),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qm(i), hi, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dq",
  )(q, k, v, do, lse2, delta, *extra)

  # grid axis 2 enumerates (kv head, slice of its group): s slices of gs query heads each
  bq, bk = cfg["dkv_block_q"], cfg["dkv_block_kv"]
  params = _CompilerParams(num_warps=cfg["dkv_num_warps"], num_stages=cfg["dkv_num_stages"])
  s = cfg["bwd_group_split"]
  gs = g // s
  q6 = q.reshape(b, lq, hk, s, gs, d)
  do6 = do.reshape(b, lq, hk, s, gs, dv)
  lse5 = lse2.reshape(b, hk, s, gs, lq)
  delta5 = delta.reshape(b, hk, s, gs, lq)
  in_specs = [
      pl.BlockSpec((None, lq, None, None, gs, d),
                   lambda j, bi, hs: (bi, 0, hs // s, hs % s, 0, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, bi, hs: (bi, j, hs // s, 0)),
      pl.BlockSpec((None, bk, None, dv), lambda j, bi, hs: (bi, j, hs // s, 0)),
      pl.BlockSpec((None, lq, None, None, gs, dv),
                   lambda j, bi, hs: (bi, 0, hs // s, hs % s, 0, 0)),
      pl.BlockSpec((None, None, None, gs, lq), lambda j, bi, hs: (bi, hs // s, hs % s, 0, 0)),
      pl.BlockSpec((None, None, None, gs, lq), lambda j, bi, hs: (bi, hs // s, hs % s, 0, 0)),
  ]
  if mask.has_segments:
    in_specs += [pl.BlockSpec((None, lq), lambda j, bi, hs: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda j, bi, hs: (bi, j))]
  if mask.has_valid:
    in_specs.append(pl.BlockSpec((None, bk), lambda j, bi, hs: (bi, j)))
  # one group slice writes the result directly; several write f32 partials summed below
  part_dtype = lambda dt: dt if s == 1 else jnp.float32
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap, block_q=bq,
                        block_kv=bk, group=gs),
      grid=(lk // bk, b, hk * s),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, None, d),
                              lambda j, bi, hs: (bi, j, hs // s, hs % s, 0)),
                 pl.BlockSpec((None, bk, None, None, dv),
                              lambda j, bi, hs: (bi, j, hs // s, hs % s, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, lk, hk, s, d), part_dtype(k.dtype)),
                 jax.ShapeDtypeStruct((b, lk, hk, s, dv), part_dtype(v.dtype))],
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dkv",
  )(q6, k, v, do6, lse5, delta5, *extra)
  dk = dk.sum(3).astype(k.dtype) if s > 1 else dk[:, :, :, 0]
  dv_ = dv_.sum(3).astype(v.dtype) if s > 1 else dv_[:, :, :, 0]
  return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, qseg, kvseg, valid, static):
  return _fwd(q, k, v, qseg, kvseg, valid, **static._asdict())


def _flash_fwd(q, k, v, qseg, kvseg, valid, static):
  o, lse = _fwd(q, k, v, qseg, kvseg, valid, **static._asdict())
  return (o, lse), (q, k, v, qseg, kvseg, valid, o, lse)


def _flash_bwd(static, res, cts):
  q, k, v, qseg, kvseg, valid, o, lse = res
  do, dlse = cts
  dq, dk, dv = _bwd(q, k, v, qseg, kvseg, valid, o, lse, do.astype(o.dtype),
                    dlse.astype(jnp.float32), **static._asdict())
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


class _Static(tuple):
  """Hashable static arguments of the custom_vjp."""
  _fields = ("mask", "scale", "soft_cap", "cfg", "interpret")

  def __new__(cls, **kw):
    return super().__new__(cls, tuple(kw[f] for f in cls._fields))

  def _asdict(self):
    return dict(zip(self._fields, self))


class _FrozenDict(dict):
  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def group_split(group: int, programs: int, min_programs: int) -> int:
  """Slices of a GQA group for the dk/dv grid: the smallest divisor s of `group` with
  programs * s >= min_programs (the whole group when none reaches it; 1 when min_programs <= 0)."""
  for s in range(1, group + 1):
    if group % s == 0 and programs * s >= min_programs:
      return s
  return group


def plan(cfg: AttentionBlockConfig, b: int, lq: int, lk: int, h: int, hk: int):
  """Tiles of every kernel fitted to the lengths -> (static tile dict, padded q_len, padded
  kv_len): one padded length serves the forward and backward tiles."""
  def fit(block, n):
    return max(16, min(block, _blocks.pow2_at_least(n)))

  bq, bk = fit(cfg.block_q, lq), fit(cfg.block_kv, lk)
  bbq, bbk = fit(cfg.bwd_block_q, lq), fit(cfg.bwd_block_kv, lk)
  dkv_q, dkv_kv, dkv_warps, dkv_stages = cfg.dkv_tiles
  dbq, dbk = fit(dkv_q, lq), fit(dkv_kv, lk)
  lq_p = _blocks.pad_len(lq, max(bq, bbq, dbq))
  lk_p = _blocks.pad_len(lk, max(bk, bbk, dbk))
  cfg_d = _FrozenDict(block_q=bq, block_kv=bk, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages, bwd_block_q=bbq, bwd_block_kv=bbk,
                      bwd_num_warps=cfg.bwd_num_warps, bwd_num_stages=cfg.bwd_num_stages,
                      dkv_block_q=dbq, dkv_block_kv=dbk, dkv_num_warps=dkv_warps,
                      dkv_num_stages=dkv_stages, heavy_first=cfg.heavy_first,
                      bwd_group_split=group_split(h // hk, (lk_p // dbk) * b * hk,
                                                  cfg.bwd_min_programs))
  return cfg_d, lq_p, lk_p


def backward(q, k, v, o, lse, do, dlse, *, mask: Mask, scale, cfg_d, interpret):
  """dq, dk, dv of attention without segments / kv_valid / soft-cap from its saved output and
  lse (natural log, [b, h, lq]), for other forward kernels (ops/attention/pallas_mosaic_gpu.py).
  Lengths padded as `plan` says; head dims powers of two."""
  return _bwd(q, k, v, None, None, None, o, lse, do, dlse, mask=mask, scale=scale,
              soft_cap=None, cfg=cfg_d, interpret=interpret)


def attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid, scale,
              soft_cap, q_offset, return_lse, interpret, config):
  """The "pallas_triton" implementation of ops.attention.attention; returns (o, lse)."""
  del return_lse
  interpret = resolve_interpret(interpret, GPU)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise UnsupportedError(f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}")
  if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[3]
  if max(d, dv) > 256:
    raise UnsupportedError(f"head_dim {max(d, dv)} > 256")
  cfg = config or default_config(d)
  if not isinstance(cfg, AttentionBlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an AttentionBlockConfig")
  if lq == 0 or lk == 0:
    raise UnsupportedError("empty sequence")
  dp, dvp = _blocks.pow2_at_least(d), _blocks.pow2_at_least(dv)
  cfg_d, lq_p, lk_p = plan(cfg, b, lq, lk, h, k.shape[2])
  mask = Mask(causal=causal, window=window, sinks=sinks if window is not None else 0,
              q_offset=q_offset, q_len=lq, kv_len=lk,
              has_segments=q_segment_ids is not None, has_valid=kv_valid is not None)

  def pad(x, length, width):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))

  qp, kp, vp = pad(q, lq_p, dp), pad(k, lk_p, dp), pad(v, lk_p, dvp)
  qseg = kvseg = valid = None
  if mask.has_segments:
    qseg = jnp.pad(q_segment_ids, ((0, 0), (0, lq_p - lq)))
    kvseg = jnp.pad(kv_segment_ids, ((0, 0), (0, lk_p - lk)))
  if mask.has_valid:
    valid = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, lk_p - lk)))
  static = _Static(mask=mask, scale=scale, soft_cap=soft_cap, cfg=cfg_d, interpret=interpret)
  o, lse = _flash(qp, kp, vp, qseg, kvseg, valid, static)
  return o[:, :lq, :, :dv], lse[:, :, :lq]
