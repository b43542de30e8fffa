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


def test_time_in_loop_runs_every_step_inside_one_jit():
  traced = []

  def fn(x, w):
    traced.append(1)                        # python runs once per trace, not per step
    return jnp.tanh(x @ w)

  x, w = jnp.ones((8, 8)), jnp.eye(8) * 0.5
  ms = timing.time_in_loop(fn, x, w, steps=16, repeats=2)
  assert len(traced) == 1
  assert 0.0 < ms < 50.0


def test_time_in_loop_grows_with_steps_of_real_work():
  # the steps depend on each other, so XLA cannot hoist or merge them: 8x the work per step
  # (a chain of 8 products instead of 1) must take clearly longer per step
  w = jnp.eye(256) * 0.5

  def one(x, w):
    return x @ w

  def eight(x, w):
    for _ in range(8):
      x = x @ w
    return x

  x = jnp.ones((256, 256))
  t1 = timing.time_in_loop(one, x, w, steps=32, repeats=3)
  t8 = timing.time_in_loop(eight, x, w, steps=32, repeats=3)
  assert t8 > 2.0 * t1
