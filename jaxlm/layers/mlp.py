"""SwiGLU feed-forward."""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlm.layers.params import param


class SwiGLU(nnx.Module):
  def __init__(self, d_model: int, d_ff: int, *, std: float, out_std: float, rngs: nnx.Rngs,
               param_dtype="float32"):
    self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
    self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std=std, dtype=param_dtype)
    self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), std=out_std, dtype=param_dtype)

  def __call__(self, x):
    """x: [batch, seq, d_model] → same."""
    dt = x.dtype
    g = jnp.einsum("bsd,df->bsf", x, self.w_gate.value.astype(dt))
    u = jnp.einsum("bsd,df->bsf", x, self.w_up.value.astype(dt))
    # named for remat="dots_and_acts", which keeps it instead of recomputing it from g and u
    h = checkpoint_name(jax.nn.silu(g) * u, "mlp_act")
    return jnp.einsum("bsf,fd->bsd", h, self.w_down.value.astype(dt))


def out_proj_std(std: float, n_layers: int) -> float:
  """GPT-2 style scaled init for projections that write into the residual stream."""
  return std / math.sqrt(2 * n_layers)
