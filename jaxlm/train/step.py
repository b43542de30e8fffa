"""Pure train and eval steps.

The loss is a token-weighted mean over the whole global batch, so gradient
accumulation over micro-batches (lax.scan) gives the same update as one large
batch. A step whose loss or gradient norm is not finite leaves params and
optimizer state untouched and is counted in `nonfinite_skips`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.models.functional import FunctionalModel
from jaxlm.train.optimizer import lr_schedule
from jaxlm.train.state import TrainState


def token_losses(fm: FunctionalModel, params, batch, z_loss: float):
  """Summed loss terms and token count of one (micro-)batch.

  batch: inputs/targets [batch, seq] int32, optional segment_ids [batch, seq] and
  loss_mask [batch, seq] (1 = count the token).
  """
  logits, _ = fm.apply(params, batch["inputs"], segment_ids=batch.get("segment_ids"))
  mask = batch.get("loss_mask")
  mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  lse = jax.nn.logsumexp(logits, axis=-1)
  sums = {"ce": jnp.sum(ce * mask), "z": jnp.sum(jnp.square(lse) * mask)}
  total = sums["ce"] + z_loss * sums["z"] if z_loss else sums["ce"]
  return total, (sums, jnp.sum(mask))


def _split_micro(batch, n: int):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, fm: FunctionalModel, cfg: Config, tx):
  t = cfg.train
  grad_fn = jax.value_and_grad(functools.partial(token_losses, fm, z_loss=t.z_loss), has_aux=True)

  def micro(carry, mb):
    grads, ce, z, count = carry
    (_, (sums, n)), g = grad_fn(state.params, mb)
    return (jax.tree.map(jnp.add, grads, g), ce + sums["ce"], z + sums["z"], count + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if t.grad_accum == 1:
    carry, _ = micro(init, batch)
  else:
    carry, _ = jax.lax.scan(micro, init, _split_micro(batch, t.grad_accum))
  grads, ce, z, count = carry
  count = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  grad_norm = optax.global_norm(grads)
  loss = ce / count
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt, state.opt_state), rng=state.rng)
  metrics = {"loss": loss, "z_loss": z / count, "grad_norm": grad_norm,
             "lr": lr_schedule(t)(state.step), "tokens": count,
             "nonfinite": (~ok).astype(jnp.int32)}
  return new_state, metrics


def eval_step(params, batch, *, fm: FunctionalModel):
  _, (sums, n) = token_losses(fm, params, batch, 0.0)
  return {"ce_sum": sums["ce"], "tokens": n}


def jit_train_step(fm, cfg: Config, tx, mesh, state_shardings):
  batch_sh = sharding.batch_sharding(mesh)
  step = functools.partial(train_step, fm=fm, cfg=cfg, tx=tx)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(fm, mesh, params_shardings):
  return jax.jit(functools.partial(eval_step, fm=fm),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
