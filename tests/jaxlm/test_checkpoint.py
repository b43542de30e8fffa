"""Checkpoints: TrainState + data position + config round trip, resharding on restore, NaN
states never written, and exact resumption of experiments/train.py after SIGKILL."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.config import MeshConfig, from_dict, to_dict
from jaxlm.models import build
from jaxlm.train.checkpoint import Checkpointer, NonFiniteStateError
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import TrainState, state_layout
from tests.jaxlm.conftest import random_params, tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_paths):
  tmp = tmp_path_factory.mktemp("ckpt_cfg")
  cfg = tiny_run_config(tmp, text_paths)
  fm = build(cfg.model)
  tx = make_optimizer(cfg.train)
  mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  abstract, shardings = state_layout(fm, tx, mesh)
  params = random_params(fm, seed=1)
  # a non-trivial optimizer state: moments filled from a fake gradient, count advanced
  grads = jax.tree.map(lambda p: 0.01 * jnp.sin(p * 100.0), params)
  opt = jax.jit(tx.init)(params)
  _, opt = jax.jit(tx.update)(grads, opt, params)
  state = TrainState(jnp.asarray(7, jnp.int32), params, opt,
                     jnp.asarray([123, 456], jnp.uint32))
  state = jax.device_put(state, shardings)
  return cfg, fm, tx, abstract, state


def test_round_trip_state_data_and_config(tmp_path, setup):
  cfg, _, _, abstract, state = setup
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=3, async_save=False)
  ck.save(7, state, {"step": 7, "fingerprint": "abc"}, to_dict(cfg))
  ck.wait()
  assert ck.all_steps() == [7] and ck.latest_step() == 7
  restored, data_state, stored = ck.restore(7, abstract)
  assert isinstance(restored, TrainState)
  assert _leaves_equal(restored, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert int(restored.step) == 7
  assert data_state == {"step": 7, "fingerprint": "abc"}
  assert from_dict(stored) == cfg
  assert from_dict(ck.restore_config(7)) == cfg
  ck.close()
  # a fresh Checkpointer on the same directory (a restarted process) sees the same thing
  ck2 = Checkpointer(str(tmp_path / "ckpt"), keep=3, async_save=True)
  assert ck2.latest_step() == 7
  assert _leaves_equal(ck2.restore(7, abstract)[0], state)
  ck2.close()


def test_async_save_keeps_newest(tmp_path, setup):
  cfg, _, _, abstract, state = setup
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=True)
  for step in (1, 2, 3, 4):
    s = state._replace(step=jnp.asarray(step, jnp.int32))
    ck.save(step, s, {"step": step}, to_dict(cfg))
  ck.wait()
  assert ck.all_steps() == [3, 4]
  restored, data_state, _ = ck.restore(3, abstract)
  assert int(restored.step) == 3 and data_state == {"step": 3}
  assert _leaves_equal(restored.params, state.params)
  ck.close()


def test_restore_reshards_onto_another_mesh(tmp_path, setup):
  """Saved from one device, restored sharded over 8 (data 2 × fsdp 2 × tensor 2)."""
  cfg, fm, tx, _, state = setup
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=1, async_save=False)
  ck.save(7, state, {"step": 7}, to_dict(cfg))
  mesh8 = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
  abstract8, shardings8 = state_layout(fm, tx, mesh8)
  restored, _, _ = ck.restore(7, abstract8)
  assert _leaves_equal(restored, state)
  wq = restored.params["blocks"]["attn"]["wq"]  # [layers, embed, heads, head_dim]
  assert wq.sharding.spec == shardings8.params["blocks"]["attn"]["wq"].spec
  assert wq.sharding.spec[1] == "fsdp" and wq.sharding.spec[2] == "tensor"
  assert len(wq.sharding.device_set) == 8
  ck.close()


def test_nonfinite_state_is_never_written(tmp_path, setup):
  cfg, _, _, abstract, state = setup
  ck = Checkpointer(str(tmp_path / "ckpt"), keep=3, async_save=True)
  ck.save(1, state, {"step": 1}, to_dict(cfg))
  ck.wait()
  for bad_value in (np.nan, np.inf):
    params = jax.device_get(state.params)
    params["blocks"]["mlp"]["w_up"] = params["blocks"]["mlp"]["w_up"].copy()
    params["blocks"]["mlp"]["w_up"][1, 2, 3] = bad_value
    bad = state._replace(params=params, step=jnp.asarray(2, jnp.int32))
    with pytest.raises(NonFiniteStateError, match="step 2"):
      ck.save(2, bad, {"step": 2}, to_dict(cfg))
  ck.wait()
  assert ck.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]
  assert _leaves_equal(ck.restore(1, abstract)[0], state)
  ck.close()


# ------------------------------------------------------------------ kill -9 and resume

_SLOW_WRAPPER = """
import runpy, sys, time
from jaxlm.data import pipeline
_next = pipeline.TrainIterator.__next__
def _slow_next(self):
  time.sleep({delay})  # make steps slow enough to be killed mid-run; numerics untouched
  return _next(self)
pipeline.TrainIterator.__next__ = _slow_next
sys.argv = [{script!r}] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def _train_args(out_dir, paths, cache_dir, steps=12):
  sets = {
      "model.vocab_size": 260, "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
      "model.n_kv_heads": 2, "model.d_ff": 64, "model.max_seq_len": 32,
      "train.steps": steps, "train.batch_size": 4, "train.seq_len": 16, "train.lr": 1e-2,
      "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 1000,
      "train.eval_batches": 1, "train.checkpoint_every": 4, "train.keep_checkpoints": 5,
      "train.async_checkpoint": "true", "train.output_dir": out_dir,
      "data.source": "files", "data.paths": ",".join(paths), "data.tokenizer": "byte",
      "data.val_fraction": 0.2, "data.cache_dir": cache_dir, "mesh.data": 1,
  }
  args = ["--config=tiny_cpu", "--sample_tokens=0"]
  for k, v in sets.items():
    args += ["--set", f"{k}={v}"]
  return args


def _env(jax_cache):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  # Runs 2 and 3 reuse run 1's compiled executables (same programs, same results; saves ~30 s).
  env["JAX_COMPILATION_CACHE_DIR"] = jax_cache
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def _read_metrics(out_dir) -> list[dict]:
  path = os.path.join(out_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):  # ignore a line cut by the kill
        rows.append(json.loads(line))
  return rows


def _run(cmd, env, log_path, timeout=300):
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                          cwd=REPO)
  with open(log_path) as f:
    out = f.read()
  assert proc.returncode == 0, out[-4000:]
  return out


def test_sigkill_and_restart_reproduces_losses_exactly(tmp_path, text_paths):
  script = os.path.join(REPO, "experiments", "train.py")
  env = _env(str(tmp_path / "jax_cache"))
  cache = str(tmp_path / "data_cache")
  steps = 12

  # 1. uninterrupted reference run
  ref_dir = str(tmp_path / "ref")
  _run([sys.executable, script] + _train_args(ref_dir, text_paths, cache, steps), env,
       str(tmp_path / "ref.log"))
  ref = {r["step"]: r["loss"] for r in _read_metrics(ref_dir)}
  assert sorted(ref) == list(range(1, steps + 1))

  # 2. the same run, killed with SIGKILL once step >= 6 is logged and checkpoint 4 is final
  run_dir = str(tmp_path / "run")
  wrapper = tmp_path / "slow_train.py"
  wrapper.write_text(_SLOW_WRAPPER.format(delay=0.3, script=script))
  args = _train_args(run_dir, text_paths, cache, steps)
  ckpt4 = os.path.join(run_dir, "checkpoints", "4")
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen([sys.executable, str(wrapper)] + args, env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.time() + 300
    try:
      while True:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline, "timed out waiting for step 6"
        rows = _read_metrics(run_dir)
        if rows and rows[-1]["step"] >= 6 and os.path.isdir(ckpt4):
          break
        time.sleep(0.05)
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_rows = _read_metrics(run_dir)
  killed_at = killed_rows[-1]["step"]
  assert 6 <= killed_at < steps
  for r in killed_rows:  # up to the kill, the runs agree bit for bit
    assert r["loss"] == ref[r["step"]], (r, ref[r["step"]])

  # 3. restart the very same command (plain script, no slow-down): it resumes and finishes
  out = _run([sys.executable, script] + args, env, str(tmp_path / "restart.log"))
  m = re.search(r"resumed from .* at step (\d+)", out)
  assert m, out[-3000:]
  resumed = int(m.group(1))
  assert resumed in (4, 8) and resumed <= killed_at, (resumed, killed_at)
  rows = _read_metrics(run_dir)
  assert rows[: len(killed_rows)] == killed_rows  # the restart appends
  after = rows[len(killed_rows):]
  assert [r["step"] for r in after] == list(range(resumed + 1, steps + 1))
  for r in after:  # bitwise-equal float losses: same params, optimizer state and data order
    assert r["loss"] == ref[r["step"]], (r, ref[r["step"]])
  assert "done: step 12" in out
