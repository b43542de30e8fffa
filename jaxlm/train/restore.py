"""Load a trained run for evaluation or generation: config, model, params, tokenizer."""
from __future__ import annotations

import dataclasses
import os

import jax

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.data import get_tokenizer
from jaxlm.models import build
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import state_layout


@dataclasses.dataclass
class LoadedRun:
  cfg: config_lib.Config
  fm: object
  params: dict
  tokenizer: object
  step: int


def load_run(run_dir: str, step: int | None = None, mesh_devices=None) -> LoadedRun:
  """Restore the newest (or given) checkpoint under `run_dir` (a train.output_dir)."""
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
    cfg = config_lib.from_dict(ckpt.restore_config(step))
    # Inference needs only the model: restore onto whatever devices are here, one data axis.
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig())
    devices = mesh_devices or jax.devices()[:1]
    mesh = sharding.make_mesh(cfg.mesh, devices)
    fm = build(cfg.model)
    abstract, _ = state_layout(fm, make_optimizer(cfg.train, fm.logical_axes), mesh)
    state, _, _ = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return LoadedRun(cfg, fm, state.params, get_tokenizer(cfg.data, cfg.model.vocab_size), step)
