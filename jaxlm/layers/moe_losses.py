"""Per-layer routing statistics and the MoE auxiliary losses.

Per layer (`layer_stats`), over the T tokens of the call and E router outputs:
  load[i]     f_i: fraction of the T*k routed assignments that chose expert i (before
              capacity dropping; BlockFFN's empty slots count for nobody);
  prob[i]     P_i: mean router score of expert i (softmax probability, NormRouter s_i,
              BlockFFN RMSNorm(ReLU(z))_i);
  balance     Switch: E * sum_i f_i P_i (f is a count, so only P carries gradient);
  z           mean_t logsumexp(z_t)^2 of the router logits;
  entropy     mean_t entropy of the scores normalised to sum 1;
  dropped     fraction of FFN-expert assignments dropped by the capacity limit;
  l1          BlockFFN token sparsity: mean_t sum_e s_{t,e};
  locality    BlockFFN: mean BCE(1[s_{t-1,e} > 0], sigmoid(alpha * s_{t,e})) over t >= 1 of each
              sequence (the previous token's activation pattern is the target);
  chunk       BlockFFN: 1 - mean_{chunk,e} prod_{t in chunk} (1 - p_{t,e}), p = s / sum_e s,
              chunks of chunk_size consecutive tokens (the last one padded with p = 0).
  token_active  fraction of the n_experts FFN experts a token runs (mean over tokens; ids
              before capacity dropping; MoE++ zero/copy/constant experts do not count);
  chunk_active  fraction of the FFN experts run by any token of a chunk of chunk_size
              consecutive tokens of a sequence (mean over chunks; the last chunk may be short).
              1 - these are BlockFFN's token- and chunk-level sparsity.

Model level (`model_aux`), with the layers' stats stacked [L, ...]:
  balance_loss       mean over layers of the Switch loss;
  pool_balance_loss  UniPool: for each pool g, fbar/Pbar = load/prob averaged over the layers
                     sharing g, loss_g = M * sum_i stop_gradient(fbar_i) * Pbar_i; mean over pools.
                     UniPool's public code takes fbar from the previous micro-batch; here fbar is
                     the current batch's usage with stop_gradient (a count has no gradient anyway),
                     so exactly as there only the routers get gradient, but from this batch.
  router_z_loss, l1_loss, locality_loss, chunk_sparsity_loss: means over layers;
  layer_token_active / layer_chunk_active [L] and their means token_active / chunk_active;
  aux_loss = sum of each value times its moe.<name> coefficient (what the train step adds).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.config import MoEConfig

LOSS_NAMES = ("balance_loss", "pool_balance_loss", "router_z_loss", "l1_loss", "locality_loss",
              "chunk_sparsity_loss")


def expert_load(ids, n_routed: int):
  """ids [T, k] (-1 = none) -> fraction of the T*k slots per expert [E]."""
  t, k = ids.shape
  # -1 would wrap around to the last expert (jax normalises negative indices): send it past
  # the end, where mode="drop" discards it
  slots = jnp.where(ids < 0, n_routed, ids).reshape(-1)
  counts = jnp.zeros((n_routed,), jnp.float32).at[slots].add(1.0, mode="drop")
  return counts / (t * k)


def entropy(scores):
  p = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)
  return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(p, p), axis=-1))


def locality_loss(scores_bse, alpha: float):
  """scores [b, s, E] -> BlockFFN locality BCE (0 when s == 1)."""
  if scores_bse.shape[1] < 2:
    return jnp.zeros((), jnp.float32)
  target = jax.lax.stop_gradient((scores_bse[:, :-1] > 0).astype(jnp.float32))
  a = alpha * scores_bse[:, 1:]
  bce = -(target * jax.nn.log_sigmoid(a) + (1.0 - target) * jax.nn.log_sigmoid(-a))
  return jnp.mean(bce)


def chunk_sparsity_loss(scores_bse, chunk: int):
  """scores [b, s, E] -> 1 - mean_{chunk,e} prod_{t in chunk} (1 - p_{t,e})."""
  b, s, e = scores_bse.shape
  # tokens without any active expert get p = 0; the safe denominator keeps their gradient
  # finite (s / max(sum, 1e-20) gives 0 * inf = NaN in the backward pass)
  total = jnp.sum(scores_bse, axis=-1, keepdims=True)
  p = jnp.where(total > 0, scores_bse / jnp.where(total > 0, total, 1.0), 0.0)
  pad = (-s) % chunk
  p = jnp.pad(p, ((0, 0), (0, pad), (0, 0)))
  keep = jnp.prod(1.0 - p.reshape(b, (s + pad) // chunk, chunk, e), axis=2)
  return 1.0 - jnp.mean(keep)


def active_fractions(ids_bsk, n_experts: int, chunk: int):
  """ids [b, s, k] (-1 = none) -> (token-level, chunk-level) fraction of FFN experts used."""
  b, s, k = ids_bsk.shape
  ids = ids_bsk.reshape(b * s, k)
  slot = jnp.where((ids >= 0) & (ids < n_experts), ids, n_experts)    # others -> spare column
  rows = jnp.arange(b * s, dtype=jnp.int32)[:, None]
  used = jnp.zeros((b * s, n_experts + 1), bool).at[rows, slot].set(True)
  used = used[:, :n_experts].reshape(b, s, n_experts)
  token = jnp.mean(used.astype(jnp.float32))
  n_chunks = -(-s // chunk)
  pad = n_chunks * chunk - s
  padded = jnp.pad(used, ((0, 0), (0, pad), (0, 0)))
  per_chunk = jnp.any(padded.reshape(b, n_chunks, chunk, n_experts), axis=2)
  return token, jnp.mean(per_chunk.astype(jnp.float32))


def layer_stats(routing, kept_ids, batch_shape, moe: MoEConfig) -> dict:
  """Stats of one layer's routing (see module docstring). kept_ids: ids after capacity."""
  ids, scores, logits = routing.ids, routing.scores, routing.logits
  n_routed = scores.shape[-1]
  load = expert_load(ids, n_routed)
  prob = jnp.mean(scores, axis=0)
  is_ffn = (ids >= 0) & (ids < moe.n_experts)
  n_ffn = jnp.sum(is_ffn)
  n_kept = jnp.sum((kept_ids >= 0) & (kept_ids < moe.n_experts))
  stats = {
      "load": load,
      "prob": prob,
      "balance": n_routed * jnp.sum(jax.lax.stop_gradient(load) * prob),
      "z": jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
      "entropy": entropy(scores),
      "dropped": (n_ffn - n_kept).astype(jnp.float32) / jnp.maximum(n_ffn, 1).astype(jnp.float32),
  }
  stats["token_active"], stats["chunk_active"] = active_fractions(
      jax.lax.stop_gradient(ids).reshape(tuple(batch_shape) + (ids.shape[-1],)),
      moe.n_experts, moe.chunk_size)
  if moe.l1_loss:
    stats["l1"] = jnp.mean(jnp.sum(scores, axis=-1))
  sbse = scores.reshape(tuple(batch_shape) + (n_routed,))
  if moe.locality_loss:
    stats["locality"] = locality_loss(sbse, moe.locality_alpha)
  if moe.chunk_sparsity_loss:
    stats["chunk"] = chunk_sparsity_loss(sbse, moe.chunk_size)
  return stats


def pool_balance(load, prob, n_pools: int):
  """load/prob [L, E] -> (pool-level balance loss (mean over pools), fbar [G, E], Pbar [G, E])."""
  n_layers, e = load.shape
  fbar = jnp.mean(load.reshape(n_pools, n_layers // n_pools, e), axis=1)
  pbar = jnp.mean(prob.reshape(n_pools, n_layers // n_pools, e), axis=1)
  per_pool = e * jnp.sum(jax.lax.stop_gradient(fbar) * pbar, axis=-1)
  return jnp.mean(per_pool), fbar, pbar


def model_aux(stats: dict, moe: MoEConfig, n_pools: int) -> dict:
  """Stacked per-layer stats [L, ...] -> the model's aux dict (losses, loads, metrics)."""
  pool_loss, fbar, pbar = pool_balance(stats["load"], stats["prob"], n_pools)
  zero = jnp.zeros((), jnp.float32)
  aux = {
      "balance_loss": jnp.mean(stats["balance"]),
      "pool_balance_loss": pool_loss,
      "router_z_loss": jnp.mean(stats["z"]),
      "l1_loss": jnp.mean(stats["l1"]) if "l1" in stats else zero,
      "locality_loss": jnp.mean(stats["locality"]) if "locality" in stats else zero,
      "chunk_sparsity_loss": jnp.mean(stats["chunk"]) if "chunk" in stats else zero,
      "layer_load": stats["load"],
      "layer_router_entropy": stats["entropy"],
      "layer_dropped_fraction": stats["dropped"],
      "pool_load": fbar,
      "pool_prob": pbar,
      "layer_token_active": stats["token_active"],
      "layer_chunk_active": stats["chunk_active"],
      "token_active": jnp.mean(stats["token_active"]),
      "chunk_active": jnp.mean(stats["chunk_active"]),
      "router_entropy": jnp.mean(stats["entropy"]),
      "dropped_fraction": jnp.mean(stats["dropped"]),
      # max over experts of load / uniform load, averaged over pools (1 = balanced)
      "pool_load_max_ratio": jnp.mean(jnp.max(fbar, axis=-1) * fbar.shape[-1]),
  }
  aux["aux_loss"] = sum(getattr(moe, name) * aux[name] for name in LOSS_NAMES)
  return aux
