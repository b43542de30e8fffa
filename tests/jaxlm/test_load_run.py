"""Loading a trained run for evaluation and generation (jaxlm/train/restore.load_run and the
experiments/eval.py / generate.py scripts): the params a run saved, execution overrides (a
scanned run evaluated with unrolled layers), and clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.evaluate import evaluate_run
from jaxlm.models import layer_layout
from jaxlm.train.restore import load_run
from tests.jaxlm.conftest import tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_paths):
  from jaxlm.train.loop import Trainer
  tmp = tmp_path_factory.mktemp("load_run")
  cfg = tiny_run_config(tmp, text_paths, model=dict(scan_layers=True),
                        train=dict(steps=4, checkpoint_every=2))
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  trainer.run(progress=False)
  final = jax.device_get(trainer.state.params)
  trainer.close()
  return cfg, final


def _equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_loads_the_saved_params_newest_or_given_step(run):
  cfg, final = run
  loaded = load_run(cfg.train.output_dir)
  assert loaded.step == 4 and _equal(jax.device_get(loaded.params), final)
  assert load_run(cfg.train.output_dir, step=2).step == 2
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 3; have \\[2, 4\\]"):
    load_run(cfg.train.output_dir, step=3)
  with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
    load_run(os.path.dirname(cfg.train.output_dir))


def test_execution_overrides_and_unrolled_layers(run):
  """A scanned run loaded with model.scan_layers=false gets its params unstacked per layer and
  evaluates to the same loss; an override of the model itself is refused by name."""
  cfg, final = run
  scanned = load_run(cfg.train.output_dir)
  unrolled = load_run(cfg.train.output_dir, overrides=["model.scan_layers=false",
                                                       "model.remat=full"])
  assert unrolled.cfg.model.scan_layers is False
  assert _equal(jax.device_get(unrolled.params),
                layer_layout.convert_layer_layout(final, scanned=False))
  a, b = evaluate_run(scanned, 2), evaluate_run(unrolled, 2)
  assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and np.isfinite(a["loss"])
  with pytest.raises(config_lib.ConfigError, match="model.d_model: checkpoint 32 != config 64"):
    load_run(cfg.train.output_dir, overrides=["model.d_model=64"])


def test_eval_and_generate_scripts_take_overrides(run):
  cfg, _ = run
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  common = [f"--run_dir={cfg.train.output_dir}", "--set=model.scan_layers=false"]
  ev = subprocess.run([sys.executable, "experiments/eval.py", *common, "--batches=1"], cwd=ROOT,
                      env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0, ev.stderr[-2000:]
  assert "step 4: val loss" in ev.stdout
  gen = subprocess.run([sys.executable, "experiments/generate.py", *common, "--prompt=ab",
                        "--max_new_tokens=4", "--temperature=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert gen.returncode == 0, gen.stderr[-2000:]
  assert "--- sample 0 (step 4)" in gen.stdout
  bad = subprocess.run([sys.executable, "experiments/eval.py", f"--run_dir={cfg.train.output_dir}",
                        "--set=model.n_layers=3"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "model.n_layers: checkpoint 2 != config 3" in bad.stderr
