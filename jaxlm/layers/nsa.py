"""Native Sparse Attention layer (Yuan et al., 2025) over ops.nsa.

    o_t = sum_c g_t^c * Attn(q_t, K_t^c, V_t^c),  c in {cmp, slc, win},  g = sigmoid(W_c x + b_c)

Keys and values: each branch has its own k/v projection (attention.nsa_shared_kv=True: one for
all three). Selected and window keys carry RoPE like the rest of the model. Compressed keys:
the compression branch's raw (un-rotated) keys of block j = tokens [j*d, j*d + l) plus a
learned intra-block position encoding go through an MLP (l*head_dim -> hidden -> head_dim,
SiLU), and the result is rotated at the block's last position (the one from which a query may
see it), so q.k_cmp depends on positions only through the query-to-block distance, as for the
other branches. Values are compressed by their own MLP, without rotation. ops.nsa owns the
attention of the three branches, block selection and the gate combination; this layer owns
the projections, the compression MLP φ and the gates.

Decoding (cache given): every token is written to the raw caches of the branches, the
compression block that ends at or before it is (re)computed into the compressed cache (the
block j = (n - l) // d of a cache holding n tokens; writing an already complete block again
gives the same value, so one entry per `stride` tokens really changes), and ops.nsa.nsa_decode
reads only the compressed cache, the selected blocks and the window. A chunk of several tokens
(the prompt of jaxlm.generate) is processed token by token with lax.scan, so prefill equals
decode exactly, from any cache length. The compressed keys of the cache path are rotated at
cache index positions (the default positions of Transformer.__call__).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import ops.nsa
from jaxlm.config import AttentionConfig, ModelConfig
from jaxlm import sharding
from jaxlm.layers.attention import (KV_AXES, Q_AXES, TOKEN_AXES, implementation_arg,
                                   layer_view, write_cache)
from jaxlm.layers.embed import apply_rope
from jaxlm.layers.mlp import out_proj_std
from jaxlm.layers.params import param
from jaxlm.sharding import constrain

BRANCHES = ("cmp", "slc", "win")
# Decode cache roles -> entry name per projection layout (shared: one k/v projection).
ROLES = ("cmp_k", "cmp_v", "slc_k", "slc_v", "win_k", "win_v")
_OWN = dict(cmp_k="k_cmp", cmp_v="v_cmp", slc_k="k_slc", slc_v="v_slc", win_k="k_win",
            win_v="v_win")
_SHARED = dict(cmp_k="k_raw", cmp_v="v", slc_k="k", slc_v="v", win_k="k", win_v="v")
COMPRESSED = ("kc", "vc")   # compressed cache entries [batch, max_cmp, kv_heads, head_dim]


def sharded_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, segment_ids, **kwargs):
  """ops.nsa.nsa run per device on its batch (and whole GQA groups of heads) of the ambient
  mesh; shapes as ops.nsa.nsa. Heads are split only when the kv heads are: a group's query
  heads share one block selection (summed over the group), so a group never straddles devices.
  """
  mesh = sharding.multi_device_mesh()
  kv_split = mesh is not None and sharding.spec_for(KV_AXES, k_slc.shape, mesh)[2] is not None
  q_axes = Q_AXES if kv_split else Q_AXES[:2] + (None, None)
  kv_axes = KV_AXES if kv_split else KV_AXES[:2] + (None, None)
  fn = lambda *a: ops.nsa.nsa(*a[:8], q_segment_ids=a[8], **kwargs)
  return sharding.per_shard(
      fn, (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, segment_ids),
      (q_axes,) + (kv_axes,) * 6 + (q_axes, TOKEN_AXES), q_axes,
      q.shape[:3] + (v_slc.shape[3],))


def sharded_nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, layer, *,
                       cfg: ops.nsa.NSAConfig):
  """ops.nsa.nsa_decode per device on its batch rows (and whole GQA groups, as sharded_nsa):
  the Triton kernels are custom calls XLA would otherwise run on gathered caches. q [b, h, d],
  gates [b, h, 3], lengths [b]; caches [(layers,) b, n, kv_heads, d] (stacked with layer)."""
  mesh = sharding.multi_device_mesh()
  kv_split = (mesh is not None
              and sharding.spec_for(KV_AXES, k_slc.shape[-4:], mesh)[2] is not None)
  q_axes = ("batch", "heads", None) if kv_split else ("batch", None, None)
  kv_axes = KV_AXES if kv_split else KV_AXES[:2] + (None, None)
  cache_axes = kv_axes if layer is None else ("layers",) + kv_axes
  if layer is not None:            # an operand of the shard_map (replicated)
    layer = jnp.asarray(layer, jnp.int32)
  fn = lambda *a: ops.nsa.nsa_decode(*a[:9], cfg=cfg, layer=a[9])
  return sharding.per_shard(
      fn, (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, lengths, layer),
      (q_axes,) + (cache_axes,) * 6 + (q_axes, ("batch",), None), q_axes,
      q.shape[:2] + (v_slc.shape[-1],))


def nsa_config(a: AttentionConfig) -> ops.nsa.NSAConfig:
  """ops.nsa structure of an attention config (kind=nsa)."""
  return ops.nsa.NSAConfig(block_len=a.nsa_block_len, stride=a.nsa_stride,
                           select_len=a.nsa_select_len, n_select=a.nsa_top_n,
                           window=a.nsa_window, n_always_first=a.nsa_n_always_first,
                           n_local=a.nsa_n_local)


def cache_roles(a: AttentionConfig) -> dict[str, str]:
  """Role (cmp_k = raw compression keys, slc_v = selected values, ...) -> cache entry name."""
  return dict(_SHARED if a.nsa_shared_kv else _OWN)


def raw_cache_names(a: AttentionConfig) -> tuple[str, ...]:
  return tuple(dict.fromkeys(cache_roles(a).values()))


def compress_hidden(cfg: ModelConfig) -> int:
  return cfg.attention.nsa_compress_hidden or 2 * cfg.resolved_head_dim


class Compressor(nnx.Module):
  """φ: one block of l keys [.., l, kv_heads, head_dim] -> one key [.., kv_heads, head_dim].

  (x + pe) flattened over (l, head_dim) -> Linear(hidden) -> SiLU -> Linear(head_dim); the
  weights are shared by the kv heads. Init: fan-in scaled, so a compressed key starts on the
  scale of a key.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    l, hd, hid = cfg.attention.nsa_block_len, cfg.resolved_head_dim, compress_hidden(cfg)
    pd = cfg.param_dtype
    self.pe = param(rngs, (l, hd), ("seq", "head_dim"), std=cfg.init_std, dtype=pd)
    self.w1 = param(rngs, (l, hd, hid), ("seq", "head_dim", "mlp"), std=(l * hd) ** -0.5,
                    dtype=pd)
    self.b1 = param(rngs, (hid,), ("mlp",), init="zeros", dtype=pd)
    self.w2 = param(rngs, (hid, hd), ("mlp", "head_dim"), std=hid ** -0.5, dtype=pd)
    self.b2 = param(rngs, (hd,), ("head_dim",), init="zeros", dtype=pd)

  def __call__(self, blocks):
    """blocks [..., l, kv_heads, head_dim] -> [..., kv_heads, head_dim]."""
    dt = blocks.dtype
    x = blocks + self.pe.value.astype(dt)[:, None, :]
    h = jnp.einsum("...lkd,ldf->...kf", x, self.w1.value.astype(dt)) + self.b1.value.astype(dt)
    return jnp.einsum("...kf,fd->...kd", jax.nn.silu(h), self.w2.value.astype(dt)) + \
        self.b2.value.astype(dt)


class NSAAttention(nnx.Module):
  """Drop-in for jaxlm.layers.attention.Attention when model.attention.kind == "nsa"."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    pd, std = cfg.param_dtype, cfg.init_std
    a = cfg.attention
    self.cfg = cfg
    self.wq = param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std=std, dtype=pd)
    names = ("shared",) if a.nsa_shared_kv else BRANCHES
    for n in names:
      setattr(self, f"wk_{n}", param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"),
                                     std=std, dtype=pd))
      setattr(self, f"wv_{n}", param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"),
                                     std=std, dtype=pd))
    self.compress_k = Compressor(cfg, rngs=rngs)
    self.compress_v = Compressor(cfg, rngs=rngs)
    for n in BRANCHES:
      setattr(self, f"w_gate_{n}", param(rngs, (d, h), ("embed", "heads"), std=std, dtype=pd))
      setattr(self, f"b_gate_{n}", param(rngs, (h,), ("heads",), init="zeros", dtype=pd))
    self.wo = param(rngs, (h, hd, d), ("heads", "head_dim", "embed"),
                    std=out_proj_std(std, cfg.n_layers), dtype=pd)

  # ------------------------------------------------------------------ pieces
  def _kv(self, x, branch):
    n = "shared" if self.cfg.attention.nsa_shared_kv else branch
    dt = x.dtype
    k = jnp.einsum("bsd,dhk->bshk", x, getattr(self, f"wk_{n}").value.astype(dt))
    v = jnp.einsum("bsd,dhk->bshk", x, getattr(self, f"wv_{n}").value.astype(dt))
    return k, v

  def _gates(self, x):
    """sigmoid gates [batch, seq, heads, 3] (cmp, slc, win)."""
    dt = x.dtype
    logits = [jnp.einsum("bsd,dh->bsh", x, getattr(self, f"w_gate_{n}").value.astype(dt))
              + getattr(self, f"b_gate_{n}").value.astype(dt) for n in BRANCHES]
    return jax.nn.sigmoid(jnp.stack(logits, -1).astype(jnp.float32))

  def _project(self, x, positions):
    """Per-token projections: q (rotated), raw compression k/v, rotated slc/win keys, gates."""
    cfg = self.cfg
    dt = x.dtype
    q = jnp.einsum("bsd,dhk->bshk", x, self.wq.value.astype(dt))
    q = constrain(apply_rope(q, positions, cfg.rope_base), ("batch", "seq", "heads", "head_dim"))
    out = dict(q=q, gates=self._gates(x))
    if cfg.attention.nsa_shared_kv:
      k, v = self._kv(x, "shared")
      kr = apply_rope(k, positions, cfg.rope_base)
      out.update(cmp_k=k, cmp_v=v, slc_k=kr, slc_v=v, win_k=kr, win_v=v)
    else:
      out["cmp_k"], out["cmp_v"] = self._kv(x, "cmp")
      for n in ("slc", "win"):
        k, v = self._kv(x, n)
        out[f"{n}_k"], out[f"{n}_v"] = apply_rope(k, positions, cfg.rope_base), v
    for r in ROLES:
      if r != "cmp_k" and r.endswith("_k"):
        out[r] = constrain(out[r], ("batch", "seq", "kv_heads", "head_dim"))
    return out

  def compress(self, k_blocks, v_blocks, end_positions):
    """Compressed key/value of blocks [..., l, kvh, hd]; keys rotated at end_positions [...]."""
    kc = self.compress_k(k_blocks)
    vc = self.compress_v(v_blocks)
    lead = kc.shape[:-2]
    pos = jnp.broadcast_to(end_positions, lead).reshape(-1, 1)
    kc = apply_rope(kc.reshape((-1, 1) + kc.shape[-2:]), pos, self.cfg.rope_base).reshape(
        kc.shape)
    return kc, vc

  def _out(self, o, dt):
    return jnp.einsum("bshk,hkd->bsd", o.astype(dt), self.wo.value.astype(dt))

  # ------------------------------------------------------------------ call
  def __call__(self, x, positions, segment_ids=None, cache=None):
    y, cache, _ = self.call_with_stats(x, positions, segment_ids, cache)
    return y, cache

  def call_with_stats(self, x, positions, segment_ids=None, cache=None):
    """Like Attention.__call__, plus stats {"gate_mean": [3] f32 mean gate per branch}.

    cache: None, or the layer's decode cache: the raw entries of raw_cache_names(cfg) [batch,
    max_len, kv_heads, head_dim], the compressed kc, vc [batch, max_cmp, kv_heads, head_dim]
    and lengths [batch] int32 (tokens already cached); or all layers' caches stacked [layers,
    ...] with layer = this layer's index (written in place at that layer).
    """
    cfg, dt = self.cfg, x.dtype
    ncfg = nsa_config(cfg.attention)
    p = self._project(x, positions)
    stats = {"gate_mean": jnp.mean(p["gates"], axis=(0, 1, 2))}
    if cache is None:
      l, d = ncfg.block_len, ncfg.stride
      n_cmp = ncfg.n_cmp(x.shape[1])
      kb = ops.nsa.unfold_blocks(p["cmp_k"], l, d)
      vb = ops.nsa.unfold_blocks(p["cmp_v"], l, d)
      ends = jnp.arange(n_cmp, dtype=jnp.int32) * d + l - 1
      kc, vc = self.compress(kb, vb, jnp.take(positions, ends, axis=1))
      o = sharded_nsa(p["q"], kc.astype(dt), vc.astype(dt), p["slc_k"], p["slc_v"],
                      p["win_k"], p["win_v"], p["gates"], segment_ids, cfg=ncfg,
                      implementation=implementation_arg(cfg.attention.implementation))
      return self._out(o, dt), None, stats
    o, new_cache = self._decode(p, cache, ncfg)
    return self._out(o, dt), new_cache, stats

  def _decode(self, p, cache, ncfg):
    """Token by token (lax.scan over the chunk) through ops.nsa.nsa_decode."""
    roles = cache_roles(self.cfg.attention)
    names = raw_cache_names(self.cfg.attention)
    l, d = ncfg.block_len, ncfg.stride
    lengths, layer = cache["lengths"], cache.get("layer")
    max_len = cache[names[0]].shape[-3]       # [(layers,) batch, max_len, kv_heads, head_dim]
    view = lambda a: layer_view(a, layer)
    # per-token inputs, scanned over the chunk axis
    per_tok = {"q": p["q"], "gates": p["gates"]}
    for r, name in roles.items():
      per_tok.setdefault(name, p[r])
    xs = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), per_tok)
    state = {k: cache[k] for k in names + COMPRESSED}

    def step(carry, inp):
      st, n = carry
      st = dict(st)
      for name in names:
        st[name] = write_cache(st[name], inp[name][:, None], n, layer)
      new_len = n + 1
      if max_len >= l:  # else no block ever completes inside the cache
        j = jnp.maximum(new_len - l, 0) // d                    # block ending at or before now
        complete = new_len >= l
        take = lambda c: jax.vmap(
            lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, l, axis=0))(view(c), j * d)
        kc, vc = self.compress(take(st[roles["cmp_k"]]), take(st[roles["cmp_v"]]),
                               j * d + l - 1)
        for name, new in (("kc", kc), ("vc", vc)):
          # rows whose block is not complete write back what the slot holds: one entry moves
          old = jax.vmap(lambda a, s: jax.lax.dynamic_index_in_dim(a, s, 0, keepdims=False))(
              view(st[name]), j)
          new = jnp.where(complete[:, None, None], new.astype(old.dtype), old)
          st[name] = write_cache(st[name], new[:, None], j, layer)
      # the stacked caches and the layer: the kernels read the layer in place
      o = sharded_nsa_decode(inp["q"], st["kc"], st["vc"], st[roles["slc_k"]],
                             st[roles["slc_v"]], st[roles["win_k"]], st[roles["win_v"]],
                             inp["gates"], new_len, layer, cfg=ncfg)
      return (st, new_len), o

    (state, end), o = jax.lax.scan(step, (state, lengths), xs)
    return jnp.moveaxis(o, 0, 1), dict(state, lengths=end)


def init_layer_caches(cfg: ModelConfig, batch: int, max_len: int, dtype) -> dict:
  """Stacked decode caches of the NSA layers (without lengths)."""
  a = cfg.attention
  ncfg = nsa_config(a)
  kvh, hd, L = cfg.n_kv_heads, cfg.resolved_head_dim, cfg.n_layers
  raw = (L, batch, max_len, kvh, hd)
  cmp = (L, batch, max(1, ncfg.n_cmp(max_len)), kvh, hd)
  caches = {name: jnp.zeros(raw, dtype) for name in raw_cache_names(a)}
  caches.update({name: jnp.zeros(cmp, dtype) for name in COMPRESSED})
  return caches


CACHE_AXES = {name: ("layers", "batch", None, "kv_heads", "head_dim")
              for name in tuple(_OWN.values()) + tuple(_SHARED.values()) + COMPRESSED}


def gate_aux(gate_means) -> dict:
  """Aux metrics from stacked per-layer mean gates [n_layers, 3]: gate_<branch> (mean over
  layers) and layer_gate_<branch> [n_layers]."""
  aux = {}
  for i, n in enumerate(BRANCHES):
    aux[f"gate_{n}"] = jnp.mean(gate_means[:, i])
    aux[f"layer_gate_{n}"] = gate_means[:, i]
  return aux
