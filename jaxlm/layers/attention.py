"""Grouped-query self-attention with RoPE, calling ops.attention (training) or
ops.attention.decode_attention (with a KV cache)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import ops.attention
from jaxlm.config import ModelConfig
from jaxlm.layers.embed import apply_rope
from jaxlm.layers.mlp import out_proj_std
from jaxlm.layers.params import param
from jaxlm import sharding
from jaxlm.sharding import constrain


def implementation_arg(spec: str):
  """Config string → ops `implementation=` value ('' → None, 'a,b' → ('a', 'b'))."""
  if not spec:
    return None
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  return names[0] if len(names) == 1 else names


Q_AXES = ("batch", "seq", "heads", "head_dim")
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
TOKEN_AXES = ("batch", "seq")


def _slice_kv(k, group: int, hl: int):
  """Inside shard_map, when q's heads are split over "tensor" but k's are not (the kv heads do
  not divide the axis): the kv heads this device's hl q heads read. k: [b, s, n_kv, d]."""
  i = jax.lax.axis_index("tensor")
  if group % hl == 0:      # the local q heads lie inside one group: its single kv head
    return jax.lax.dynamic_slice_in_dim(k, (i * hl) // group, 1, axis=2)
  return jnp.take(k, (i * hl + jnp.arange(hl)) // group, axis=2)  # one kv head per q head


def _match_heads(q, k, v, n_heads: int, n_kv: int):
  """k, v for the local q heads (a no-op unless only q's heads were split)."""
  hl = q.shape[2]
  if hl == n_heads or k.shape[2] != n_kv:
    return k, v
  group = n_heads // n_kv
  return _slice_kv(k, group, hl), _slice_kv(v, group, hl)


def sharded_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, kv_valid=None,
                      **kwargs):
  """ops.attention.attention run per device on its batch / heads block of the ambient mesh.

  q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
  segment ids / kv_valid: [batch, len]. Returns [batch, q_len, heads, head_dim]. kwargs are
  ops.attention.attention's static options (causal, window, sinks, soft_cap, implementation).
  """
  n_heads, n_kv = q.shape[2], k.shape[2]

  def fn(q, k, v, qs, ks, valid):
    k, v = _match_heads(q, k, v, n_heads, n_kv)
    return ops.attention.attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks,
                                   kv_valid=valid, **kwargs)

  return sharding.per_shard(
      fn, (q, k, v, q_segment_ids, kv_segment_ids, kv_valid),
      (Q_AXES, KV_AXES, KV_AXES, TOKEN_AXES, TOKEN_AXES, TOKEN_AXES), Q_AXES, q.shape)


def sharded_decode_attention(q, k_cache, v_cache, lengths, layer=None, **kwargs):
  """ops.attention.decode_attention per device (batch / heads blocks); shapes as there. With
  `layer`, the caches are the stacked [layers, batch, max_len, kv_heads, head_dim] and the
  kernel reads that layer in place."""
  n_heads, n_kv = q.shape[-2], k_cache.shape[-2]
  cache_axes = KV_AXES if layer is None else ("layers",) + KV_AXES
  if layer is not None:            # an operand of the shard_map below (replicated)
    layer = jnp.asarray(layer, jnp.int32)

  def fn(q, k, v, lengths, layer):
    if q.shape[2] != n_heads and k.shape[-2] == n_kv and layer is not None:
      # only q's heads are split: slice this device's kv heads out of the layer (a copy of
      # that layer's slice, as before stacking; reading in place needs kv heads on "tensor")
      k, v, layer = layer_view(k, layer), layer_view(v, layer), None
    if layer is None:
      k, v = _match_heads(q, k, v, n_heads, n_kv)
    return ops.attention.decode_attention(q, k, v, lengths, layer=layer, **kwargs)

  return sharding.per_shard(fn, (q, k_cache, v_cache, lengths, layer),
                            (Q_AXES, cache_axes, cache_axes, ("batch",), None), Q_AXES, q.shape)


def write_cache(cache, new, starts, layer=None):
  """Write `new` [batch, n, ...] at per-row `starts` [batch] into `cache` [batch, max_len, ...];
  with `layer` (an int or a traced scalar), into the stacked cache [layers, batch, max_len, ...]
  at that layer. The stacked write stays in place: only the new rows move, where writing a
  layer's slice back would move the whole layer (jaxlm/models/stacking.scan_blocks_decode).
  Rows must fit (starts + n <= max_len): the unstacked write clamps a start that does not,
  the stacked one drops the rows past the end."""
  if layer is None:
    def one(c, x, s):
      return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), s, axis=0)
    return jax.vmap(one)(cache, new, starts)

  # One scatter over (layer, row, position) index arrays. The vmapped dynamic_update_slice
  # that did this made a batched scatter whose normalisation fails XLA's GPU compile on a
  # multi-device mesh (jax 0.10.2: "Repeated dimensions not allowed in
  # scatter_dims_to_operand_dims" after batched_gather_scatter_normalizer).
  b, n = new.shape[:2]
  rows = jnp.arange(b, dtype=jnp.int32)[:, None]
  cols = starts.astype(jnp.int32)[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
  return cache.at[layer, rows, cols].set(new.astype(cache.dtype))


def layer_view(cache, layer=None):
  """The layer's [batch, max_len, ...] of a stacked cache (the cache itself when layer is None).
  XLA reads it in place where the consumer is a fusion."""
  return cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    pd, std = cfg.param_dtype, cfg.init_std
    self.cfg = cfg
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=std, dtype=pd)
    self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                    std=out_proj_std(std, cfg.n_layers), dtype=pd)

  def _window(self):
    a = self.cfg.attention
    return a.window if a.kind == "sliding" else None

  def __call__(self, x, positions, segment_ids=None, cache=None):
    """x: [batch, seq, d_model]; positions: [batch, seq] int32; segment_ids: [batch, seq] or None.

    cache: None (training / full forward) or dict(k, v: [batch, max_len, kv_heads, head_dim],
    lengths: [batch] int32 = tokens already cached), or the stacked k, v [layers, ...] with
    layer = this layer's index. Returns (y [batch, seq, d_model], new cache or None).
    """
    cfg, dt = self.cfg, x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq.value.astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk.value.astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv.value.astype(dt))
    q = constrain(apply_rope(q, positions, cfg.rope_base), Q_AXES)
    k = constrain(apply_rope(k, positions, cfg.rope_base), KV_AXES)
    soft_cap = cfg.attention.soft_cap or None
    impl = implementation_arg(cfg.attention.implementation)
    if cache is None:
      o = sharded_attention(
          q, k, v, causal=True, window=self._window(), q_segment_ids=segment_ids,
          kv_segment_ids=segment_ids, soft_cap=soft_cap, implementation=impl)
      new_cache = None
    else:
      n, layer = x.shape[1], cache.get("layer")
      k_cache = write_cache(cache["k"], k, cache["lengths"], layer)
      v_cache = write_cache(cache["v"], v, cache["lengths"], layer)
      o = sharded_decode_attention(q, k_cache, v_cache, cache["lengths"] + n, layer,
                                   window=self._window(), soft_cap=soft_cap)
      new_cache = dict(k=k_cache, v=v_cache, lengths=cache["lengths"] + n)
    y = jnp.einsum("bshk,hkd->bsd", o.astype(dt), self.wo.value.astype(dt))
    return y, new_cache
