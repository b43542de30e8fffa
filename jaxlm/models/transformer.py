"""Decoder-only transformer (LLaMA-style): pre-norm blocks of GQA attention and SwiGLU,
or a mixture-of-experts FFN (model.moe.kind = vanilla | unipool).

MoE: the model owns the expert pools (`self.pool`, jaxlm/layers/expert_pool.ExpertPool) outside
the block stack; each block holds only its router (and shared experts) and gets its pool's
arrays as an argument, so scanning the blocks never replicates a UniPool per layer.
`model(tokens, return_aux=True)` returns (logits, cache, aux) with the routing losses and
statistics of jaxlm/layers/moe_losses.model_aux (an empty dict for a dense model); without
return_aux the result is (logits, cache) as always.
Routing probe (eval only, MoE models): `model(tokens, route_override={"layer": i, "key": k})`
routes layer i (an int32 scalar, may be traced; -1 = none) uniformly at random
(jaxlm/layers/moe.py, random_route), with jax.random.fold_in(k, i) as that layer's key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers import expert_pool, pool_grad
from jaxlm.layers.attention import Attention, implementation_arg
from jaxlm.layers.embed import Embed
from jaxlm.layers.logits import logits_einsum
from jaxlm.layers.expert_pool import ExpertPool, pool_of_layer
from jaxlm.layers.mlp import SwiGLU, out_proj_std
from jaxlm.layers.moe import MoEFFN
from jaxlm.layers.moe_losses import model_aux
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers import nsa as nsa_layer
from jaxlm.layers.params import param
from jaxlm.models.stacking import (decode_blocks, init_stacked, maybe_remat, scan_blocks,
                                   scan_blocks_in_chunks)
from jaxlm.sharding import constrain, multi_device_mesh

ACT = ("batch", "seq", "embed")


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = cfg.param_dtype
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    self.attn = (nsa_layer.NSAAttention(cfg, rngs=rngs) if cfg.attention.kind == "nsa"
                 else Attention(cfg, rngs=rngs))
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    if cfg.moe.kind == "none":
      self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std,
                        out_std=out_proj_std(cfg.init_std, cfg.n_layers), rngs=rngs,
                        param_dtype=pd)
    else:
      self.moe = MoEFFN(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids=None, cache=None):
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = constrain(x + h, ACT)
    x = constrain(x + self.mlp(self.mlp_norm(x)), ACT)
    return x, cache

  def call_with_stats(self, x, positions, segment_ids=None, cache=None):
    """Dense block with an NSA attention: (x, cache, NSA gate stats)."""
    h, cache, stats = self.attn.call_with_stats(self.attn_norm(x), positions, segment_ids, cache)
    x = constrain(x + h, ACT)
    x = constrain(x + self.mlp(self.mlp_norm(x)), ACT)
    return x, cache, stats

  def moe_call(self, x, positions, segment_ids, cache, experts, prev_logits, random_route=None):
    """MoE block: returns (x, cache, router logits, per-layer routing stats)."""
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = constrain(x + h, ACT)
    y, logits, stats = self.moe(self.mlp_norm(x), experts, prev_logits,
                                random_route=random_route)
    return constrain(x + y, ACT), cache, logits, stats


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs, param_dtype=pd)
    if cfg.scan_layers:
      self.blocks = init_stacked(lambda r: Block(cfg, rngs=r), cfg.n_layers, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    if cfg.moe.kind != "none":
      self.pool = ExpertPool(cfg, cfg.n_pools, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                        std=cfg.init_std, dtype=pd)

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None,
               return_aux: bool = False, route_override=None, return_hidden: bool = False):
    """tokens: [batch, seq] int32. positions: [batch, seq] (default arange, or cache lengths + arange).

    cache: None, or dict(k, v: [layers, batch, max_len, kv_heads, head_dim], lengths: [batch]).
    Returns logits [batch, seq, vocab] float32 and the updated cache (None without one), plus
    the MoE aux dict when return_aux (empty for a dense model). With return_hidden the first
    output is the last block's output x [batch, seq, d_model] instead: `to_logits(x)` gives the
    logits (jaxlm/train/chunked_loss.py applies it a chunk of tokens at a time).
    """
    if route_override is not None and self.cfg.moe.kind == "none":
      raise ValueError("route_override needs an MoE model (model.moe.kind != 'none')")
    if self.cfg.moe.kind != "none":
      x, new_cache, aux = self._moe_forward(tokens, positions, segment_ids, cache,
                                            route_override)
    else:
      x, new_cache, aux = self._dense_forward(tokens, positions, segment_ids, cache)
    out = x if return_hidden else self.to_logits(x)
    return (out, new_cache, aux) if return_aux else (out, new_cache)

  def _dense_forward(self, tokens, positions, segment_ids, cache):
    cfg = self.cfg
    b, s = tokens.shape
    if positions is None:
      start = cache["lengths"][:, None] if cache is not None else 0
      positions = start + jnp.arange(s, dtype=jnp.int32)[None, :]
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACT)
    layer_caches = None if cache is None else {k: v for k, v in cache.items() if k != "lengths"}
    lengths = None if cache is None else cache["lengths"]
    is_nsa = cfg.attention.kind == "nsa"

    def body(block, x, layer_cache):
      c = None if layer_cache is None else dict(layer_cache, lengths=lengths)
      if is_nsa:
        x, c, st = block.call_with_stats(x, positions, segment_ids, c)
      else:
        (x, c), st = block(x, positions, segment_ids, c), None
      c = None if c is None else {k: v for k, v in c.items() if k != "lengths"}
      return x, (c, st)

    if cache is not None:   # decoding: the stacked caches are carried and written in place
      x, new_layers, stats = decode_blocks(self.blocks, x, layer_caches,
                                           lambda blk, x, c, _: body(blk, x, c),
                                           scanned=cfg.scan_layers, unroll=cfg.decode_unroll)
    elif cfg.scan_layers:
      x, (new_layers, stats) = scan_blocks(self.blocks, x, layer_caches, body, cfg.remat)
    else:
      outs = []
      run = maybe_remat(lambda blk, x, c: body(blk, x, c), cfg.remat) if cache is None else body
      for i, blk in enumerate(self.blocks):
        c = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
        x, c = run(blk, x, c)
        outs.append(c)
      new_layers, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else (None, None)
      new_layers = None if cache is None else new_layers
    new_cache = None if cache is None else dict(new_layers, lengths=lengths + s)
    aux = nsa_layer.gate_aux(stats["gate_mean"]) if is_nsa else {}
    return x, new_cache, aux

  def to_logits(self, x):
    """The last block's output x [batch, seq, d] -> logits [batch, seq, vocab] float32 (final
    norm and output matmul, each token on its own)."""
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = logits_einsum("bsd,dv->bsv", x, self.head.value.astype(x.dtype))
    return constrain(logits, ("batch", "seq", "vocab"))

  def _moe_forward(self, tokens, positions, segment_ids, cache, route_override=None):
    """Like _dense_forward; blocks get their pool's experts, the carry holds the previous
    layer's router logits (MoE++ gating residual), per-layer routing stats are stacked."""
    cfg = self.cfg
    n_layers, n_pools = cfg.n_layers, cfg.n_pools
    b, s = tokens.shape
    if positions is None:
      start = cache["lengths"][:, None] if cache is not None else 0
      positions = start + jnp.arange(s, dtype=jnp.int32)[None, :]
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACT)
    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    lengths = None if cache is None else cache["lengths"]
    pools = self.pool.arrays()                     # {name: [n_pools, ...]}
    per_layer_pools = n_pools == n_layers          # vanilla: slice pools like layer params
    deferred = cfg.moe.pool_grad == "deferred" and not per_layer_pools
    # the pools' gradient comes from taps after the last layer of each chunk of `chunk` layers
    # (jaxlm/layers/pool_grad); the layers see the pools under stop_gradient
    chunk = (cfg.moe.pool_grad_chunk or n_layers) if deferred else n_layers
    full_pools = pools

    def chunk_taps(first):
      """Taps of layers first .. first + chunk - 1 (first may be traced if chunk < n_layers)."""
      if chunk == n_layers:
        w = [full_pools[n] for n in pool_grad.WEIGHTS]
        layer_pool = tuple(pool_of_layer(i, n_layers, n_pools) for i in range(n_layers))
      else:      # one pool (chunks never straddle two): slice it, keep the pool axis
        p = first // (n_layers // n_pools)
        w = [jax.lax.dynamic_slice_in_dim(full_pools[n], p, 1, 0) for n in pool_grad.WEIGHTS]
        layer_pool = (0,) * chunk
      e = cfg.moe
      layout = expert_pool.deferred_tap_layout(e.fsdp_dispatch, multi_device_mesh(), b * s,
                                               e.top_k, cfg.d_model, cfg.resolved_d_expert,
                                               e.n_experts)
      spec = pool_grad.TapSpec(layer_pool, b * s * e.top_k, jnp.dtype(cfg.dtype),
                               implementation_arg(e.implementation), **layout)
      return pool_grad.make_taps(*w, spec)

    # The expert weights are cast to the compute dtype once here: inside the layers every one
    # of them (and its remat backward) would convert its pool again, for a shared pool the whole
    # pool per layer (unipool_469m, H200, session 19: 144 whole-pool converts, 162 ms of a
    # 413 ms step). Deferred: under stop_gradient. Shared pools per layer: through
    # pool_grad.compute_copy, so the per-layer gradients still add up in the pool's dtype.
    # Per-layer pools (vanilla) are scan inputs: their cotangents are per layer already.
    dt = jnp.dtype(cfg.dtype)
    cast_pools = None
    if deferred:
      pools = dict(pools, **{n: jax.lax.stop_gradient(pools[n]).astype(dt)
                             for n in pool_grad.WEIGHTS})
    elif per_layer_pools:
      pools = dict(pools, **{n: pools[n].astype(dt) for n in pool_grad.WEIGHTS})
    else:
      cast_pools = {n: jax.lax.stop_gradient(pools[n]).astype(dt) for n in pool_grad.WEIGHTS}
    residual = cfg.moe.gating_residual
    prev0 = jnp.zeros((b, s, cfg.moe.n_routed), jnp.float32) if residual else None

    def body(block, carry, layer_in):
      x, prev = carry
      layer_cache, layer, experts = layer_in["cache"], layer_in["layer"], layer_in["experts"]
      if experts is None:  # shared pools: pick this layer's group from the closed-over pools
        g = layer // (n_layers // n_pools)
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, g, 0, keepdims=False)
        experts = jax.tree.map(pick, pools)
        if cast_pools is not None:
          experts = dict(experts, **{n: pool_grad.compute_copy(experts[n], pick(cast_pools[n]))
                                     for n in pool_grad.WEIGHTS})
      if layer_in.get("tap") is not None:
        experts = dict(experts, tap=layer_in["tap"])
      c = None if layer_cache is None else dict(layer_cache, lengths=lengths)
      rr = None if route_override is None else (
          layer == route_override["layer"], jax.random.fold_in(route_override["key"], layer))
      x, c, logits, stats = block.moe_call(x, positions, segment_ids, c, experts, prev, rr)
      c = None if c is None else {"k": c["k"], "v": c["v"]}
      return (x, logits if residual else None), (c, stats)

    layer_ids = jnp.arange(n_layers, dtype=jnp.int32)
    if cache is not None:   # decoding: the stacked caches are carried and written in place
      (x, _), new_layers, stats = decode_blocks(
          self.blocks, (x, prev0), layer_caches,
          lambda blk, carry, c, lx: body(blk, carry, dict(lx, cache=c, tap=None)),
          {"layer": layer_ids, "experts": pools if per_layer_pools else None},
          scanned=cfg.scan_layers, unroll=cfg.decode_unroll)
    elif cfg.scan_layers:
      xs = {"cache": layer_caches, "layer": layer_ids,
            "experts": pools if per_layer_pools else None,
            "tap": chunk_taps(0) if deferred and chunk == n_layers else None}
      if deferred and chunk < n_layers:
        (x, _), (new_layers, stats) = scan_blocks_in_chunks(
            self.blocks, (x, prev0), xs, body, cfg.remat, chunk,
            lambda i: {"tap": chunk_taps(i * chunk)})
      else:
        (x, _), (new_layers, stats) = scan_blocks(self.blocks, (x, prev0), xs, body, cfg.remat)
    else:
      outs, all_stats, carry = [], [], (x, prev0)
      run = maybe_remat(body, cfg.remat) if cache is None else body
      taps = None
      for i, blk in enumerate(self.blocks):
        c = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
        g = pool_of_layer(i, n_layers, n_pools)
        experts = jax.tree.map(lambda a: a[g], pools)
        if deferred and i % chunk == 0:
          taps = chunk_taps(i)
        tap = None if not deferred else jax.tree.map(lambda a: a[i % chunk], taps)
        carry, (c, st) = run(blk, carry, {"cache": c, "layer": layer_ids[i], "experts": experts,
                                          "tap": tap})
        outs.append(c)
        all_stats.append(st)
      x = carry[0]
      stats = jax.tree.map(lambda *a: jnp.stack(a), *all_stats)
      new_layers = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    new_cache = None if cache is None else dict(new_layers, lengths=lengths + s)
    return x, new_cache, model_aux(stats, cfg.moe, n_pools)


def head_param_keys(cfg: ModelConfig) -> tuple:
  """The params Transformer.to_logits reads."""
  return ("final_norm", "embed" if cfg.tie_embeddings else "head")


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  """Empty KV cache: dict(k, v: [layers, batch, max_len, kv_heads, head_dim], lengths: [batch]).

  attention.kind=nsa: the raw caches of the three branches and the compressed kc, vc instead of
  k, v (jaxlm/layers/nsa.py init_layer_caches)."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  if cfg.attention.kind == "nsa":
    if cfg.moe.kind != "none":
      raise ValueError("decoding caches of NSA attention are for dense FFN models "
                       "(model.moe.kind='none'); NSA + MoE trains but has no decode path")
    return dict(nsa_layer.init_layer_caches(cfg, batch, max_len, dtype),
                lengths=jnp.zeros((batch,), jnp.int32))
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              lengths=jnp.zeros((batch,), jnp.int32))


CACHE_AXES = dict(k=("layers", "batch", None, "kv_heads", "head_dim"),
                  v=("layers", "batch", None, "kv_heads", "head_dim"), lengths=("batch",))


def cache_axes(cfg: ModelConfig) -> dict:
  """Logical axes of init_cache(cfg, ...)'s entries (CACHE_AXES for full/sliding attention)."""
  if cfg.attention.kind != "nsa":
    return dict(CACHE_AXES)
  names = jax.eval_shape(lambda: init_cache(cfg, 1, 1))
  return {k: nsa_layer.CACHE_AXES.get(k, CACHE_AXES.get(k)) for k in names}
