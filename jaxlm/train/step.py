"""Pure train and eval steps.

The loss is a token-weighted mean over the whole global batch, so gradient
accumulation over micro-batches (lax.scan) gives the same update as one large
batch. A step whose loss or gradient norm is not finite leaves params and
optimizer state untouched and is counted in `nonfinite_skips`.

MoE models: the model's aux dict (jaxlm/layers/moe_losses.model_aux) is requested with
`return_aux=True`; its weighted `aux_loss` is added to the objective (weighted by the
micro-batch's token count, so accumulation matches one large batch) and every aux value is
reported as `moe/<name>` in the metrics (token-weighted mean over micro-batches). `loss`
stays the cross-entropy. Dense models produce exactly the metrics they always did.
SymbolicLight models (model.kind=symboliclight) report their spike statistics the same way, as
`spiking/<name>` (no aux loss; see jaxlm/models/symboliclight.spike_aux).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.models.functional import FunctionalModel
from jaxlm.train.chunked_loss import head_loss
from jaxlm.train.optimizer import lr_schedule
from jaxlm.train.state import TrainState


def aux_prefix(model_cfg) -> str | None:
  """Metric prefix of the model's aux dict (requested with return_aux=True), None if it has none."""
  if model_cfg.kind == "symboliclight":
    return "spiking/"
  if model_cfg.moe.kind != "none":
    return "moe/"
  if model_cfg.attention.kind == "nsa":  # per-branch mean gates (jaxlm/layers/nsa.gate_aux)
    return "nsa/"
  return None


def token_losses(fm: FunctionalModel, params, batch, z_loss: float, loss_chunks: int = 1):
  """Summed loss terms and token count of one (micro-)batch.

  batch: inputs/targets [batch, seq] int32, optional segment_ids [batch, seq] and
  loss_mask [batch, seq] (1 = count the token). loss_chunks > 1: the output head and the
  cross entropy run over that many chunks of the sequence (jaxlm/train/chunked_loss.py).
  """
  prefix = aux_prefix(fm.cfg)
  model = fm.module(params)
  out = model(batch["inputs"], segment_ids=batch.get("segment_ids"), return_hidden=True,
              **({"return_aux": True} if prefix else {}))
  mask = batch.get("loss_mask")
  mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  total, sums = head_loss(fm, params, out[0], batch["targets"], mask, loss_chunks, z_loss)
  if prefix:
    n = jnp.sum(mask)
    aux = out[2]
    if "aux_loss" in aux:
      total = total + aux["aux_loss"] * n
    sums.update({f"{prefix}{k}": v * n for k, v in aux.items()})
  return total, (sums, jnp.sum(mask))


def _split_micro(batch, n: int):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def train_step(state: TrainState, batch, *, fm: FunctionalModel, cfg: Config, tx):
  t = cfg.train
  grad_fn = jax.value_and_grad(
      functools.partial(token_losses, fm, z_loss=t.z_loss, loss_chunks=t.loss_chunks),
      has_aux=True)

  def micro(carry, mb):
    grads, sums_acc, count = carry
    (_, (sums, n)), g = grad_fn(state.params, mb)
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums_acc, sums),
            count + n), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  sums_shape = {"ce": scalar, "z": scalar}
  prefix = aux_prefix(fm.cfg)
  if prefix:  # aux shapes (per-layer loads, spike rates…) from an abstract forward
    micro_batch = batch if t.grad_accum == 1 else jax.tree.map(lambda x: x[0], _split_micro(
        batch, t.grad_accum))
    sums_shape = jax.eval_shape(
        lambda p, mb: token_losses(fm, p, mb, t.z_loss, t.loss_chunks)[1][0],
        state.params, micro_batch)
  init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
          jnp.zeros((), jnp.float32))
  if t.grad_accum == 1:
    carry, _ = micro(init, batch)
  else:
    carry, _ = jax.lax.scan(micro, init, _split_micro(batch, t.grad_accum))
  grads, sums, count = carry
  ce, z = sums["ce"], sums["z"]
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
  metrics.update({k: v / count for k, v in sums.items() if prefix and k.startswith(prefix)})
  return new_state, metrics


def eval_step(params, batch, *, fm: FunctionalModel, loss_chunks: int = 1):
  _, (sums, n) = token_losses(fm, params, batch, 0.0, loss_chunks)
  return {"ce_sum": sums["ce"], "tokens": n}


def jit_train_step(fm, cfg: Config, tx, mesh, state_shardings):
  batch_sh = sharding.batch_sharding(mesh)
  step = functools.partial(train_step, fm=fm, cfg=cfg, tx=tx)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def jit_eval_step(fm, mesh, params_shardings, loss_chunks: int = 1):
  return jax.jit(functools.partial(eval_step, fm=fm, loss_chunks=loss_chunks),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
