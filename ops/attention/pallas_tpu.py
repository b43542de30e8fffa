"""Flash attention for TPUs in Pallas (Mosaic lowering): forward, dq and dk/dv kernels.

Arrays are moved to [batch, heads, len, head_dim] so tiles are (block, head_dim) with the
sequence on sublanes. The kv (forward, dq) or q (dk/dv) axis is the innermost, sequential grid
axis accumulating into VMEM scratch; blocks with no visible key are skipped (pl.when) and
interior blocks skip the positional mask. GQA: q heads index kv head h // group; the dk/dv grid
runs over (kv head, kv block, group head, q block) so k/v are never repeated. Lengths are padded
to the blocks (multiples of 128) inside the wrapper; padded keys are masked.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops._backend import TPU, UnsupportedError, resolve_interpret
from ops.attention import _blocks
from ops.attention._blocks import Mask
from ops.attention.config import AttentionBlockConfig, default_config

_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")


def _dims(*sem):
  return _CompilerParams(dimension_semantics=sem)


def _nt(a, b):
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _tn(a, b):
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _logits(raw, scale, soft_cap):
  if soft_cap is None:
    return raw * scale, None
  t = jnp.tanh(raw * (scale / soft_cap))
  return t * soft_cap, t


def _visibility(mask, q_start, kv_start, bq, bk, qseg, kvseg, valid, *, positional,
                transpose=False):
  """Mask of a (bq, bk) tile ((bk, bq) with transpose) or None when all visible."""
  ok = None
  if positional:
    qi = lax.broadcasted_iota(jnp.int32, (bk, bq) if transpose else (bq, bk), 1 if transpose else 0)
    ki = lax.broadcasted_iota(jnp.int32, (bk, bq) if transpose else (bq, bk), 0 if transpose else 1)
    ok = _blocks.positional_mask(mask, q_start + mask.q_offset + qi, kv_start + ki)
  if qseg is not None:
    s_ok = (kvseg == qseg) if transpose else (qseg == kvseg)
    ok = s_ok if ok is None else ok & s_ok
  if valid is not None:
    ok = valid if ok is None else ok & valid
  return ok


def _split(refs, mask, n_in):
  it = iter(refs)
  ins = [next(it) for _ in range(n_in)]
  qseg = kvseg = valid = None
  if mask.has_segments:
    qseg, kvseg = next(it), next(it)
  if mask.has_valid:
    valid = next(it)
  return ins, qseg, kvseg, valid, list(it)


def _fwd_kernel(*refs, mask: Mask, scale, soft_cap, bq, bk):
  (q_ref, k_ref, v_ref), qseg_ref, kvseg_ref, valid_ref, rest = _split(refs, mask, 3)
  o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = i * bq, j * bk

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  def step(positional):
    q = q_ref[...]
    k = k_ref[...]
    v = v_ref[...]
    s, _ = _logits(_nt(q, k), scale, soft_cap)
    ok = _visibility(mask, q_start, kv_start, bq, bk,
                     qseg_ref[...] if qseg_ref is not None else None,
                     kvseg_ref[...] if kvseg_ref is not None else None,
                     (valid_ref[...] != 0) if valid_ref is not None else None,
                     positional=positional)
    if ok is not None:
      s = jnp.where(ok, s, -jnp.inf)
    m = m_sc[...]
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_use)
    p = jnp.exp(s - m_use)
    l_sc[...] = l_sc[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    acc_sc[...] = acc_sc[...] * alpha + _nn(p.astype(v.dtype), v)
    m_sc[...] = m_new

  vis = _blocks.block_visible(mask, q_start, kv_start, bq, bk)
  full = _blocks.block_full(mask, q_start, kv_start, bq, bk)
  pl.when(vis & full)(lambda: step(False))
  pl.when(vis & jnp.logical_not(full))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    l = l_sc[...]
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
    m = m_sc[...]
    m_use = jnp.where(m == -jnp.inf, 0.0, m)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_use + jnp.log(l_safe))


def _seg_specs(mask, q_map, kv_map, bq, bk):
  specs = []
  if mask.has_segments:
    specs += [pl.BlockSpec((None, bq, 1), q_map), pl.BlockSpec((None, 1, bk), kv_map)]
  if mask.has_valid:
    specs.append(pl.BlockSpec((None, 1, bk), kv_map))
  return specs


def _extra(mask, qseg, kvseg, valid):
  out = []
  if mask.has_segments:
    out += [qseg, kvseg]
  if mask.has_valid:
    out.append(valid)
  return out


def _fwd(q, k, v, qseg, kvseg, valid, *, mask, scale, soft_cap, cfg, interpret):
  b, h, lq, d = q.shape
  hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
  g = h // hk
  bq, bk = cfg["block_q"], cfg["block_kv"]
  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j: (bi, hi // g, j, 0)),
      pl.BlockSpec((None, None, bk, dv), lambda bi, hi, i, j: (bi, hi // g, j, 0)),
  ] + _seg_specs(mask, lambda bi, hi, i, j: (bi, i, 0), lambda bi, hi, i, j: (bi, 0, j), bq, bk)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, mask=mask, scale=scale, soft_cap=soft_cap, bq=bq, bk=bk),
      grid=(b, h, lq // bq, lk // bk),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, dv), lambda bi, hi, i, j: (bi, hi, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, h, lq, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, dv), jnp.float32)],
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="flash_attention_fwd_tpu",
  )(q, k, v, *_extra(mask, qseg, kvseg, valid))


def _dq_kernel(*refs, mask: Mask, scale, soft_cap, bq, bk):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kvseg_ref, valid_ref, rest = (
      _split(refs, mask, 6))
  dq_ref, dq_sc = rest
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, kv_start = i * bq, j * bk

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  def step(positional):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s, t = _logits(_nt(q, k), scale, soft_cap)
    ok = _visibility(mask, q_start, kv_start, bq, bk,
                     qseg_ref[...] if qseg_ref is not None else None,
                     kvseg_ref[...] if kvseg_ref is not None else None,
                     (valid_ref[...] != 0) if valid_ref is not None else None,
                     positional=positional)
    p = jnp.exp(s - lse_ref[...])
    if ok is not None:
      p = jnp.where(ok, p, 0.0)
    ds = p * (_nt(do, v) - delta_ref[...])
    if t is not None:
      ds = ds * (1.0 - t * t)
    dq_sc[...] += _nn(ds.astype(k.dtype), k)

  vis = _blocks.block_visible(mask, q_start, kv_start, bq, bk)
  full = _blocks.block_full(mask, q_start, kv_start, bq, bk)
  pl.when(vis & full)(lambda: step(False))
  pl.when(vis & jnp.logical_not(full))(lambda: step(True))

  @pl.when(j == pl.num_programs(3) - 1)
  def _done():
    dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, mask: Mask, scale, soft_cap, bq, bk):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kvseg_ref, valid_ref, rest = (
      _split(refs, mask, 6))
  dk_ref, dv_ref, dk_sc, dv_sc = rest
  j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_start, kv_start = i * bq, j * bk

  @pl.when((gi == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  def step(positional):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    st, t = _logits(_nt(k, q), scale, soft_cap)  # [bk, bq]
    ok = _visibility(mask, q_start, kv_start, bq, bk,
                     qseg_ref[...] if qseg_ref is not None else None,
                     kvseg_ref[...] if kvseg_ref is not None else None,
                     (valid_ref[...] != 0) if valid_ref is not None else None,
                     positional=positional, transpose=True)
    pt = jnp.exp(st - lse_ref[...])
    if ok is not None:
      pt = jnp.where(ok, pt, 0.0)
    dv_sc[...] += _nn(pt.astype(do.dtype), do)
    dst = pt * (_nt(v, do) - delta_ref[...])
    if t is not None:
      dst = dst * (1.0 - t * t)
    dk_sc[...] += _nn(dst.astype(q.dtype), q)

  vis = _blocks.block_visible(mask, q_start, kv_start, bq, bk)
  full = _blocks.block_full(mask, q_start, kv_start, bq, bk)
  pl.when(vis & full)(lambda: step(False))
  pl.when(vis & jnp.logical_not(full))(lambda: step(True))

  @pl.when((gi == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _done():
    dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _bwd(q, k, v, qseg, kvseg, valid, o, lse, do, dlse, *, mask, scale, soft_cap, cfg,
         interpret):
  b, h, lq, d = q.shape
  hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
  g = h // hk
  bq, bk = cfg["block_q"], cfg["block_kv"]
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  delta = delta - dlse
  lse_b = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # fully masked rows: p = 0
  extra = _extra(mask, qseg, kvseg, valid)

  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j: (bi, hi // g, j, 0)),
      pl.BlockSpec((None, None, bk, dv), lambda bi, hi, i, j: (bi, hi // g, j, 0)),
      pl.BlockSpec((None, None, bq, dv), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0)),
      pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0)),
  ] + _seg_specs(mask, lambda bi, hi, i, j: (bi, i, 0), lambda bi, hi, i, j: (bi, 0, j), bq, bk)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, mask=mask, scale=scale, soft_cap=soft_cap, bq=bq, bk=bk),
      grid=(b, h, lq // bq, lk // bk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j: (bi, hi, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret,
      name="flash_attention_dq_tpu",
  )(q, k, v, do, lse_b, delta, *extra)

  # lse / delta as rows [b, h, 1, lq] so a (1, bq) tile broadcasts over the kv sublanes.
  lse_t = lse_b.transpose(0, 1, 3, 2)
  delta_t = delta.transpose(0, 1, 3, 2)
  qh = lambda bi, hj, j, gi, i: (bi, hj * g + gi, i, 0)
  kh = lambda bi, hj, j, gi, i: (bi, hj, j, 0)
  rowh = lambda bi, hj, j, gi, i: (bi, hj * g + gi, 0, i)
  in_specs = [
      pl.BlockSpec((None, None, bq, d), qh),
      pl.BlockSpec((None, None, bk, d), kh),
      pl.BlockSpec((None, None, bk, dv), kh),
      pl.BlockSpec((None, None, bq, dv), qh),
      pl.BlockSpec((None, None, 1, bq), rowh),
      pl.BlockSpec((None, None, 1, bq), rowh),
  ]
  if mask.has_segments:
    # Transposed orientation: q segments as a row, kv segments as a column.
    in_specs += [pl.BlockSpec((None, 1, bq), lambda bi, hj, j, gi, i: (bi, 0, i)),
                 pl.BlockSpec((None, bk, 1), lambda bi, hj, j, gi, i: (bi, j, 0))]
  if mask.has_valid:
    in_specs.append(pl.BlockSpec((None, bk, 1), lambda bi, hj, j, gi, i: (bi, j, 0)))
  extra_t = []
  if mask.has_segments:
    extra_t += [qseg.transpose(0, 2, 1), kvseg.transpose(0, 2, 1)]
  if mask.has_valid:
    extra_t.append(valid.transpose(0, 2, 1))
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, mask=mask, scale=scale, soft_cap=soft_cap, bq=bq, bk=bk),
      grid=(b, hk, lk // bk, g, lq // bq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bk, d), kh), pl.BlockSpec((None, None, bk, dv), kh)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
      compiler_params=_dims("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
      interpret=interpret,
      name="flash_attention_dkv_tpu",
  )(q, k, v, do, lse_t, delta_t, *extra_t)
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
  _fields = ("mask", "scale", "soft_cap", "cfg", "interpret")

  def __new__(cls, **kw):
    return super().__new__(cls, tuple(kw[f] for f in cls._fields))

  def _asdict(self):
    return dict(zip(self._fields, self))


class _FrozenDict(dict):
  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def attention(q, k, v, *, causal, window, sinks, q_segment_ids, kv_segment_ids, kv_valid, scale,
              soft_cap, q_offset, return_lse, interpret, config):
  """The "pallas_tpu" implementation of ops.attention.attention; returns (o, lse)."""
  del return_lse
  interpret = resolve_interpret(interpret, TPU)
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise UnsupportedError(f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}")
  if not any(q.dtype == t for t in _SUPPORTED_DTYPES):
    raise UnsupportedError(f"dtype {q.dtype}")
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[3]
  cfg = config or default_config(d)
  if not isinstance(cfg, AttentionBlockConfig):
    raise UnsupportedError(f"config {type(cfg).__name__} is not an AttentionBlockConfig")
  # One tile pair for forward and backward; Mosaic wants sequence tiles that are multiples of
  # 128 (lanes, for the transposed lse / segment rows) and head dims that are multiples of 128.
  bq = max(128, cfg.block_q - cfg.block_q % 128)
  bk = max(128, cfg.block_kv - cfg.block_kv % 128)
  bq = min(bq, _blocks.pad_len(lq, 128))
  bk = min(bk, _blocks.pad_len(lk, 128))
  lq_p, lk_p = _blocks.pad_len(lq, bq), _blocks.pad_len(lk, bk)
  dp, dvp = _blocks.pad_len(d, 128), _blocks.pad_len(dv, 128)
  mask = Mask(causal=causal, window=window, sinks=sinks if window is not None else 0,
              q_offset=q_offset, q_len=lq, kv_len=lk,
              has_segments=q_segment_ids is not None, has_valid=kv_valid is not None)

  def prep(x, length, width):
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))
    return x.transpose(0, 2, 1, 3)

  qp, kp, vp = prep(q, lq_p, dp), prep(k, lk_p, dp), prep(v, lk_p, dvp)
  qseg = kvseg = valid = None
  if mask.has_segments:
    qseg = jnp.pad(q_segment_ids, ((0, 0), (0, lq_p - lq)))[:, :, None]
    kvseg = jnp.pad(kv_segment_ids, ((0, 0), (0, lk_p - lk)))[:, None, :]
  if mask.has_valid:
    valid = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, lk_p - lk)))[:, None, :]
  static = _Static(mask=mask, scale=scale, soft_cap=soft_cap,
                   cfg=_FrozenDict(block_q=bq, block_kv=bk), interpret=interpret)
  o, lse = _flash(qp, kp, vp, qseg, kvseg, valid, static)
  return o[:, :, :lq, :dv].transpose(0, 2, 1, 3), lse[:, :, :lq, 0]
