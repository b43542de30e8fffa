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

Aligned groups (for pools of many small groups): gmm's row tiles that straddle two groups are
computed once per group, so groups of a few hundred rows at random offsets cost up to a third
more tile work (192 groups of ~341 rows in 128-row tiles: ~703 tile visits for 512 tiles of
rows). `aligned_layout` maps the sorted rows onto a zero-padded array in which every group
starts at a multiple of `align`, with group sizes rounded up (~576 visits there):

  src, dest, sizes_al = aligned_layout(group_sizes, t*k, 128)
  y_sorted = unpad_rows(gmm(pad_rows(x_sorted, src, dest), w, sizes_al), src, dest)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


_RANK_BLOCK = 256     # slots per block of the counting sort's within-block rank


def sort_by_group(group_ids, num_groups: int, method: str = "counting"):
  """group_ids [tokens, top_k] int -> (sort_idx [tokens*top_k] int32, group_sizes [g] int32).

  method "counting" (default) places every slot at group start + its rank among the earlier
  slots of its group, from per-block group counts and a within-block rank (compares and sums
  XLA fuses; no sort). "argsort" is jnp.argsort(stable=True): on the GPU it ran as XLA's own
  sort kernel, 0.457 ms of a 14.7 ms UniPool layer at 64k slots (H200, session 15). Both give
  the same permutation.
  """
  flat = group_ids.reshape(-1).astype(jnp.int32)
  valid = (flat >= 0) & (flat < num_groups)
  key = jnp.where(valid, flat, num_groups)
  if method == "argsort":
    sort_idx = jnp.argsort(key, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_groups,), jnp.int32).at[key].add(1, mode="drop")
    return sort_idx, group_sizes
  if method != "counting":
    raise ValueError(f"sort_by_group: method must be 'counting' or 'argsort', got {method!r}")
  pos, counts = _stable_positions(key, num_groups + 1)
  return inverse_permutation(pos), counts[:num_groups]    # slot -> position, inverted


def _stable_positions(key, num_keys: int):
  """key [n] int32 in [0, num_keys) -> (position of each slot in the stable sort by key [n],
  slots per key [num_keys]), both int32. Position = slots of smaller keys + slots of the same
  key in earlier blocks + earlier slots of the same key in this block: O(n * (num_keys +
  _RANK_BLOCK)) compares, all fusable."""
  n = key.shape[0]
  blk = min(_RANK_BLOCK, max(n, 1))
  nb = -(-n // blk)
  # padding slots take the last key and come after every real slot, so they move nothing
  kb = jnp.pad(key, (0, nb * blk - n), constant_values=num_keys - 1).reshape(nb, blk)
  counts = jnp.sum(kb[:, :, None] == jnp.arange(num_keys, dtype=jnp.int32), axis=1,
                   dtype=jnp.int32)                                     # [nb, num_keys]
  totals = jnp.sum(counts, axis=0)
  starts = jnp.cumsum(totals) - totals                                  # [num_keys]
  before = jnp.cumsum(counts, axis=0) - counts                          # [nb, num_keys]
  i = jnp.arange(blk, dtype=jnp.int32)
  earlier = (kb[:, None, :] == kb[:, :, None]) & (i[None, :] < i[:, None])   # [nb, i, j]
  rank = jnp.sum(earlier, axis=2, dtype=jnp.int32)
  pos = starts[kb] + jnp.take_along_axis(before, kb, axis=1) + rank
  last_pad = nb * blk - n
  return pos.reshape(-1)[:n], totals.at[num_keys - 1].add(-last_pad)


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


def aligned_rows(n: int, num_groups: int, align: int) -> int:
  """Rows of the padded array of `aligned_layout` (static): enough for every group to be
  rounded up to a multiple of align and for the rows past the groups after them, itself a
  multiple of align (kernels with row constraints, e.g. Mosaic GPU's 8-row TMA tiles, keep
  taking it)."""
  align = max(align, 1)
  return -(-(n + num_groups * (align - 1)) // align) * align


def aligned_layout(group_sizes, n: int, align: int):
  """Row maps between n rows sorted by group and a padded array whose groups start at
  multiples of `align` (rows past sum(group_sizes) follow the last padded group).

  Returns src [aligned_rows(n, g, align)] int32 (the sorted row each padded row holds, -1 for
  padding), dest [n] int32 (the padded row of each sorted row) and the padded group sizes [g]
  (each rounded up to a multiple of align; the padding rows are zero, so gmm on them gives
  zero rows and tgmm gains nothing from them).
  """
  if align < 1:
    raise ValueError(f"aligned_layout: align must be >= 1, got {align}")
  g = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  padded = (sizes + align - 1) // align * align
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  p_starts = jnp.cumsum(padded) - padded
  i = jnp.arange(n, dtype=jnp.int32)
  # unrolled binary search: searchsorted's default is a lax while loop, a launch per step on
  # the GPU inside every MoE layer
  grp = jnp.searchsorted(ends, i, side="right", method="scan_unrolled").astype(jnp.int32)
  gc = jnp.minimum(grp, g - 1)
  past = jnp.sum(padded) + i - jnp.sum(sizes)
  dest = jnp.where(grp < g, p_starts[gc] + i - starts[gc], past).astype(jnp.int32)
  src = jnp.full((aligned_rows(n, g, align),), -1, jnp.int32).at[dest].set(
      i, unique_indices=True)
  return src, dest, padded.astype(jnp.int32)


def _pad_gather(x, src):
  rows = x.at[jnp.maximum(src, 0)].get(mode="promise_in_bounds")
  return jnp.where((src >= 0)[:, None], rows, jnp.zeros((), x.dtype))


@jax.custom_vjp
def pad_rows(x, src, dest):
  """x [n, d] sorted rows -> [len(src), d] in the aligned layout (zero rows where src < 0);
  the gradient is the gather g[dest] (no scatter)."""
  return _pad_gather(x, src)


def _pad_rows_fwd(x, src, dest):
  return pad_rows(x, src, dest), (src, dest)


def _pad_rows_bwd(res, g):
  src, dest = res
  return g.at[dest].get(mode="promise_in_bounds", unique_indices=True), None, None


pad_rows.defvjp(_pad_rows_fwd, _pad_rows_bwd)


@jax.custom_vjp
def unpad_rows(y, src, dest):
  """y [len(src), d] in the aligned layout -> its [n, d] sorted rows y[dest]; the gradient
  puts g back in the aligned layout (zeros on the padding) by a gather."""
  return y.at[dest].get(mode="promise_in_bounds", unique_indices=True)


def _unpad_rows_fwd(y, src, dest):
  return unpad_rows(y, src, dest), (src, dest)


def _unpad_rows_bwd(res, g):
  src, dest = res
  return _pad_gather(g, src), None, None


unpad_rows.defvjp(_unpad_rows_fwd, _unpad_rows_bwd)
