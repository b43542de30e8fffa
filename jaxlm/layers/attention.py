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
from jaxlm.sharding import constrain


def implementation_arg(spec: str):
  """Config string → ops `implementation=` value ('' → None, 'a,b' → ('a', 'b'))."""
  if not spec:
    return None
  names = tuple(s.strip() for s in spec.split(",") if s.strip())
  return names[0] if len(names) == 1 else names


def write_cache(cache, new, starts):
  """Write `new` [batch, n, ...] into `cache` [batch, max_len, ...] at per-row `starts` [batch]."""
  def one(c, x, s):
    return jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), s, axis=0)
  return jax.vmap(one)(cache, new, starts)


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
    lengths: [batch] int32 = tokens already cached). Returns (y [batch, seq, d_model], new cache or None).
    """
    cfg, dt = self.cfg, x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq.value.astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk.value.astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv.value.astype(dt))
    q = constrain(apply_rope(q, positions, cfg.rope_base), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, positions, cfg.rope_base), ("batch", "seq", "kv_heads", "head_dim"))
    soft_cap = cfg.attention.soft_cap or None
    impl = implementation_arg(cfg.attention.implementation)
    if cache is None:
      o = ops.attention.attention(
          q, k, v, causal=True, window=self._window(), q_segment_ids=segment_ids,
          kv_segment_ids=segment_ids, soft_cap=soft_cap, implementation=impl)
      new_cache = None
    else:
      n = x.shape[1]
      k_cache = write_cache(cache["k"], k, cache["lengths"])
      v_cache = write_cache(cache["v"], v, cache["lengths"])
      o = ops.attention.decode_attention(
          q, k_cache, v_cache, cache["lengths"] + n, window=self._window(), soft_cap=soft_cap)
      new_cache = dict(k=k_cache, v=v_cache, lengths=cache["lengths"] + n)
    y = jnp.einsum("bshk,hkd->bsd", o.astype(dt), self.wo.value.astype(dt))
    return y, new_cache
