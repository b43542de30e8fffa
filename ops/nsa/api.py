"""Public NSA API.

`nsa` (training / prefill, differentiable) combines three branches weighted by per-head gates:
compressed (`compressed_attention`), selected (`select_blocks` + `selected_attention`) and
sliding window (ops.attention with window=cfg.window). `nsa_decode` is the one-token cache
path (ops/nsa/decode.py). Each piece dispatches through its own registry (ops/_backend.py):
implementation None = platform default order ending in "xla", a name, or a sequence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import _backend
from ops._backend import CPU, GPU, TPU
from ops.nsa import compress, reference
from ops.nsa.config import NSAConfig

_DEFAULTS = {GPU: ("pallas_triton", "xla"), TPU: ("pallas_tpu", "xla"), CPU: ("xla",)}
_CMP = _backend.Op("nsa.compressed_attention", _DEFAULTS)
_SEL = _backend.Op("nsa.selected_attention", _DEFAULTS)
_SCORES = _backend.Op("nsa.select_blocks", _DEFAULTS)


def _x_cmp(q, k, v, *, block_len, stride, q_segment_ids, scale, interpret, config):
  del interpret, config
  return reference.compressed_attention(q, k, v, block_len=block_len, stride=stride,
                                        q_segment_ids=q_segment_ids, scale=scale)


def _x_sel(q, k, v, block_idx, *, select_len, q_segment_ids, scale, interpret, config):
  del interpret, config
  return reference.selected_attention(q, k, v, block_idx, select_len=select_len,
                                      q_segment_ids=q_segment_ids, scale=scale)


def _x_scores(q, k_cmp, lse_cmp, *, cfg, q_segment_ids, interpret, config):
  del interpret, config
  return reference.select_blocks(q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=q_segment_ids)


_CMP.register("xla", _x_cmp)
_SEL.register("xla", _x_sel)
_SCORES.register("xla", _x_scores)

try:
  from ops.nsa import pallas_triton as _pt
  _CMP.register("pallas_triton", _pt.compressed_attention, platforms=(GPU,))
  _SEL.register("pallas_triton", _pt.selected_attention, platforms=(GPU,))
  _SCORES.register("pallas_triton", _pt.select_blocks, platforms=(GPU,))
except ImportError:
  pass
try:
  from ops.nsa import pallas_tpu as _ptpu
  _CMP.register("pallas_tpu", _ptpu.compressed_attention, platforms=(TPU,))
  _SEL.register("pallas_tpu", _ptpu.selected_attention, platforms=(TPU,))
  _SCORES.register("pallas_tpu", _ptpu.select_blocks, platforms=(TPU,))
except ImportError:
  pass


def implementations() -> tuple[str, ...]:
  return _SEL.names


def _check(q, k, v, what):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{what}: q, k, v must be rank 4; got {q.shape}, {k.shape}, {v.shape}")
  if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
    raise ValueError(f"{what}: incompatible q {q.shape}, k {k.shape}, v {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{what}: heads {q.shape[2]} not a multiple of kv_heads {k.shape[2]}")


def _segments(q_segment_ids, q):
  if q_segment_ids is None:
    return None
  if q_segment_ids.shape != q.shape[:2]:
    raise ValueError(f"q_segment_ids must be [batch, t] = {q.shape[:2]}; got "
                     f"{q_segment_ids.shape}")
  return q_segment_ids.astype(jnp.int32)


def compressed_attention(q, k_cmp, v_cmp, *, block_len: int, stride: int, q_segment_ids=None,
                         scale=None, implementation=None, interpret=None, config=None):
  """Compressed branch. q [b,t,h,d]; k_cmp [b,n_cmp,kvh,d]; v_cmp [b,n_cmp,kvh,dv] with
  n_cmp = max(0, (t - block_len)//stride + 1) (block j = tokens [j*stride, j*stride+l)).
  Query t sees block j iff j*stride + block_len - 1 <= t and (with segment ids) the block lies
  inside the query's segment; queries with no visible block output 0 and lse -inf.
  Returns (o [b,t,h,dv] q.dtype, lse [b,h,t] f32). Differentiable in q, k_cmp, v_cmp.
  """
  _check(q, k_cmp, v_cmp, "compressed_attention")
  want = max(0, (q.shape[1] - block_len) // stride + 1)
  if k_cmp.shape[1] != want:
    raise ValueError(f"k_cmp has {k_cmp.shape[1]} blocks; t={q.shape[1]}, l={block_len}, "
                     f"d={stride} give {want}")
  return _CMP(implementation, q, k_cmp, v_cmp, block_len=block_len, stride=stride,
              q_segment_ids=_segments(q_segment_ids, q), scale=scale, interpret=interpret,
              config=config)


def select_blocks(q, k_cmp, lse_cmp, *, cfg: NSAConfig, q_segment_ids=None,
                  implementation=None, interpret=None, config=None):
  """Top-n selection blocks per (query, kv head): block_idx [b, t, kvh, n_select] int32.

  Scores: p_cmp = exp(q·k_cmp*scale - lse_cmp) over visible compressed blocks, mapped onto
  selection blocks by overlap (ops.nsa.compress.overlap_matrix / slc_from_cmp), summed over
  each GQA group's heads. Candidates are causally available blocks (s*l' <= t) of the query's
  segment; the first n_always_first blocks of the segment and the n_local blocks ending with
  the query's own are always included; ties go to the lower index. Sorted ascending, -1
  padding when fewer blocks exist. Not differentiable.
  """
  return jax.lax.stop_gradient(_SCORES(
      implementation, q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=_segments(q_segment_ids, q),
      interpret=interpret, config=config))


def selected_attention(q, k_slc, v_slc, block_idx, *, select_len: int, q_segment_ids=None,
                       scale=None, implementation=None, interpret=None, config=None):
  """Attention of each query to the keys of its selected blocks (causal inside its own block).

  q [b,t,h,d]; k_slc [b,t,kvh,d]; v_slc [b,t,kvh,dv]; block_idx [b,t,kvh,n] int32 (-1 = none;
  all heads of a GQA group share blocks). Key j visible to query t iff j//select_len is
  selected, j <= t and same segment. Returns (o [b,t,h,dv], lse [b,h,t] f32).
  """
  _check(q, k_slc, v_slc, "selected_attention")
  if block_idx.shape[:3] != (q.shape[0], q.shape[1], k_slc.shape[2]):
    raise ValueError(f"block_idx must be [b, t, kvh, n]; got {block_idx.shape}")
  return _SEL(implementation, q, k_slc, v_slc, jax.lax.stop_gradient(block_idx).astype(jnp.int32),
              select_len=select_len, q_segment_ids=_segments(q_segment_ids, q), scale=scale,
              interpret=interpret, config=config)


def _window(q, k_win, v_win, cfg, q_segment_ids, implementation, interpret):
  from ops.attention import attention
  if implementation == "xla" or (isinstance(implementation, (tuple, list))
                                 and tuple(implementation) == ("xla",)):
    att_impl = "xla"
  else:
    att_impl = None
  return attention(q, k_win, v_win, causal=True, window=cfg.window, q_segment_ids=q_segment_ids,
                   kv_segment_ids=q_segment_ids, scale=cfg.scale, q_offset=0,
                   implementation=att_impl, interpret=interpret)


def nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, cfg: NSAConfig,
        q_segment_ids=None, block_idx=None, return_block_idx: bool = False,
        implementation=None, interpret=None, config=None):
  """Native Sparse Attention (training / prefill).

  q [b,t,h,d]; k_cmp/v_cmp [b,n_cmp,kvh,d/dv] (compressed keys from the layer's φ over
  compress.unfold_blocks); k_slc/v_slc and k_win/v_win [b,t,kvh,d/dv]; gates [b,t,h,3]
  (sigmoid-ed) weighting the compressed / selected / window outputs. q_segment_ids [b,t]:
  packed sequences; no branch crosses a segment. block_idx: optional precomputed selection
  (else computed from the compressed branch). Returns o [b,t,h,dv] (and block_idx).
  """
  q_segment_ids = _segments(q_segment_ids, q)
  if gates.shape != q.shape[:3] + (3,):
    raise ValueError(f"gates must be [b,t,h,3] = {q.shape[:3] + (3,)}; got {gates.shape}")
  o_cmp, lse_cmp = compressed_attention(
      q, k_cmp, v_cmp, block_len=cfg.block_len, stride=cfg.stride, q_segment_ids=q_segment_ids,
      scale=cfg.scale, implementation=implementation, interpret=interpret, config=config)
  if block_idx is None:
    block_idx = select_blocks(q, k_cmp, lse_cmp, cfg=cfg, q_segment_ids=q_segment_ids,
                              implementation=implementation, interpret=interpret,
                              config=config)
  o_slc, _ = selected_attention(q, k_slc, v_slc, block_idx, select_len=cfg.select_len,
                                q_segment_ids=q_segment_ids, scale=cfg.scale,
                                implementation=implementation, interpret=interpret,
                                config=config)
  o_win = _window(q, k_win, v_win, cfg, q_segment_ids, implementation, interpret)
  o = reference.combine(gates, o_cmp, o_slc, o_win, q.dtype)
  return (o, block_idx) if return_block_idx else o


from ops.nsa import decode as _decode  # noqa: E402  (the "nsa.decode" registry and "xla")

try:
  from ops.nsa import decode_triton as _dt
  _decode.DECODE.register("pallas_triton", _dt.nsa_decode, platforms=(GPU,))
except ImportError:
  pass


def nsa_decode(*args, **kwargs):
  """One new token per batch row against NSA caches; see ops.nsa.decode.nsa_decode (keyword
  arguments, implementation= / interpret= / config= included, are forwarded)."""
  return _decode.nsa_decode(*args, **kwargs)
