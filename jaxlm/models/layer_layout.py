"""Layer layouts of a model's params: scanned (each `blocks` leaf stacked over layers) or
unrolled ({layer index: layer tree}). model.scan_layers picks one; checkpoints, evaluation and
decoding convert between them (jaxlm/train/resume_compat.py, FunctionalModel.for_decode)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_blocks_owner(x) -> bool:
  return isinstance(x, dict) and "blocks" in x


def _stack(blocks: dict) -> dict:
  """{0: layer tree, 1: ...} -> one tree with each leaf stacked over layers."""
  layers = [blocks[i] for i in range(len(blocks))]
  return jax.tree.map(lambda *a: jnp.stack(a), *layers)


def _unstack(blocks: dict) -> dict:
  """A tree of [layers, ...] leaves -> {0: layer tree, 1: ...}."""
  n = jax.tree.leaves(blocks)[0].shape[0]
  return {i: jax.tree.map(lambda a: a[i], blocks) for i in range(n)}


def _is_per_layer(blocks) -> bool:
  return isinstance(blocks, dict) and bool(blocks) and all(isinstance(k, int) for k in blocks)


def convert_layer_layout(tree, scanned: bool):
  """Every `blocks` subtree of `tree` (params and the optimizer moments that mirror them) in
  the scanned (stacked) or unrolled (per-layer) layout; other leaves unchanged."""
  def convert(node):
    if not _is_blocks_owner(node):
      return node
    blocks = node["blocks"]
    if _is_per_layer(blocks) == scanned:   # per-layer and scanned wanted, or the reverse
      blocks = _stack(blocks) if scanned else _unstack(blocks)
    return dict(node, blocks=blocks)
  return jax.tree.map(convert, tree, is_leaf=_is_blocks_owner)
