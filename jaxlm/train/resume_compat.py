"""What may change between a checkpoint's model and the model that resumes it.

A model field either shapes the parameters or the function they compute (width, depth,
routing, NSA blocks...: resuming under a different value is refused) or only says how that
function is executed (kernels, remat, layer scanning: resuming reports the change and goes on).
`model.scan_layers` is the one execution choice that changes the state's layout: scanned
layers keep each parameter stacked over layers, unrolled layers one subtree per layer. A
checkpoint saved under the other layout is restored in its own layout and converted
(jaxlm/models/layer_layout.py).
"""
from __future__ import annotations

import dataclasses

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
