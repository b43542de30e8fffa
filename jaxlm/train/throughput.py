"""Train-step throughput on synthetic tokens: tokens/s and MFU, without the data pipeline."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.models import build
from jaxlm.train.model_flops import train_flops_per_token
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import init_state, state_layout
from jaxlm.train.step import jit_train_step


@dataclasses.dataclass
class Throughput:
  name: str
  params: int
  tokens_per_step: int
  step_ms: float
  tokens_per_s: float
  model_tflops_per_device: float
  compile_s: float
  # the compiled step's device memory per device (XLA's memory analysis; None where the
  # backend gives none): arguments (state and batch) plus temporaries, outputs aliased
  device_gb: float | None = None


def _compiled_gb(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
  except Exception:      # backends without a memory analysis
    return None
  if m is None:
    return None
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes) / 1e9


def measure(cfg: Config, steps: int = 10, warmup: int = 2, devices=None,
            profile: Callable[[Callable[[], object]], None] | None = None) -> Throughput:
  """Median step time of `cfg`'s train step on `devices` (default: all of them).

  `profile`, if given, is called after the timed steps with a zero-argument function that runs
  one more step (threading the donated state) and returns its metrics, e.g. to trace it.
  """
  devices = list(devices if devices is not None else jax.devices())
  mesh = sharding.mesh_for(cfg, devices)
  fm = build(cfg.model)
  tx = make_optimizer(cfg.train, fm.logical_axes)
  _, shardings = state_layout(fm, tx, mesh)
  state = init_state(fm, tx, cfg.train.seed, mesh)
  step = jit_train_step(fm, cfg, tx, mesh, shardings)
  b, s = cfg.train.batch_size, cfg.train.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, s + 1), dtype=np.int32)
  batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]},
                         sharding.batch_sharding(mesh))
  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()   # the same executable, and its memory analysis
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    if profile is not None:
      holder = {"state": state}

      def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

      profile(one_step)
  ms = float(np.median(times) * 1e3)
  tok_s = b * s / (ms / 1e3)
  tflops = tok_s * train_flops_per_token(cfg.model, s) / 1e12 / len(devices)
  return Throughput(cfg.name, fm.num_params(), b * s, ms, tok_s, tflops, compile_s,
                    _compiled_gb(step))
