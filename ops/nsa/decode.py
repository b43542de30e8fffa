"""NSA decoding: one new token per batch row against the caches.

Reads only the compressed cache, the selected blocks and the window slice, never the whole raw
cache. Implementations (ops._backend registry "nsa.decode"): "xla" (below: gathers + f32
einsums, selecting with the training path's code, select.select_from_scores, and the same
overlap mapping, so it equals `nsa` token by token) and "pallas_triton"
(ops/nsa/decode_triton.py, registered in ops/nsa/api.py: the same candidates, overlap weights
and tie rule in Triton kernels). Tests pin both to the training path token by token and the
kernels' block indices to the "xla" path's exactly.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ops import _backend, _stacked
from ops._backend import CPU, GPU, TPU
from ops.nsa import compress
from ops.nsa.config import NSAConfig
from ops.nsa.select import select_from_scores

_F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST

DECODE = _backend.Op("nsa.decode", {GPU: ("pallas_triton", "xla"), TPU: ("xla",),
                                    CPU: ("xla",)})


def _attend(q, k, v, mask, scale):
  """q [b,kvh,g,d], k [b,kvh,n,d], v [b,kvh,n,dv], mask [b,kvh,n] -> o [b,kvh,g,dv], s, lse."""
  s = jnp.einsum("bhgd,bhnd->bhgn", q.astype(_F32), k.astype(_F32), precision=_HI) * scale
  s = jnp.where(mask[:, :, None], s, -jnp.inf)
  m = jnp.max(s, -1, keepdims=True, initial=-jnp.inf)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = p.sum(-1, keepdims=True)
  has = l > 0
  l_safe = jnp.where(has, l, 1.0)
  o = jnp.einsum("bhgn,bhnd->bhgd", p / l_safe, v.astype(_F32), precision=_HI)
  lse = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)
  return o, s, lse


def n_valid_cmp(lengths, cfg: NSAConfig, max_cmp: int):
  """Compressed entries complete for a row of `lengths` tokens: [b] int32 (<= max_cmp)."""
  return jnp.clip((lengths - cfg.block_len) // cfg.stride + 1, 0, max_cmp)


def select_from_cmp(s_cmp, lse_cmp, cmask, pos, cfg: NSAConfig, max_len: int):
  """Selection from the compressed branch's logits: s_cmp [b,kvh,g,n] (scaled), lse_cmp
  [b,kvh,g], cmask [b,kvh,n] (valid compressed entries), pos [b] -> block_idx [b,kvh,n_select].
  p = exp(s - lse) summed over the group's heads, mapped onto selection blocks by overlap."""
  lse = lse_cmp[..., None]
  p = jnp.where(cmask[:, :, None] & jnp.isfinite(lse), jnp.exp(s_cmp - lse), 0.0)
  p = p.sum(2)                                                           # [b, kvh, n_cmp_max]
  p_slc = compress.slc_from_cmp(p, cfg.block_len, cfg.stride, cfg.select_len, cfg.n_slc(max_len))
  return select_from_scores(p_slc[:, :, None, :], pos[:, None], cfg)[:, 0]


def gate_combine(gates, o_cmp, o_slc, o_win, dtype):
  """gates [b,h,3]; branch outputs [b,kvh,g,dv] f32 -> o [b,h,dv] in dtype."""
  b, hk, g, dv = o_cmp.shape
  gt = gates.astype(_F32).reshape(b, hk, g, 3)
  o = gt[..., 0:1] * o_cmp + gt[..., 1:2] * o_slc + gt[..., 2:3] * o_win
  return o.reshape(b, hk * g, dv).astype(dtype)


def _xla_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, cfg: NSAConfig,
                layer=None, interpret=None, config=None):
  """The "xla" implementation: returns (o [b,h,dv], block_idx [b,kvh,n])."""
  del interpret, config
  if layer is not None:       # the gathers below read the layer's rows: no copy of it
    k_cmp, v_cmp, k_slc, v_slc, k_win, v_win = (
        _stacked.layer_slice(c, layer) for c in (k_cmp, v_cmp, k_slc, v_slc, k_win, v_win))
  b, h, d = q.shape
  hk = k_slc.shape[2]
  g = h // hk
  max_len = k_slc.shape[1]
  scale = d ** -0.5 if cfg.scale is None else cfg.scale
  pos = lengths - 1
  qg = q.reshape(b, hk, g, d)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hk)[None, :, None]

  # compressed branch over the valid compressed entries
  n_cmp_max = k_cmp.shape[1]
  n_valid = n_valid_cmp(lengths, cfg, n_cmp_max)
  cmask = jnp.arange(n_cmp_max)[None, None, :] < n_valid[:, None, None]
  cmask = jnp.broadcast_to(cmask, (b, hk, n_cmp_max))
  o_cmp, s_cmp, lse_cmp = _attend(qg, k_cmp.transpose(0, 2, 1, 3), v_cmp.transpose(0, 2, 1, 3),
                                  cmask, scale)
  idx = select_from_cmp(s_cmp, lse_cmp[..., 0], cmask, pos, cfg, max_len)   # [b, kvh, n]

  # selected branch: gather the chosen blocks only
  ls = cfg.select_len
  tok = (jnp.maximum(idx, 0)[..., None] * ls + jnp.arange(ls)).reshape(b, hk, -1)
  smask = ((idx[..., None] >= 0) & (tok.reshape(idx.shape + (ls,)) <= pos[:, None, None, None])
           ).reshape(b, hk, -1)
  tok_c = jnp.minimum(tok, max_len - 1)
  ks = k_slc[bi, tok_c, hi]                                              # [b, kvh, n*l', d]
  vs = v_slc[bi, tok_c, hi]
  o_slc, _, _ = _attend(qg, ks, vs, smask, scale)

  # window branch: the last `window` positions only
  w = min(cfg.window, k_win.shape[1])
  start = jnp.maximum(0, pos - w + 1)
  tw = start[:, None] + jnp.arange(w)[None]                              # [b, w]
  wmask = jnp.broadcast_to((tw <= pos[:, None])[:, None], (b, hk, w))
  tw_c = jnp.minimum(tw, k_win.shape[1] - 1)[:, None, :]
  kw = k_win[bi, tw_c, hi]
  vw = v_win[bi, tw_c, hi]
  o_win, _, _ = _attend(qg, kw, vw, wmask, scale)
  return gate_combine(gates, o_cmp, o_slc, o_win, q.dtype), idx


DECODE.register("xla", _xla_decode)


def nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, *, cfg: NSAConfig,
               layer=None, return_block_idx: bool = False, implementation=None, interpret=None,
               config=None):
  """q [b,h,d]: the new token's queries; gates [b,h,3]; lengths [b] int32 = tokens in the raw
  caches INCLUDING the new one (its position is lengths-1; 1 <= lengths <= cache length).
  k_cmp/v_cmp [b,max_cmp,kvh,d/dv]: compressed cache, block j valid once its last token
  j*d + l - 1 is written (the layer appends one entry every `stride` tokens);
  k_slc/v_slc, k_win/v_win [b,max_len,kvh,d/dv]: raw caches (k_win may be a ring buffer only
  if the caller maps it; here positions index it directly).
  layer: None, or an int / int32 scalar (traced inside a scan over layers is fine) when every
  cache is all layers' caches stacked, [layers, b, n, kvh, d]: the kernels read that layer in
  place instead of XLA copying its slices out first.
  implementation: None (GPU: "pallas_triton" then "xla"; elsewhere "xla"), a name or a
  sequence (ops._backend); interpret / config (NSABlockConfig) go to the Pallas kernels.
  Returns o [b,h,dv] (q.dtype) and with return_block_idx the selection [b,kvh,n] too.
  """
  if q.ndim != 3 or gates.shape != q.shape[:2] + (3,):
    raise ValueError(f"nsa_decode: q must be [b,h,d] and gates [b,h,3]; got {q.shape}, "
                     f"{gates.shape}")
  caches = (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc),
            ("k_win", k_win), ("v_win", v_win))
  lead = () if layer is None else k_slc.shape[:1]
  form = "[b, n, kvh, d]" if layer is None else "[layers, b, n, kvh, d] (with layer=)"
  for name, x in caches:
    if (x.ndim != 4 + len(lead) or x.shape[:len(lead)] != lead
        or x.shape[len(lead)] != q.shape[0] or x.shape[-2] != k_slc.shape[-2]):
      raise ValueError(f"nsa_decode: {name} must be {form}; got {x.shape}")
  if layer is not None:
    layer = _stacked.check_layer(layer, lead[0], "nsa_decode")
  if q.shape[1] % k_slc.shape[-2]:
    raise ValueError(f"nsa_decode: heads {q.shape[1]} not a multiple of kv_heads "
                     f"{k_slc.shape[-2]}")
  lengths = jnp.asarray(lengths, jnp.int32)
  o, idx = DECODE(implementation, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths,
                  cfg=cfg, layer=layer, interpret=interpret, config=config)
  return (o, idx) if return_block_idx else o
