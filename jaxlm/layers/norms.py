"""RMSNorm."""
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlm.layers.params import param


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype="float32"):
    self.eps = eps
    self.scale = param(rngs, (dim,), ("embed",), init="ones", dtype=param_dtype)

  def __call__(self, x):
    """x: [..., dim] → same shape and dtype; statistics in float32."""
    xf = x.astype(jnp.float32)
    y = xf * jnp.reciprocal(jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps))
    # named for remat="dots_and_acts" (the projections after a norm need its output again for
    # their weight gradients)
    out = (y * self.scale.value.astype(jnp.float32)).astype(x.dtype)
    return checkpoint_name(out, "norm_out")
