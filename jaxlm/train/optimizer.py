"""AdamW with linear warmup + cosine decay and global-norm clipping (optax)."""
import jax
import optax

from jaxlm.config import TrainConfig


def lr_schedule(t: TrainConfig) -> optax.Schedule:
  if t.warmup_steps == 0:  # no warmup: the first step already uses the peak lr
    return optax.cosine_decay_schedule(init_value=t.lr, decay_steps=t.steps, alpha=t.min_lr_ratio)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.lr * t.min_lr_ratio)


def _decay_mask(params):
  # Decay matrices only: norm scales and other vectors keep their value.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
  parts = []
  if t.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
