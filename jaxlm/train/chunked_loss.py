"""The output head and its cross entropy a chunk of the sequence at a time (train.loss_chunks).

The head's float32 logits [batch, seq, vocab] are the largest activation of a small-d_model,
large-vocab model. unipool_469m at 32 x 1024 tokens holds 6.6 GB of f32 logits, plus two more
logits-sized buffers for the softmax's gradient: 16.5 GB at its peak, compiled for an H200.

With n > 1 chunks, a scan runs over slices of the sequence. In each slice the forward pass
computes the logits, the cross entropy (and the z-loss), the logits' gradient (softmax −
one-hot, masked), and, through the head's VJP, the gradients of the head's parameters and of
its input. Only one chunk's logits are ever live. The FLOPs are the same as the unchunked
loss: one forward and two gradient matmuls of the head, nothing recomputed. The backward pass
scales the stored gradients by the loss's cotangent (the objective is linear in them).

Chunks run along the sequence, so the batch axis keeps its data / fsdp sharding in every chunk.
The head must treat each position on its own (true of the transformer's and SymbolicLight's
heads). Its parameters are the model's `head_param_keys` (e.g. final_norm and head); the
rest of the params never enter the chunk loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def logit_sums(logits, targets, mask) -> dict:
  """{"ce": Σ mask·CE, "z": Σ mask·logsumexp²} of logits [..., vocab] f32 and targets / mask
  [...] (differentiable in the logits: one pass over them forward, one backward)."""
  lse, target_logit = lse_and_target(logits, targets)
  return {"ce": jnp.sum((lse - target_logit) * mask), "z": jnp.sum(jnp.square(lse) * mask)}


def _online_lse_combine(a, b):
  """Reducer of lse_and_target: (running max, Σ exp(x - max), target logit) pairs merged."""
  (m1, s1, t1), (m2, s2, t2) = a, b
  m = jnp.maximum(m1, m2)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)     # two empty (initial) partials: no exp(nan)
  return m, s1 * jnp.exp(m1 - m_safe) + s2 * jnp.exp(m2 - m_safe), t1 + t2


@jax.custom_vjp
def lse_and_target(logits, targets):
  """(logsumexp, logits[target]) over the last axis of logits [..., vocab] f32, targets [...]
  int, in ONE pass over the logits: a variadic reduction of (max, Σ exp(x - max), target)
  instead of jax.nn.logsumexp's two passes (max, then the sum) and a third for the target.
  The logits are the largest tensor of the step (symboliclight_194m, 64 x 1024: 8 chunks of
  1.6 GB); each pass saved is one read of them. Its gradient is one elementwise pass
  (softmax · d lse + one-hot · d target): autodiff of the unchunked loss made three
  logits-sized passes there (dense_1b at 8 x 4096, H200 compile: 4.3 GB each)."""
  return _lse_and_target(logits, targets)


def _lse_and_target(logits, targets):
  col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  tgt = jnp.where(col == targets[..., None], logits, 0.0)
  m, s, t = jax.lax.reduce(
      (logits, jnp.ones_like(logits), tgt),
      (jnp.asarray(-jnp.inf, logits.dtype), jnp.asarray(0, logits.dtype),
       jnp.asarray(0, logits.dtype)),
      _online_lse_combine, (logits.ndim - 1,))
  return m + jnp.log(s), t


def _lse_and_target_fwd(logits, targets):
  lse, t = _lse_and_target(logits, targets)
  return (lse, t), (logits, targets, lse)


def _lse_and_target_bwd(res, cts):
  logits, targets, lse = res
  d_lse, d_t = cts
  col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  d = jnp.exp(logits - lse[..., None]) * d_lse[..., None]
  return jnp.where(col == targets[..., None], d + d_t[..., None], d), None


lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)


def head_loss(fm, params, x, targets, mask, n_chunks: int = 1, z_coef: float = 0.0):
  """-> (objective, sums): objective = Σ mask·CE + z_coef·Σ mask·lse² of the head's logits
  (differentiable in x and params), sums = {"ce", "z"} (metrics, no gradient through them when
  n_chunks > 1).

  fm: the FunctionalModel; params: its params; x: [batch, seq, d] the last block's output;
  targets: [batch, seq] int; mask: [batch, seq] f32.
  """
  b, s = targets.shape
  if s % n_chunks:
    raise ValueError(f"train.loss_chunks={n_chunks} does not divide the sequence length {s}")
  if n_chunks == 1:
    sums = logit_sums(fm.module(params).to_logits(x), targets, mask)
    return (sums["ce"] + z_coef * sums["z"] if z_coef else sums["ce"]), sums
  keys = fm.head_param_keys
  hp = {k: params[k] for k in keys}
  return _fused(_head_fn(fm, keys), n_chunks, float(z_coef), x, hp, targets, mask)


@functools.lru_cache(maxsize=32)
def _head_fn(fm, keys: tuple):
  """(head params, x) -> logits, for a module whose other params are only shapes (the head
  never reads them)."""
  shapes = fm.param_shapes

  def head(hp, x):
    return fm.module({k: hp[k] if k in hp else shapes[k] for k in shapes}).to_logits(x)
  return head


def _chunks(a, n):
  """[b, s, ...] -> [n, b, s/n, ...]."""
  b, s = a.shape[:2]
  return jnp.moveaxis(a.reshape((b, n, s // n) + a.shape[2:]), 1, 0)


def _unchunk(a):
  """[n, b, c, ...] -> [b, n*c, ...]."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape((a.shape[0], a.shape[1] * a.shape[2]) + a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(head, n_chunks, z_coef, x, hp, targets, mask):
  return _fused_fwd(head, n_chunks, z_coef, x, hp, targets, mask)[0]


def _fused_fwd(head, n_chunks, z_coef, x, hp, targets, mask):
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, _F32), hp)

  def body(carry, chunk):
    ce_sum, z_sum, dhp = carry
    xc, tc, mc = chunk
    logits, vjp = jax.vjp(head, hp, xc)
    lse, target_logit = lse_and_target(logits, tc)
    # d(Σ mask·(lse − logit_t) + c·Σ mask·lse²) / d logits, through lse_and_target's gradient
    dlogits, _ = _lse_and_target_bwd((logits, tc, lse),
                                     ((1.0 + (2.0 * z_coef) * lse) * mc, -mc))
    g_hp, g_x = vjp(dlogits)
    dhp = jax.tree.map(lambda acc, g: acc + g.astype(_F32), dhp, g_hp)
    ce_sum = ce_sum + jnp.sum((lse - target_logit) * mc)
    z_sum = z_sum + jnp.sum(jnp.square(lse) * mc)
    return (ce_sum, z_sum, dhp), g_x

  zero = jnp.zeros((), _F32)
  (ce, z, dhp), dx = jax.lax.scan(
      body, (zero, zero, zeros), (_chunks(x, n_chunks), _chunks(targets, n_chunks),
                                  _chunks(mask.astype(_F32), n_chunks)))
  objective = ce + z_coef * z if z_coef else ce
  like = jax.tree.map(lambda a: jnp.zeros((), a.dtype), hp)
  return (objective, {"ce": ce, "z": z}), (_unchunk(dx), dhp, like)


def _fused_bwd(head, n_chunks, z_coef, res, cts):
  del head, n_chunks, z_coef
  dx, dhp, like = res
  ct = cts[0]          # the sums are metrics: their cotangents are not used
  g_x = (ct * dx.astype(_F32)).astype(dx.dtype)
  g_hp = jax.tree.map(lambda g, l: (ct * g).astype(l.dtype), dhp, like)
  return g_x, g_hp, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
