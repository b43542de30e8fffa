"""Token embedding (optionally tied to the output head) and rotary position embedding."""
import jax.numpy as jnp
from flax import nnx

from jaxlm.layers.logits import logits_einsum
from jaxlm.layers.params import param


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, std: float, rngs: nnx.Rngs, param_dtype="float32"):
    self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), std=std, dtype=param_dtype)

  def __call__(self, tokens, dtype):
    """tokens: [batch, seq] int → [batch, seq, dim]."""
    return jnp.take(self.embedding.value, tokens, axis=0).astype(dtype)

  def attend(self, x):
    """Tied output head. x: [batch, seq, dim] → logits [batch, seq, vocab] (float32)."""
    return logits_einsum("bsd,vd->bsv", x, self.embedding.value.astype(x.dtype))


def apply_rope(x, positions, base: float):
  """Rotate pairs (first half, second half) of the head dim.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Computed in float32.
  """
  half = x.shape[-1] // 2
  inv = 1.0 / (base ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
  ang = positions.astype(jnp.float32)[..., None] * inv  # [batch, seq, half]
  sin, cos = jnp.sin(ang)[:, :, None, :], jnp.cos(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
