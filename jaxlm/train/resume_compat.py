"""What may change between a checkpoint's model and the model that resumes it.

A model field either shapes the parameters or the function they compute (width, depth,
routing, NSA blocks...: resuming under a different value is refused) or only says how that
function is executed (kernels, remat, layer scanning: resuming reports the change and goes on).
`model.scan_layers` is the one execution choice that changes the state's layout: scanned
layers keep each parameter stacked over layers, unrolled layers one subtree per layer. A
checkpoint saved under the other layout is restored in its own layout and converted.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# dotted ModelConfig fields that do not change the parameters or the function they compute
EXECUTION_FIELDS = (
    "remat", "scan_layers", "decode_unroll", "attention.implementation", "moe.implementation",
    "moe.group_align", "moe.pool_grad", "moe.pool_grad_chunk", "moe.fsdp_dispatch",
    "spiking.lif_implementation",
    "spiking.scan_implementation",
)


def _flat_fields(cfg, prefix: str = "") -> dict:
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      out.update(_flat_fields(v, f"{prefix}{f.name}."))
    else:
      out[prefix + f.name] = v
  return out


def model_differences(stored, current) -> tuple[list[str], list[str]]:
  """(fields that block a resume, execution fields that changed) between two ModelConfigs,
  each as 'model.<field>: checkpoint X != config Y' lines."""
  old, new = _flat_fields(stored), _flat_fields(current)
  blocking, execution = [], []
  for name in new:
    if old[name] != new[name]:
      line = f"model.{name}: checkpoint {old[name]!r} != config {new[name]!r}"
      (execution if name in EXECUTION_FIELDS else blocking).append(line)
  return blocking, execution


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
