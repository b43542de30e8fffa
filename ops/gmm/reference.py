"""Plain-jnp ground truth for the grouped matmul (the "xla" implementation).

Rows of `lhs` are sorted by group: group g owns rows [starts[g], ends[g]) with
ends = cumsum(group_sizes). Rows at or past sum(group_sizes) belong to no group.
Each group is computed with a row mask, looping over groups with `lax.scan`, so the
cost is num_groups dense products but memory stays O(m * n): exact, not fast.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def group_ids(group_sizes, m: int):
  """Group of each of m rows ([m] int32); rows past sum(group_sizes) get num_groups."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, precision=None,
        transpose_rhs: bool = False):
  """lhs [m, k], rhs [g, k, n] (or [g, n, k] with transpose_rhs) -> [m, n]."""
  out_dtype = preferred_element_type or lhs.dtype
  m = lhs.shape[0]
  num_groups = rhs.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  gid = group_ids(group_sizes, m)
  spec = "mk,nk->mn" if transpose_rhs else "mk,kn->mn"

  def body(acc, xs):
    g, w = xs
    prod = jnp.einsum(spec, lhs, w, precision=precision, preferred_element_type=jnp.float32)
    return acc + jnp.where((gid == g)[:, None], prod, 0.0), None

  acc0 = jnp.zeros((m, n), jnp.float32)
  acc, _ = lax.scan(body, acc0, (jnp.arange(num_groups, dtype=jnp.int32), rhs))
  return acc.astype(out_dtype)


def tgmm(lhs, rhs, group_sizes, *, preferred_element_type=None, precision=None):
  """lhs [m, k], rhs [m, n] -> [g, k, n], out[g] = lhs[rows of g].T @ rhs[rows of g]."""
  out_dtype = preferred_element_type or lhs.dtype
  m = lhs.shape[0]
  num_groups = group_sizes.shape[0]
  gid = group_ids(group_sizes, m)

  def body(_, g):
    masked = jnp.where((gid == g)[:, None], lhs, jnp.zeros((), lhs.dtype))
    out = jnp.einsum("mk,mn->kn", masked, rhs, precision=precision,
                     preferred_element_type=jnp.float32)
    return None, out.astype(out_dtype)

  _, out = lax.scan(body, None, jnp.arange(num_groups, dtype=jnp.int32))
  return out
