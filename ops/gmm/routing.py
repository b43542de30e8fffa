"""Token routing helpers around `gmm` for dropless MoE (plain jnp, jit-friendly).

  sort_idx, group_sizes = sort_by_group(expert_ids, num_experts)   # [t*k], [e]
  x_sorted = permute(x, sort_idx, top_k)                            # [t*k, d]
  y_sorted = gmm(x_sorted, w, group_sizes)                          # [t*k, f]
  y = unpermute(y_sorted, sort_idx, weights)                        # [t, f]

Slot s = token * top_k + j of the flattened assignment is the j-th choice of a token.
The sort is stable, so rows within one group keep token order (ties by token index).
Ids outside [0, num_groups) (e.g. dropped assignments) are sorted to the end and not
counted in group_sizes, so their rows fall past sum(group_sizes) and gmm gives zeros.

The sort is a permutation of the t*k slots, so both moves are gathers with a gather as their
gradient (by the inverse permutation): `jnp.take`'s own gradient is a scatter-add, which GPUs run
with atomics (compare-and-swap loops for bf16 rows) in every MoE layer's backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_group(group_ids, num_groups: int):
  """group_ids [tokens, top_k] int -> (sort_idx [tokens*top_k] int32, group_sizes [g] int32)."""
  flat = group_ids.reshape(-1).astype(jnp.int32)
  valid = (flat >= 0) & (flat < num_groups)
  key = jnp.where(valid, flat, num_groups)
  sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
  group_sizes = jnp.zeros((num_groups,), jnp.int32).at[key].add(1, mode="drop")
  return sort_idx, group_sizes


@jax.custom_vjp
def permute_rows(x, perm, inv):
  """x [n, d] -> x[perm] for a permutation `perm` of range(n) with inverse `inv`; the gradient
  is the gather g[inv] (no scatter)."""
  return x.at[perm].get(mode="promise_in_bounds", unique_indices=True)


def _permute_rows_fwd(x, perm, inv):
  return permute_rows(x, perm, inv), inv


def _permute_rows_bwd(inv, g):
  return g.at[inv].get(mode="promise_in_bounds", unique_indices=True), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def permute(x, sort_idx, top_k: int):
  """x [tokens, d] -> [tokens*top_k, d], row i = x[sort_idx[i] // top_k]."""
  tokens, d = x.shape
  slots = jnp.broadcast_to(x[:, None], (tokens, top_k, d)).reshape(tokens * top_k, d)
  return permute_rows(slots, sort_idx, inverse_permutation(sort_idx))


def inverse_permutation(sort_idx):
  n = sort_idx.shape[0]
  return jnp.zeros((n,), jnp.int32).at[sort_idx].set(jnp.arange(n, dtype=jnp.int32),
                                                     unique_indices=True)


def unpermute(y, sort_idx, weights):
  """y [tokens*top_k, d] (sorted rows), weights [tokens, top_k] -> [tokens, d].

  out[t] = sum_j weights[t, j] * y[position of slot t*top_k + j], accumulated in f32 and
  returned in y's dtype. Differentiable in y and weights.
  """
  tokens, top_k = weights.shape
  unsorted = permute_rows(y, inverse_permutation(sort_idx), sort_idx)
  unsorted = unsorted.reshape(tokens, top_k, y.shape[-1])
  out = jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), weights.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out.astype(y.dtype)
