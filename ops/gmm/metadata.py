"""Group metadata shared by the Pallas kernels: which (m tile, group) pairs to visit.

Rows are sorted by group. With row tiles of `block_m`, a tile that straddles a group
boundary is visited once per group it touches, each visit masked to that group's rows.
Rows past sum(group_sizes) form one extra pseudo-group (index num_groups) whose visits
write zeros, so every output row is written exactly once. The visit count is data
dependent; the grid uses its static upper bound cdiv(m, block_m) + num_groups, and the
surplus visits get an empty row range (they do nothing).
"""
from __future__ import annotations

import jax.numpy as jnp


def num_visits(m: int, num_groups: int, block_m: int) -> int:
  return -(-m // block_m) + num_groups


def tile_visits(group_sizes, m: int, block_m: int):
  """Per visit: (group [V], tile [V], row_start [V], row_end [V]) int32, V = num_visits.

  Visit v covers output rows [row_start, row_end) inside tile `tile`, all of group `group`
  (num_groups = the rows past the sum). Unused visits have row_start == row_end,
  group num_groups and the last tile.
  """
  num_groups = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  sizes = jnp.concatenate([sizes, jnp.maximum(m - jnp.sum(sizes), 0)[None]])
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // block_m
  last = (ends - 1) // block_m
  count = jnp.where(sizes > 0, last - first + 1, 0)
  cum = jnp.cumsum(count)
  total = cum[-1]
  v = jnp.arange(num_visits(m, num_groups, block_m), dtype=jnp.int32)
  # unrolled binary search (the default is a lax while loop: a GPU launch per step, per layer)
  g = jnp.minimum(jnp.searchsorted(cum, v, side="right", method="scan_unrolled"),
                  num_groups).astype(jnp.int32)
  tile = first[g] + v - (cum[g] - count[g])
  valid = v < total
  row_start = jnp.where(valid, jnp.maximum(starts[g], tile * block_m), 0)
  row_end = jnp.where(valid, jnp.minimum(ends[g], (tile + 1) * block_m), 0)
  # Unused visits repeat the last tile (the final valid visit always covers it), so a
  # kernel whose output block follows the tile (Mosaic TPU) keeps that block resident.
  tile = jnp.where(valid, tile, -(-m // block_m) - 1)
  return g, tile.astype(jnp.int32), row_start.astype(jnp.int32), row_end.astype(jnp.int32)


def group_bounds(group_sizes):
  """(starts [g], ends [g]) int32 row ranges of each group."""
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  return (ends - group_sizes.astype(jnp.int32)).astype(jnp.int32), ends.astype(jnp.int32)
