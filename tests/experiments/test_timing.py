"""experiments/bench/timing.py: the back-to-back timer used for decode rows."""
import time

import jax.numpy as jnp

from experiments.bench import timing


def test_time_pipelined_calls_back_to_back_and_reports_per_call_ms():
  calls = []

  def fn(x):
    calls.append(time.perf_counter())
    time.sleep(0.002)
    return x + 1

  ms = timing.time_pipelined(fn, jnp.ones(4), calls=5, repeats=2)
  assert len(calls) == 1 + 5 * 2            # one warm-up call, then calls x repeats
  assert 2.0 <= ms < 50.0                   # per call, not per batch of calls


def test_time_pipelined_max_batch_s_caps_the_calls_of_a_slow_fn():
  calls = []

  def fn(x):
    calls.append(1)
    time.sleep(0.01)
    return x + 1

  ms = timing.time_pipelined(fn, jnp.ones(4), calls=200, repeats=2, max_batch_s=0.05)
  # warm-up + the one timed probe call, then 2 repeats of max(3, 0.05 s / ~10 ms) calls
  assert 2 + 2 * 3 <= len(calls) <= 2 + 2 * 5
  assert 10.0 <= ms < 100.0
