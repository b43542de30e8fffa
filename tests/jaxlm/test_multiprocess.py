"""Multi-process training: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, started by
launch/local_multiprocess.py running experiments/train.py) compute the same run as one process
with 8 devices: same per-step losses, same validation loss, and a checkpoint written by the two
processes that restores onto the single process's mesh with the same params.

The mesh (data 1, fsdp 2, tensor 4) puts the fsdp axis across the two processes (each holds
half of every embed-sharded param and half of each global batch) and the tensor axis within
each process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

from jaxlm import configs
from jaxlm.config import apply_overrides
from tests.jaxlm.conftest import write_text_docs
from tests.ops.op_testing import rel_err

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# launch/ is a folder of scripts, not a package
_spec = importlib.util.spec_from_file_location(
    "local_multiprocess", os.path.join(REPO, "launch", "local_multiprocess.py"))
local_multiprocess = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_multiprocess)

STEPS = 6
TOL = 1e-5


def _overrides(paths, cache_dir, output_dir) -> list[str]:
  return [
      "model.vocab_size=260", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
      "model.n_kv_heads=2", "model.d_ff=64", "model.max_seq_len=32", "model.dtype=float32",
      f"train.steps={STEPS}", "train.batch_size=8", "train.seq_len=16", "train.lr=1e-2",
      "train.warmup_steps=1", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=2",
      f"train.checkpoint_every={STEPS}", "train.async_checkpoint=false",
      f"train.output_dir={output_dir}",
      "data.source=files", f"data.paths={','.join(paths)}", "data.tokenizer=byte",
      "data.val_fraction=0.2", f"data.cache_dir={cache_dir}",
      "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=4", "mesh.expert=1",
  ]


def _losses(output_dir) -> list[float]:
  with open(os.path.join(output_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return [r["loss"] for r in rows]


def test_two_processes_match_one_process(tmp_path):
  assert jax.device_count() == 8 and jax.process_count() == 1
  paths = write_text_docs(tmp_path / "text", n_docs=6, n_words=300)
  cache = str(tmp_path / "cache")

  # single process, 8 devices (this pytest process); also builds the token cache
  from jaxlm.train.loop import Trainer
  one_dir = str(tmp_path / "one")
  cfg = apply_overrides(configs.get_preset("tiny_cpu"), _overrides(paths, cache, one_dir))
  trainer = Trainer(cfg)
  result = trainer.run(progress=False)
  trainer.close()
  assert result.final_step == STEPS
  one_losses = _losses(one_dir)
  one_params = jax.device_get(trainer.state.params)

  # two processes x 4 devices, through the launcher and the train script
  two_dir = str(tmp_path / "two")
  args = [os.path.join(REPO, "experiments", "train.py"), "--config=tiny_cpu", "--sample_tokens=0"]
  for o in _overrides(paths, cache, two_dir):
    args += ["--set", o]
  log_dir = str(tmp_path / "logs")
  codes = local_multiprocess.launch(args, num_processes=2, devices_per_process=4,
                                    log_dir=log_dir, timeout=540,
                                    extra_env={"JAX_PLATFORMS": "cpu"})
  logs = [open(os.path.join(log_dir, f"process_{i}.log")).read() for i in range(2)]
  assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(l[-3000:] for l in logs)
  two_losses = _losses(two_dir)
  np.testing.assert_allclose(two_losses, one_losses, rtol=TOL)
  assert one_losses[-1] < one_losses[0]

  match = re.search(r"done: step (\d+), val loss ([0-9.eE+-]+)", logs[0])
  assert match, logs[0][-2000:]
  assert int(match.group(1)) == STEPS
  np.testing.assert_allclose(float(match.group(2)), result.val_loss, rtol=TOL)
  assert "done:" not in logs[1]  # only process 0 reports

  # the checkpoint the two processes wrote restores onto the 8-device mesh of this process
  from jaxlm.train.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(two_dir, "checkpoints"), keep=2, async_save=False)
  try:
    assert ckpt.all_steps() == [STEPS]
    state, data_state, stored = ckpt.restore(STEPS, trainer.abstract_state)
  finally:
    ckpt.close()
  assert data_state["step"] == STEPS and stored["mesh"]["fsdp"] == 2
  flat_two = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  for (path, a), b in zip(flat_two, jax.tree.leaves(one_params)):
    err = rel_err(a, b)
    assert err <= TOL, f"params{jax.tree_util.keystr(path)}: relative error {err:.2e}"
