"""Mixture-of-experts FFN layer (vanilla MoE, UniPool, MoE++, BlockFFN routing).

    y = sum_{j<k} gate_j * E_{id_j}(x)  +  shared(x)

The layer owns its router (jaxlm/layers/routers.py), optional always-on shared experts and,
through the router, the MoE++ gating residual. The FFN experts it routes into are passed in as
arrays (one pool of jaxlm/layers/expert_pool.ExpertPool), because the model owns the pools:
a vanilla MoE hands layer l pool l, UniPool hands every layer of group g pool g.

Dropless by default (every assignment computed through ops.gmm); with
moe.capacity_factor > 0 each FFN expert keeps at most ceil(cf * T * k / n_experts) of the T*k
assignments of the call, first choices before second choices, earlier tokens first; the rest
are dropped (contribute zero, the token still gets its other experts, shared experts and the
residual). With an "expert" mesh axis of size > 1 the FFN experts run expert-parallel.

Routing probe (eval only): `random_route=(on, key)` replaces, where the bool scalar `on` is true,
the router's chosen experts by experts drawn uniformly at random without replacement from all
E router outputs (independently per token, from `key`). The learned gates are kept (only which
experts run changes, not the output scale) and BlockFFN's empty slots stay empty. Nothing
trains this path; the model threads it from `model(..., route_override=...)`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.layers import expert_pool
from jaxlm.layers.attention import implementation_arg
from jaxlm.layers.mlp import SwiGLU, out_proj_std
from jaxlm.layers.moe_losses import layer_stats
from jaxlm.layers.routers import Router


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
  return int(math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def capacity_drop(ids, n_ffn: int, cap: int):
  """ids [T, k] -> ids with FFN assignments past each expert's capacity set to -1.

  Priority: choice j before j+1, then token order (GShard / Switch). Non-FFN ids are kept.
  """
  t, k = ids.shape
  flat = ids.T.reshape(-1)                                   # choice-major order
  valid = (flat >= 0) & (flat < n_ffn)
  key = jnp.where(valid, flat, n_ffn)
  perm = jnp.argsort(key, stable=True)
  counts = jnp.zeros((n_ffn + 1,), jnp.int32).at[key].add(1)
  starts = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(t * k, dtype=jnp.int32) - starts[key[perm]]
  rank = jnp.zeros((t * k,), jnp.int32).at[perm].set(rank_sorted)
  dropped = valid & (rank >= cap)
  return jnp.where(dropped, -1, flat).reshape(k, t).T


def random_route_ids(key, ids, n_routed: int):
  """ids [T, k] -> ids drawn uniformly without replacement from [0, n_routed) per token;
  slots that were -1 stay -1."""
  t, k = ids.shape
  _, rand = jax.lax.top_k(jax.random.uniform(key, (t, n_routed)), k)
  return jnp.where(ids < 0, -1, rand.astype(ids.dtype))


class MoEFFN(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e = cfg.moe
    self.moe = e
    self.router = Router(cfg, rngs=rngs)
    if e.n_shared_experts:
      self.shared = SwiGLU(cfg.d_model, e.n_shared_experts * cfg.resolved_d_expert,
                           std=cfg.init_std, out_std=out_proj_std(cfg.init_std, cfg.n_layers),
                           rngs=rngs, param_dtype=cfg.param_dtype)

  def __call__(self, x, experts: dict, prev_logits=None, expert_mask=None, random_route=None):
    """x [b, s, d]; experts: one pool's arrays (ExpertPool.arrays()[g]);
    prev_logits [b, s, E] (gating residual) or None; random_route: None or (on, key), the
    eval-only routing probe (module docstring).

    Returns (y [b, s, d], router logits [b, s, E], per-layer stats dict).
    """
    e = self.moe
    b, s, d = x.shape
    x2 = x.reshape(b * s, d)
    prev = None if prev_logits is None else prev_logits.reshape(b * s, -1)
    routing = self.router(x2, prev, expert_mask)
    if random_route is not None:
      on, key = random_route
      routing = routing._replace(ids=jnp.where(
          on, random_route_ids(key, routing.ids, e.n_routed), routing.ids))
    ids = routing.ids
    if e.capacity_factor:
      ids = capacity_drop(ids, e.n_experts, capacity(b * s, e.top_k, e.n_experts,
                                                      e.capacity_factor))
    impl = implementation_arg(e.implementation)
    mesh = sharding.current_mesh()
    if "tap" in experts and expert_pool.expert_axis_size(mesh) > 1:
      raise ValueError("model.moe.pool_grad='deferred' does not run expert-parallel (the "
                       "dispatch would drop the pool's gradient); use pool_grad='per_layer'")
    if expert_pool.expert_axis_size(mesh) > 1:
      y = expert_pool.dispatch_expert_parallel(x2, ids, routing.gates, experts, e.n_experts,
                                               mesh, impl, e.group_align, e.fsdp_dispatch)
    elif sharding.multi_device_mesh() is not None:
      y = expert_pool.dispatch_data_parallel(x2, ids, routing.gates, experts, e.n_experts,
                                             mesh, impl, e.group_align, e.fsdp_dispatch)
    else:
      y = expert_pool.dispatch(x2, ids, routing.gates, experts, e.n_experts, impl,
                               e.group_align)
    if e.n_copy_experts or e.n_constant_experts:
      y = y + expert_pool.extra_experts(x2, ids, routing.gates, experts, e.n_experts,
                                        e.n_zero_experts, e.n_copy_experts, e.n_constant_experts)
    y = y.reshape(b, s, d)
    if e.n_shared_experts:
      y = y + self.shared(x)
    stats = layer_stats(routing, ids, (b, s), e)
    return y, routing.logits.reshape(b, s, -1), stats
