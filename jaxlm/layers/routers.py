"""MoE routers: one router per MoE layer, chosen by `model.moe.router`.

Every router maps tokens x [T, d] to a `Routing`:
  logits [T, E]   pre-activation router outputs z = W x (+ G z_prev with the MoE++ gating
                  residual); what the next layer's gating residual and the z-loss read;
  scores [T, E]   the router's per-expert scores (softmax probabilities, NormRouter s_i,
                  BlockFFN RMSNorm(ReLU(z))); balance losses use their per-expert mean P_i;
  ids [T, k]      chosen experts (-1 = no expert: BlockFFN tokens using fewer than k);
  gates [T, k]    combine weights of the chosen experts.

Routers (E = FFN experts + MoE++ zero/copy/constant experts, k = moe.top_k):
  softmax_topk  p = softmax(z); top-k of p; gates = p (renormalised over the k if
                moe.renormalize).
  norm_router   UniPool: s_i = sigma * c * ReLU(z_i / (||z||_2 + eps)), sigma learnable (init 1),
                eps = 1e-8, c = E[1 / ||top-k of ReLU(u / ||u||)||_2], u ~ N(0, I_E), a constant
                computed once (norm_router_constant). gates = s (not renormalised). Experts masked
                out by `expert_mask` have z_i = 0 before the norm.
  relu_rmsnorm  BlockFFN: s = RMSNorm(ReLU(z)) over experts (learnable scale, init 1). The experts
                with s_i > 0 are active; top-k bounds how many are computed (k = E computes every
                active one); the remaining slots get id -1 and gate 0.
Ties in top-k go to the lower expert index (lax.top_k is stable), so routing is deterministic.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import ModelConfig
from jaxlm.layers.params import param

NORM_EPS = 1e-8
NORM_ROUTER_SEED = 20250517


class Routing(NamedTuple):
  logits: jax.Array   # [T, E] float32
  scores: jax.Array   # [T, E] float32
  ids: jax.Array      # [T, k] int32, -1 = none
  gates: jax.Array    # [T, k] float32


@functools.lru_cache(maxsize=64)
def norm_router_constant(n_experts: int, top_k: int, samples: int = 65536,
                         seed: int = NORM_ROUTER_SEED) -> float:
  """c = E[1 / ||top-k of ReLU(u/||u||)||_2] for u ~ N(0, I_n), by Monte Carlo (float64, numpy).

  1/||top-k ReLU(u/||u||)|| = ||u|| / ||top-k ReLU(u)||. When every u_i <= 0 (probability 2^-n)
  the ratio is infinite and the router output is zero whatever c is, so those samples are left
  out: c is the expectation conditioned on at least one positive coordinate. Deterministic for a
  given (n_experts, top_k, samples, seed) and cached per process.
  """
  if top_k > n_experts:
    raise ValueError(f"top_k={top_k} > n_experts={n_experts}")
  rng = np.random.default_rng(seed)
  total, count, chunk = 0.0, 0, max(1, min(samples, (1 << 22) // max(n_experts, 1)))
  done = 0
  while done < samples:
    n = min(chunk, samples - done)
    u = rng.standard_normal((n, n_experts))
    r = np.maximum(u, 0.0)
    top = -np.partition(-r, top_k - 1, axis=1)[:, :top_k] if top_k < n_experts else r
    num = np.sqrt(np.sum(u * u, axis=1))
    den = np.sqrt(np.sum(top * top, axis=1))
    ok = den > 0
    total += float(np.sum(num[ok] / den[ok]))
    count += int(np.sum(ok))
    done += n
  return total / max(count, 1)


def _rms_norm(x, scale, eps):
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * scale


class Router(nnx.Module):
  """Per-layer router into `n_routed` experts (see module docstring)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e = cfg.moe
    self.kind = e.router
    self.n_routed = e.n_routed
    self.top_k = e.top_k
    self.renormalize = e.renormalize
    self.norm_eps = cfg.norm_eps
    pd = cfg.param_dtype
    self.w = param(rngs, (cfg.d_model, e.n_routed), ("embed", None), std=cfg.init_std, dtype=pd)
    if e.gating_residual:
      self.g = param(rngs, (e.n_routed, e.n_routed), (None, None), init="zeros", dtype=pd)
    if e.router == "norm_router":
      self.sigma = param(rngs, (), (), init="ones", dtype=pd)
      self.c = norm_router_constant(e.n_routed, e.top_k, e.norm_router_samples)
    elif e.router == "relu_rmsnorm":
      self.scale = param(rngs, (e.n_routed,), (None,), init="ones", dtype=pd)

  def __call__(self, x, prev_logits=None, expert_mask=None) -> Routing:
    """x [T, d]; prev_logits [T, E] (gating residual) or None; expert_mask [E] bool or None."""
    z = jnp.einsum("td,de->te", x.astype(jnp.float32), self.w.value.astype(jnp.float32))
    if hasattr(self, "g") and prev_logits is not None:
      z = z + jnp.einsum("te,ef->tf", prev_logits.astype(jnp.float32),
                         self.g.value.astype(jnp.float32))
    return route(self.kind, z, self.top_k, renormalize=self.renormalize,
                 sigma=self.sigma.value if self.kind == "norm_router" else None,
                 c=getattr(self, "c", None),
                 scale=self.scale.value if self.kind == "relu_rmsnorm" else None,
                 norm_eps=self.norm_eps, expert_mask=expert_mask)


def route(kind: str, z, top_k: int, *, renormalize=True, sigma=None, c=None, scale=None,
          norm_eps=1e-6, expert_mask=None) -> Routing:
  """Scores, top-k ids and gates from router logits z [T, E] (pure function of z)."""
  z = z.astype(jnp.float32)
  if kind == "softmax_topk":
    zm = z if expert_mask is None else jnp.where(expert_mask, z, -jnp.inf)
    scores = jax.nn.softmax(zm, axis=-1)
    gates, ids = jax.lax.top_k(scores, top_k)
    if renormalize:
      gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-20)
  elif kind == "norm_router":
    zm = z if expert_mask is None else jnp.where(expert_mask, z, 0.0)
    norm = jnp.sqrt(jnp.sum(zm * zm, axis=-1, keepdims=True))
    scores = sigma.astype(jnp.float32) * c * jax.nn.relu(zm / (norm + NORM_EPS))
    if expert_mask is not None:
      scores = jnp.where(expert_mask, scores, 0.0)
    gates, ids = jax.lax.top_k(scores, top_k)
  elif kind == "relu_rmsnorm":
    r = jax.nn.relu(z)
    if expert_mask is not None:
      r = jnp.where(expert_mask, r, 0.0)
    scores = _rms_norm(r, scale.astype(jnp.float32), norm_eps)
    active = r > 0
    _, ids = jax.lax.top_k(jnp.where(active, scores, -jnp.inf), top_k)
    chosen = jnp.take_along_axis(active, ids, axis=-1)
    gates = jnp.where(chosen, jnp.take_along_axis(scores, ids, axis=-1), 0.0)
    ids = jnp.where(chosen, ids, -1)
  else:
    raise ValueError(f"unknown router {kind!r}")
  return Routing(z, scores, ids.astype(jnp.int32), gates)
