"""Load a trained run for evaluation or generation: config, model, params, tokenizer."""
from __future__ import annotations

import dataclasses
import os

import jax

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.data import get_tokenizer
from jaxlm.models import build, layer_layout
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train import resume_compat
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import state_layout


@dataclasses.dataclass
class LoadedRun:
  cfg: config_lib.Config
  fm: object
  params: dict
  tokenizer: object
  step: int


def load_run(run_dir: str, step: int | None = None, mesh_devices=None,
             overrides=()) -> LoadedRun:
  """Restore the newest (or given) checkpoint under `run_dir` (a train.output_dir).

  overrides: `section.field=value` strings applied to the run's stored config. The model may
  change only in how it runs (resume_compat.EXECUTION_FIELDS: kernels, remat, layer scanning;
  scanned params are converted to unrolled layers and back), anything else is a ConfigError.
  """
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{run_dir}: no checkpoints/ folder (is this a train.output_dir?)")
  ckpt = Checkpointer(ckpt_dir, keep=1_000_000, async_save=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir}: holds no checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {step}; have {steps}")
    stored = config_lib.from_dict(ckpt.restore_config(step))
    # Inference needs only the model: restore onto whatever devices are here, one data axis.
    stored = dataclasses.replace(stored, mesh=config_lib.MeshConfig())
    cfg = config_lib.apply_overrides(stored, list(overrides)) if overrides else stored
    blocking, _ = resume_compat.model_differences(stored.model, cfg.model)
    if blocking:
      raise config_lib.ConfigError(
          "the overrides change the run's model, not only how it runs:\n  " +
          "\n  ".join(blocking))
    devices = mesh_devices or jax.devices()[:1]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    stored_fm = build(stored.model)
    abstract, _ = state_layout(stored_fm, make_optimizer(stored.train, stored_fm.logical_axes),
                               mesh)
    params = ckpt.restore(step, abstract)[0].params
  finally:
    ckpt.close()
  if stored.model.scan_layers != cfg.model.scan_layers:
    params = layer_layout.convert_layer_layout(params, cfg.model.scan_layers)
  return LoadedRun(cfg, build(cfg.model), params, get_tokenizer(cfg.data, cfg.model.vocab_size),
                   step)
