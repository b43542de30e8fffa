"""KV-cache decoding with greedy / temperature / top-k / top-p sampling."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxlm.models.functional import FunctionalModel


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0   # 0 = greedy
  top_k: int = 0             # 0 = off
  top_p: float = 1.0         # 1 = off

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(key, logits, s: Sampling):
  """logits: [batch, vocab] float32 → token ids [batch] int32."""
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    keep = jnp.cumsum(probs, axis=-1) - probs < s.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("fm", "max_new_tokens", "sampling"))
def generate(fm: FunctionalModel, params, prompt, key, *, max_new_tokens: int,
             sampling: Sampling = Sampling()):
  """prompt: [batch, prompt_len] int32 → [batch, max_new_tokens] int32 new tokens.

  Prefills the cache with the prompt in one call, then decodes one token per step
  with lax.scan (no recomputation of the prefix). The cache is the model kind's own
  (`fm.init_cache`): K/V for the transformer; K/V, key spikes, decay states and the encoder
  membrane for SymbolicLight.
  """
  b, n = prompt.shape
  fm, params = fm.for_decode(params)
  cache = fm.init_cache(b, n + max_new_tokens)
  logits, cache = fm.apply(params, prompt, cache=cache)
  key, sub = jax.random.split(key)
  first = sample_logits(sub, logits[:, -1], sampling)

  def step(carry, _):
    tok, cache, key = carry
    logits, cache = fm.apply(params, tok[:, None], cache=cache)
    key, sub = jax.random.split(key)
    nxt = sample_logits(sub, logits[:, -1], sampling)
    return (nxt, cache, key), tok

  (_, _, _), toks = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens)
  return toks.T
