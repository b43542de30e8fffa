"""AdamW with linear warmup + cosine decay and global-norm clipping (optax)."""
import jax
import jax.numpy as jnp
import optax

from jaxlm.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
  if t.warmup_steps == 0:  # no warmup: the first step already uses the peak lr
    return optax.cosine_decay_schedule(init_value=t.lr, decay_steps=t.steps, alpha=t.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.lr * t.min_lr_ratio)


def _decay_by_ndim(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def decay_mask(logical_axes):
  """Weight-decay matrices only: a param decays when it has >= 2 dims besides the stacked
  "layers" axis, so norm scales and biases stay undecayed whether layers are scanned or not."""
  return jax.tree.map(lambda axes: sum(a != "layers" for a in axes) >= 2, logical_axes,
                      is_leaf=lambda x: type(x) is tuple)


def make_optimizer(t: TrainConfig, logical_axes=None) -> optax.GradientTransformation:
  """AdamW chain. Pass the model's `logical_axes` for the exact decay mask; without them,
  every param of rank >= 2 decays (stacked norm scales included)."""
  mask = _decay_by_ndim if logical_axes is None else decay_mask(logical_axes)
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=mask,
                           mu_dtype=jnp.dtype(t.mu_dtype)))
  return optax.chain(*parts)
