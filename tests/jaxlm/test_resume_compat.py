"""Resuming under another execution setting: what may change (remat, kernels, layer scanning)
and the conversion of a checkpoint between the scanned and unrolled layer layouts."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.models import build, layer_layout
from jaxlm.train.loop import check_resume_config
from jaxlm.train.optimizer import make_optimizer
from tests.jaxlm.conftest import random_params, tiny_model, tiny_run_config


def _stored(cfg) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def test_execution_settings_may_change_the_model_may_not():
  from jaxlm.config import Config
  cfg = Config(model=tiny_model())
  stored = _stored(cfg)
  flip = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, remat="full", scan_layers=False,
      attention=dataclasses.replace(cfg.model.attention, implementation="xla")))
  assert check_resume_config(stored, flip) == [
      "model.scan_layers: checkpoint True != config False",
      "model.remat: checkpoint 'none' != config 'full'",
      "model.attention.implementation: checkpoint '' != config 'xla'"]
  wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_ff=128, remat="full"))
  with pytest.raises(config_lib.ConfigError, match=r"model.d_ff: checkpoint 64 != config 128") as e:
    check_resume_config(stored, wider)
  assert "remat" not in str(e.value)     # only what blocks the resume is listed


@pytest.mark.parametrize("kind", ["transformer", "symboliclight"])
def test_layer_layouts_convert_both_ways_and_compute_the_same(kind):
  """Scanned params (and AdamW moments) unstacked into the unrolled model's tree compute the
  same logits there; stacking them back gives the original arrays."""
  from jaxlm import configs
  if kind == "transformer":
    model = tiny_model(vocab_size=64, n_layers=3)
  else:
    model = config_lib.apply_overrides(configs.get_preset("tiny_symboliclight_cpu"), [
        "model.n_layers=3", "model.d_model=32", "model.vocab_size=64"]).model
  scanned = build(dataclasses.replace(model, scan_layers=True))
  unrolled = build(dataclasses.replace(model, scan_layers=False))
  params = random_params(scanned, std=0.1)
  opt = make_optimizer(config_lib.TrainConfig()).init(params)
  per_layer = layer_layout.convert_layer_layout((params, opt), scanned=False)
  assert (jax.tree.structure(per_layer[0]) == jax.tree.structure(unrolled.param_shapes))
  toks = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)
  np.testing.assert_allclose(unrolled.apply(per_layer[0], toks)[0],
                             scanned.apply(params, toks)[0], atol=1e-5, rtol=1e-5)
  back = layer_layout.convert_layer_layout(per_layer, scanned=True)
  assert jax.tree.structure(back) == jax.tree.structure((params, opt))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                   jax.tree.leaves((params, opt))))
  # already in the wanted layout: unchanged
  same = layer_layout.convert_layer_layout(params, scanned=True)
  assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)))


def test_trainer_resumes_a_scanned_checkpoint_with_unrolled_layers(tmp_path, text_paths):
  """Train 4 steps with scanned layers and checkpoint; the same run with scan_layers=False
  restores that checkpoint converted (params and optimizer state) and its next steps equal
  the scanned run's next steps."""
  from jaxlm.train.loop import Trainer
  steps = dict(steps=4, checkpoint_every=4, lr=1e-2, warmup_steps=0)
  first = tiny_run_config(tmp_path, text_paths, model=dict(scan_layers=True), train=steps)
  t = Trainer(first, devices=jax.devices()[:1])
  t.run(progress=False)
  t.close()
  out = first.train.output_dir
  with open(os.path.join(out, "metrics.jsonl")) as f:
    n_rows = len(f.readlines())

  def resume(scan_layers, out_dir):
    if out_dir != out:
      import shutil
      shutil.copytree(out, out_dir)
    cfg = dataclasses.replace(
        first, model=dataclasses.replace(first.model, scan_layers=scan_layers),
        train=dataclasses.replace(first.train, steps=6, output_dir=out_dir))
    tr = Trainer(cfg, devices=jax.devices()[:1])
    state = tr.initial_state()
    params = jax.device_get(state.params)
    tr.close()
    tr = Trainer(cfg, devices=jax.devices()[:1])
    tr.run(progress=False)
    tr.close()
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f][n_rows:]
    return params, [r["loss"] for r in rows]

  p_scan, loss_scan = resume(True, str(tmp_path / "scanned"))
  p_unrolled, loss_unrolled = resume(False, str(tmp_path / "unrolled"))
  want = layer_layout.convert_layer_layout(p_scan, scanned=False)
  assert jax.tree.structure(p_unrolled) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p_unrolled),
                                                   jax.tree.leaves(want)))
  assert len(loss_scan) == len(loss_unrolled) == 2
  np.testing.assert_allclose(loss_unrolled, loss_scan, rtol=1e-4)
