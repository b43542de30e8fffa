"""SymbolicLight V1: a spike-gated dual-path language model (arXiv 2605.21333).

Continuous residual stream c, binary spikes s that gate computation (model.spiking config):

  encoder   c_0 = LN(embed(tokens)); s_0 = LIF(c_0) over time (ops.lif: v <- clamp(beta v + x,
            -3, 3), s = 1[v >= 1], hard reset, atan surrogate), or the top-k ablation.
  block l   (input c, s; a token is *active* when it has any spike)
    decay   u_t = W_tcam s_t (zero for inactive tokens); h_t = lam h_{t-1} + (1 - lam) u_t per
            head, lam = sigmoid(lam_raw) (ops.scan).
    attn    q, k, v = W_{q,k,v} c with RoPE on q, k; key j visible from query i iff j <= i and
            (i - window < j or j < n_anchors) and token j is active (ops.attention window= /
            sinks= / kv_valid=); zero output at inactive queries.
    mix     c = LN(c + W_o (g attn + (1 - g) decay)), g = sigmoid(gate).
    ffn     c = LN(c + W_down H(W_up c - 1))  (no bias; H = Heaviside with the ops.lif surrogate)
    spikes  s = H(c - 1) for the next block.
  head      logits = W_out c + w_p W2 GELU(W1 c) (bottleneck d/4), or + a static vocab bias.

Decoding carries everything, so the prefix is never recomputed: the encoder membrane v, each
layer's decay state h, and each layer's K/V cache with its key-has-spike mask. `ops.attention
.decode_attention` has no per-key mask, so the cached path builds ops.attention's reference
mask (causal + window + anchors + key spikes + written entries) and runs its masked attention
(the "xla" semantics, forward only).

Not modelled: dropout (0.1 in the public code); the public code's 64-token encoder chunks with
v detached between chunks (here: exact BPTT through ops.lif). With segment_ids (packed
documents) attention is masked per segment and the decay state restarts at each segment, but
the encoder membrane runs across segment boundaries (ops.lif has no reset input) and the
anchors are the row's first tokens.

`model(tokens, return_aux=True)` returns (logits, cache, aux) with spike statistics (module
docstring of `spike_aux`); without return_aux the result is (logits, cache) as for the
transformer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import ops.lif
import ops.scan
from ops.attention import reference as attention_reference
from jaxlm.config import ModelConfig
from jaxlm import sharding
from jaxlm.layers.attention import (implementation_arg, layer_view, sharded_attention,
                                   write_cache)
from jaxlm.layers.embed import Embed, apply_rope
from jaxlm.layers.logits import logits_einsum
from jaxlm.layers.params import param
from jaxlm.layers.spiking import LayerNorm, const_param, heaviside, topk_mask
from jaxlm.models.stacking import decode_blocks, init_stacked, maybe_remat, scan_blocks
from jaxlm.sharding import constrain

ACT = ("batch", "seq", "embed")
HEADS = ("batch", "seq", "heads", "head_dim")


def _spike(cfg: ModelConfig, z):
  sp = cfg.spiking
  return heaviside(z - sp.threshold, sp.surrogate, sp.surrogate_alpha)


class SparseTCAM(nnx.Module):
  """Dual-path sequence mixer (decay path + spike-gated local attention) and its LayerNorm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    pd, std, sp = cfg.param_dtype, cfg.init_std, cfg.spiking
    self.cfg = cfg
    if sp.mixer != "attention":
      self.w_tcam = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=std, dtype=pd)
      self.decay_raw = const_param(sp.decay_init, (h,), ("heads",), dtype=pd)
    if sp.mixer != "decay":
      self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=std, dtype=pd)
      self.wk = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
      self.wv = param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std=std, dtype=pd)
    if sp.mixer == "dual":
      self.gate = const_param(sp.gate_init, (), (), dtype=pd)
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std=std, dtype=pd)
    self.norm = LayerNorm(d, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)

  def decay_path(self, spikes, active, segment_ids, h0):
    """Returns (decay output [b, s, heads, head_dim], h_last [b, heads*head_dim] f32)."""
    cfg, dt = self.cfg, spikes.dtype
    b, s, _ = spikes.shape
    h, hd = cfg.n_heads, cfg.resolved_head_dim
    gated = spikes * active[..., None].astype(dt)          # u_t only where token t spiked
    u = jnp.einsum("bsd,dhk->bshk", gated, self.w_tcam.value.astype(dt))
    lam = jax.nn.sigmoid(self.decay_raw.value.astype(jnp.float32))     # [heads]
    lam_c = jnp.repeat(lam, hd)                                          # [heads*head_dim]
    inp = ((1.0 - lam_c) * u.reshape(b, s, h * hd).astype(jnp.float32)).astype(dt)
    a = lam_c
    if segment_ids is not None:  # restart the state at each segment's first token
      starts = jnp.concatenate([jnp.zeros((b, 1), bool),
                                segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      a = jnp.where(starts[..., None], 0.0, jnp.broadcast_to(lam_c, (b, s, h * hd)))
    chan = ("batch", "seq", "heads")   # channels = heads*head_dim, split with the heads
    out, h_last = sharding.per_shard(
        functools.partial(ops.scan.linear_scan,
                          implementation=implementation_arg(cfg.spiking.scan_implementation)),
        (a, inp, h0), (chan[2:] if a.ndim == 1 else chan, chan, ("batch", "heads")),
        (chan, ("batch", "heads")), (inp.shape, (b, h * hd)))
    return out.reshape(b, s, h, hd), h_last

  def attention_path(self, x, active, positions, segment_ids, cache):
    """Returns (attention output [b, s, heads, head_dim], new (k, v, spike) cache or None)."""
    cfg, dt, sp = self.cfg, x.dtype, self.cfg.spiking
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq.value.astype(dt))
    k = jnp.einsum("bsd,dhk->bshk", x, self.wk.value.astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, self.wv.value.astype(dt))
    q = constrain(apply_rope(q, positions, cfg.rope_base), HEADS)
    k = constrain(apply_rope(k, positions, cfg.rope_base), ("batch", "seq", "kv_heads", "head_dim"))
    soft_cap = cfg.attention.soft_cap or None
    if cache is None:
      o = sharded_attention(
          q, k, v, causal=True, window=sp.window, sinks=sp.n_anchors, q_segment_ids=segment_ids,
          kv_segment_ids=segment_ids, kv_valid=active, soft_cap=soft_cap,
          implementation=implementation_arg(cfg.attention.implementation))
      new_cache = None
    else:
      b, s = x.shape[:2]
      lengths, layer = cache["lengths"], cache.get("layer")
      k_cache = write_cache(cache["k"], k, lengths, layer)
      v_cache = write_cache(cache["v"], v, lengths, layer)
      spike_cache = write_cache(cache["spike"], active, lengths, layer)
      max_len = k_cache.shape[-3]          # [(layers,) batch, max_len, heads, head_dim]
      q_pos = lengths[:, None] + jnp.arange(s, dtype=jnp.int32)[None]
      written = jnp.arange(max_len, dtype=jnp.int32)[None] < (lengths + s)[:, None]
      mask = attention_reference.build_mask(
          b, s, max_len, q_pos=q_pos, causal=True, window=sp.window, sinks=sp.n_anchors,
          kv_valid=layer_view(spike_cache, layer) & written)
      o, _ = attention_reference.masked_attention(
          q, layer_view(k_cache, layer), layer_view(v_cache, layer), mask,
          scale=cfg.resolved_head_dim ** -0.5, soft_cap=soft_cap,
          precision=jax.lax.Precision.DEFAULT)
      new_cache = dict(k=k_cache, v=v_cache, spike=spike_cache)
    o = o * active[:, :, None, None].astype(o.dtype)     # zero at queries without spikes
    return o.astype(dt), new_cache

  def __call__(self, x, spikes, positions, segment_ids=None, cache=None):
    """x (continuous) / spikes: [b, s, d]. cache: None or this layer's dict (+ lengths), or all
    layers' caches stacked with layer = this layer's index (written in place at that layer).

    Returns (LN(x + W_o mix) [b, s, d], new layer cache or None, active [b, s] bool).
    """
    sp, dt = self.cfg.spiking, x.dtype
    active = jnp.any(spikes > 0, axis=-1)
    new_cache = {} if cache is not None else None
    layer = None if cache is None else cache.get("layer")
    if sp.mixer != "attention":
      decay, h_last = self.decay_path(spikes, active, segment_ids,
                                      None if cache is None else layer_view(cache["h"], layer))
      if cache is not None:
        new_cache["h"] = (h_last if layer is None else jax.lax.dynamic_update_index_in_dim(
            cache["h"], h_last.astype(cache["h"].dtype), layer, 0))
    if sp.mixer != "decay":
      attn, kv = self.attention_path(x, active, positions, segment_ids, cache)
      if cache is not None:
        new_cache.update(kv)
    if sp.mixer == "dual":
      g = jax.nn.sigmoid(self.gate.value.astype(jnp.float32))
      mix = (g * attn.astype(jnp.float32) + (1.0 - g) * decay.astype(jnp.float32)).astype(dt)
    else:
      mix = decay if sp.mixer == "decay" else attn
    y = jnp.einsum("bshk,hkd->bsd", mix, self.wo.value.astype(dt))
    return constrain(self.norm(x + y), ACT), new_cache, active


class SpikingFFN(nnx.Module):
  """c -> LN(c + W_down H(W_up c - threshold)), no bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd, std = cfg.param_dtype, cfg.init_std
    self.cfg = cfg
    self.w_up = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), std=std, dtype=pd)
    self.w_down = param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), std=std, dtype=pd)
    self.norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)

  def __call__(self, x):
    """x [b, s, d] -> (LN(x + W_down spikes) [b, s, d], hidden spike rate scalar f32)."""
    dt = x.dtype
    z = jnp.einsum("bsd,df->bsf", x, self.w_up.value.astype(dt))
    hs = _spike(self.cfg, z)
    y = jnp.einsum("bsf,fd->bsd", hs, self.w_down.value.astype(dt))
    return constrain(self.norm(x + y), ACT), jnp.mean(hs.astype(jnp.float32))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.tcam = SparseTCAM(cfg, rngs=rngs)
    self.ffn = SpikingFFN(cfg, rngs=rngs)

  def __call__(self, x, spikes, positions, segment_ids=None, cache=None):
    """Returns (x, spikes for the next block, new layer cache, per-layer stats)."""
    stats = {"spike_rate": jnp.mean(spikes.astype(jnp.float32))}
    x, new_cache, active = self.tcam(x, spikes, positions, segment_ids, cache)
    x, stats["ffn_spike_rate"] = self.ffn(x)
    stats["active_fraction"] = jnp.mean(active.astype(jnp.float32))
    return x, _spike(self.cfg, x), new_cache, stats


class SymbolicLight(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std, sp = cfg.param_dtype, cfg.init_std, cfg.spiking
    d, vocab = cfg.d_model, cfg.vocab_size
    self.embed = Embed(vocab, d, std=std, rngs=rngs, param_dtype=pd)
    self.encoder_norm = LayerNorm(d, eps=cfg.norm_eps, rngs=rngs, param_dtype=pd)
    if cfg.scan_layers:
      self.blocks = init_stacked(lambda r: Block(cfg, rngs=r), cfg.n_layers, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    if not cfg.tie_embeddings:
      self.head = param(rngs, (d, vocab), ("embed", "vocab"), std=std, dtype=pd)
    if sp.head == "dynamic_prior":
      r = sp.prior_bottleneck or d // 4
      self.prior_w1 = param(rngs, (d, r), ("embed", "mlp"), std=std, dtype=pd)
      self.prior_w2 = param(rngs, (r, vocab), ("mlp", "vocab"), std=std, dtype=pd)
      self.prior_weight = const_param(sp.prior_weight_init, (), (), dtype=pd)
    else:
      self.prior_bias = param(rngs, (vocab,), ("vocab",), init="zeros", dtype=pd)

  # ------------------------------------------------------------------ pieces
  def encode(self, tokens, v0=None):
    """tokens [b, s] -> (continuous c_0 [b, s, d], spikes s_0 [b, s, d], v_last or None)."""
    cfg, sp = self.cfg, self.cfg.spiking
    x = self.encoder_norm(self.embed(tokens, jnp.dtype(cfg.dtype)))
    x = constrain(x, ACT)
    if sp.encoder == "topk":
      return x, topk_mask(x, int(sp.topk_fraction * cfg.d_model)), None
    lif = functools.partial(
        ops.lif.lif, beta=sp.beta, threshold=sp.threshold, v_min=-sp.v_clamp, v_max=sp.v_clamp,
        reset=sp.reset, surrogate=sp.surrogate, surrogate_alpha=sp.surrogate_alpha,
        detach_reset=True, implementation=implementation_arg(sp.lif_implementation))
    row = (ACT[0], ACT[2])
    spikes, v_last = sharding.per_shard(lif, (x, v0), (ACT, row), (ACT, row),
                                        (x.shape, (x.shape[0], x.shape[2])))
    return x, spikes, v_last

  def to_logits(self, x):
    """Decoding head: x [b, s, d] -> logits [b, s, vocab] float32 (each token on its own)."""
    dt = x.dtype
    dynamic = self.cfg.spiking.head == "dynamic_prior"
    if dynamic:
      hid = jax.nn.gelu(jnp.einsum("bsd,dr->bsr", x, self.prior_w1.value.astype(dt)),
                        approximate=False)
      hid = (hid.astype(jnp.float32) * self.prior_weight.value.astype(jnp.float32)).astype(dt)
    if dynamic and not self.cfg.tie_embeddings:
      # W_out c + w_p W2 h as one GEMM over the joined contraction [c, w_p h] @ [W_out; W2]:
      # two [tokens, vocab] f32 products and their sum were three passes over the largest
      # tensor of the step (symboliclight_194m, H200 compile: ~25 GB a step at 64 x 1024)
      w = jnp.concatenate([self.head.value.astype(dt), self.prior_w2.value.astype(dt)], 0)
      out = logits_einsum("bsd,dv->bsv", jnp.concatenate([x, hid], -1), w)
    elif dynamic:
      out = self.embed.attend(x) + logits_einsum("bsr,rv->bsv", hid,
                                                 self.prior_w2.value.astype(dt))
    elif self.cfg.tie_embeddings:
      out = self.embed.attend(x) + self.prior_bias.value.astype(jnp.float32)
    else:
      out = logits_einsum("bsd,dv->bsv", x, self.head.value.astype(dt))
      out = out + self.prior_bias.value.astype(jnp.float32)
    return constrain(out, ("batch", "seq", "vocab"))

  # ------------------------------------------------------------------ forward
  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None,
               return_aux: bool = False, return_hidden: bool = False):
    """tokens: [batch, seq] int32. positions: [batch, seq] (default arange, or cache lengths +
    arange). cache: None or `init_cache(...)`'s dict (carried encoder membrane, decay states, K/V
    with key spikes, lengths). Returns logits [batch, seq, vocab] float32 and the updated cache
    (None without one), plus the spike statistics dict when return_aux. With return_hidden the
    first output is the last block's output x [batch, seq, d_model]; `to_logits(x)` gives the
    logits.
    """
    cfg = self.cfg
    b, s = tokens.shape
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are for training / full forwards, not with a cache")
    lengths = None if cache is None else cache["lengths"]
    if positions is None:
      start = lengths[:, None] if cache is not None else 0
      positions = start + jnp.arange(s, dtype=jnp.int32)[None, :]
    x, spikes, v_last = self.encode(tokens, None if cache is None else cache.get("v_mem"))
    layer_keys = tuple(k for k in ("k", "v", "spike", "h") if cache is not None and k in cache)
    layer_caches = None if cache is None else {k: cache[k] for k in layer_keys}
    enc_rate = jnp.mean(spikes.astype(jnp.float32))

    def body(block, carry, layer_cache):
      x, sk = carry
      c = None if layer_cache is None else dict(layer_cache, lengths=lengths)
      x, sk, c, stats = block(x, sk, positions, segment_ids, c)
      return (x, sk), (c, stats)

    if cache is not None:   # decoding: the stacked caches are carried and written in place
      (x, _), new_layers, stats = decode_blocks(self.blocks, (x, spikes), layer_caches,
                                                lambda blk, cr, c, _: body(blk, cr, c),
                                                scanned=cfg.scan_layers, unroll=cfg.decode_unroll)
    elif cfg.scan_layers:
      (x, _), (new_layers, stats) = scan_blocks(self.blocks, (x, spikes), layer_caches, body,
                                                cfg.remat)
    else:
      carry, outs, all_stats = (x, spikes), [], []
      run = maybe_remat(body, cfg.remat) if cache is None else body
      for i, blk in enumerate(self.blocks):
        c = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
        carry, (c, st) = run(blk, carry, c)
        outs.append(c)
        all_stats.append(st)
      x = carry[0]
      stats = jax.tree.map(lambda *a: jnp.stack(a), *all_stats)
      new_layers = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    new_cache = None
    if cache is not None:
      new_cache = dict(new_layers, lengths=lengths + s)
      if v_last is not None:
        new_cache["v_mem"] = v_last
    out = x if return_hidden else self.to_logits(x)
    if not return_aux:
      return out, new_cache
    return out, new_cache, spike_aux(enc_rate, stats)


def spike_aux(encoder_rate, stats: dict) -> dict:
  """Spike statistics (all float32; per-layer ones [n_layers]):

  encoder_spike_rate     fraction of (token, channel) encoder spikes that fire;
  activation_sparsity    1 - encoder_spike_rate (the paper's sparsity measure);
  layer_spike_rate       spike rate of each block's input spikes (layer 0: the encoder's);
  layer_ffn_spike_rate   spike rate of each block's FFN hidden units H(W_up c - 1);
  layer_active_fraction  fraction of tokens with any input spike (TCAM updates / visible keys);
  spike_rate / ffn_spike_rate / active_fraction: the same averaged over layers.
  """
  return {
      "encoder_spike_rate": encoder_rate,
      "activation_sparsity": 1.0 - encoder_rate,
      "layer_spike_rate": stats["spike_rate"],
      "layer_ffn_spike_rate": stats["ffn_spike_rate"],
      "layer_active_fraction": stats["active_fraction"],
      "spike_rate": jnp.mean(stats["spike_rate"]),
      "ffn_spike_rate": jnp.mean(stats["ffn_spike_rate"]),
      "active_fraction": jnp.mean(stats["active_fraction"]),
  }


def head_param_keys(cfg: ModelConfig) -> tuple:
  """The params SymbolicLight.to_logits reads."""
  prior = (("prior_w1", "prior_w2", "prior_weight") if cfg.spiking.head == "dynamic_prior"
           else ("prior_bias",))
  return ("embed" if cfg.tie_embeddings else "head",) + prior


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Empty decoding state for `batch` rows of up to `max_len` tokens:

  lengths [batch] int32; v_mem [batch, d_model] f32 (encoder=lif); h [layers, batch,
  heads*head_dim] f32 (mixer has the decay path); k, v [layers, batch, max_len, kv_heads,
  head_dim] and spike [layers, batch, max_len] bool (mixer has the attention path).
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  sp, L = cfg.spiking, cfg.n_layers
  cache = dict(lengths=jnp.zeros((batch,), jnp.int32))
  if sp.encoder == "lif":
    cache["v_mem"] = jnp.zeros((batch, cfg.d_model), jnp.float32)
  if sp.mixer != "attention":
    cache["h"] = jnp.zeros((L, batch, cfg.n_heads * cfg.resolved_head_dim), jnp.float32)
  if sp.mixer != "decay":
    shape = (L, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    cache.update(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                 spike=jnp.zeros((L, batch, max_len), bool))
  return cache


CACHE_AXES = dict(lengths=("batch",), v_mem=("batch", "embed"), h=("layers", "batch", None),
                  k=("layers", "batch", None, "kv_heads", "head_dim"),
                  v=("layers", "batch", None, "kv_heads", "head_dim"),
                  spike=("layers", "batch", None))
