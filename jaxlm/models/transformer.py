"""Decoder-only transformer (LLaMA-style): pre-norm blocks of GQA attention and SwiGLU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.attention import Attention
from jaxlm.layers.embed import Embed
from jaxlm.layers.mlp import SwiGLU, out_proj_std
from jaxlm.layers.norms import RMSNorm
from jaxlm.layers.params import param
from jaxlm.models.stacking import maybe_remat, scan_blocks, stack_modules
from jaxlm.sharding import constrain

ACT = ("batch", "seq", "embed")


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = cfg.param_dtype
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std,
                      out_std=out_proj_std(cfg.init_std, cfg.n_layers), rngs=rngs, param_dtype=pd)

  def __call__(self, x, positions, segment_ids=None, cache=None):
    h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache)
    x = constrain(x + h, ACT)
    x = constrain(x + self.mlp(self.mlp_norm(x)), ACT)
    return x, cache


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = Embed(cfg.vocab_size, cfg.d_model, std=cfg.init_std, rngs=rngs, param_dtype=pd)
    blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
    self.blocks = stack_modules(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    if not cfg.tie_embeddings:
      self.head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                        std=cfg.init_std, dtype=pd)

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
    """tokens: [batch, seq] int32. positions: [batch, seq] (default arange, or cache lengths + arange).

    cache: None, or dict(k, v: [layers, batch, max_len, kv_heads, head_dim], lengths: [batch]).
    Returns logits [batch, seq, vocab] float32 and the updated cache (None without one).
    """
    cfg = self.cfg
    b, s = tokens.shape
    if positions is None:
      start = cache["lengths"][:, None] if cache is not None else 0
      positions = start + jnp.arange(s, dtype=jnp.int32)[None, :]
    x = constrain(self.embed(tokens, jnp.dtype(cfg.dtype)), ACT)
    layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
    lengths = None if cache is None else cache["lengths"]

    def body(block, x, layer_cache):
      c = None if layer_cache is None else dict(layer_cache, lengths=lengths)
      x, c = block(x, positions, segment_ids, c)
      return x, None if c is None else {"k": c["k"], "v": c["v"]}

    if cfg.scan_layers:
      x, new_layers = scan_blocks(self.blocks, x, layer_caches, body, cfg.remat)
    else:
      outs = []
      run = maybe_remat(lambda blk, x, c: body(blk, x, c), cfg.remat) if cache is None else body
      for i, blk in enumerate(self.blocks):
        c = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
        x, c = run(blk, x, c)
        outs.append(c)
      new_layers = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = jnp.einsum("bsd,dv->bsv", x, self.head.value.astype(x.dtype),
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "seq", "vocab"))
    new_cache = None if cache is None else dict(new_layers, lengths=lengths + s)
    return logits, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  """Empty KV cache: dict(k, v: [layers, batch, max_len, kv_heads, head_dim], lengths: [batch])."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
              lengths=jnp.zeros((batch,), jnp.int32))


CACHE_AXES = dict(k=("layers", "batch", None, "kv_heads", "head_dim"),
                  v=("layers", "batch", None, "kv_heads", "head_dim"), lengths=("batch",))
