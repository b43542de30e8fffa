"""Model-level decode speed: one token per step against a filled cache, in one jitted loop.

  python experiments/bench_decode.py --config=dense_1b,nsa_1b --batch=8 --cache_len=4096,65536

For every preset and cache length, the step a generation loop runs
(`fm.apply(params, token, cache=cache)`, greedy next token) is timed `--steps` times inside
one lax.scan, with the cache donated and its lengths set so every step attends to about
cache_len - steps tokens. Params are random, in the compute dtype. Each row prints ms a step,
tokens/s, and the bytes a step must at least read (the params plus every cached key / value
up to the length: all of it for full attention; NSA reads about a tenth of it, so its GB/s
can exceed the copy ceiling). That rate is set against a large device copy measured in the
same run. The "x first" column compares each row with the first preset's at the same cache
length (nsa_1b against dense_1b: issue 5's model-level decode ratio).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from jaxlm import config as config_lib
from jaxlm import configs

_CONFIGS = flags.DEFINE_list("config", ["dense_125m"], "presets to measure")
_SET = flags.DEFINE_multi_string("set", [], "overrides applied to every preset")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences decoded together")
_CACHE = flags.DEFINE_list("cache_len", ["4096"], "cache lengths (tokens a row holds)")
_STEPS = flags.DEFINE_integer("steps", 32, "decode steps timed inside one jitted loop")


def _jobs():
  """(config, cache_len) pairs, validated before anything compiles."""
  lens = [int(c) for c in _CACHE.value]
  if _BATCH.value < 1 or any(c <= _STEPS.value + 1 for c in lens) or _STEPS.value < 1:
    raise app.UsageError(f"--batch >= 1, --steps >= 1 and every --cache_len > steps + 1 "
                         f"(got batch {_BATCH.value}, steps {_STEPS.value}, cache {lens})")
  jobs = []
  for name in _CONFIGS.value:
    base = config_lib.apply_overrides(configs.get_preset(name), _SET.value)
    for n in lens:
      # positions past the training length are fine for decoding (RoPE is computed, not stored)
      jobs.append((config_lib.apply_overrides(
          base, [f"model.max_seq_len={max(base.model.max_seq_len, n)}"]), n))
  return jobs


def decode_loop(fm, steps: int):
  """jit(params, cache, token [b, 1]) -> (cache, last tokens): `steps` greedy decode steps."""
  import jax
  import jax.numpy as jnp

  def run(params, cache, tok):
    dm, params = fm.for_decode(params)

    def step(carry, _):
      cache, tok = carry
      logits, cache = dm.apply(params, tok, cache=cache)
      return (cache, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]), None
    (cache, tok), _ = jax.lax.scan(step, (cache, tok), None, length=steps)
    return cache, tok
  return jax.jit(run, donate_argnums=1)


def measure(cfg, cache_len: int, batch: int, steps: int) -> dict:
  """ms per decode step and the bytes it must read, for `cfg` at `cache_len`."""
  import time

  import jax
  import jax.numpy as jnp
  from jaxlm.models import build
  fm = build(cfg.model)
  dt = jnp.dtype(cfg.model.dtype)
  params = jax.jit(lambda k: jax.tree.map(lambda p: p.astype(dt), fm.init(k)))(jax.random.key(0))
  start = cache_len - steps - 1

  def fresh_cache():
    c = fm.init_cache(batch, cache_len)
    return dict(c, lengths=jnp.full((batch,), start, jnp.int32))

  cache = fresh_cache()
  cache_bytes = sum(x.nbytes for k, x in cache.items() if k != "lengths")
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  loop = decode_loop(fm, steps)
  tok = jnp.zeros((batch, 1), jnp.int32)
  cache, _ = jax.block_until_ready(loop(params, cache, tok))      # compile + warm-up
  best = float("inf")
  for _ in range(3):
    cache = jax.block_until_ready(fresh_cache())
    t0 = time.perf_counter()
    cache, _ = jax.block_until_ready(loop(params, cache, tok))
    best = min(best, time.perf_counter() - t0)
  ms = best / steps * 1e3
  # what a step must read: the params and the cache up to the rows' lengths (≈ all of it)
  floor = param_bytes + cache_bytes * (start + steps / 2) / cache_len
  return {"ms": ms, "tok_s": batch / (ms * 1e-3), "floor_gb": floor / 1e9,
          "gbs": floor / (ms * 1e-3) / 1e9, "cache_gb": cache_bytes / 1e9}


def main(argv):
  del argv
  import jax
  from experiments.bench import timing
  jobs = _jobs()
  kind = jax.devices()[0].device_kind
  copy = timing.copy_bandwidth_gbs() if jax.default_backend() != "cpu" else None
  print(f"device: {kind}; copy {copy and round(copy)} GB/s; batch {_BATCH.value}, "
        f"{_STEPS.value} steps in one jitted loop")
  print("| preset | cache | ms / step | tokens/s | x first | cache GB | params + cache read GB "
        "| GB/s | vs copy |")
  print("|---" * 9 + "|")
  first = {}
  for cfg, n in jobs:
    r = measure(cfg, n, _BATCH.value, _STEPS.value)
    first.setdefault(n, r["ms"])
    vs = f"{r['gbs'] / copy:.0%}" if copy else "-"
    print(f"| {cfg.name} | {n} | {r['ms']:.3f} | {r['tok_s']:,.0f} | {first[n] / r['ms']:.2f}× "
          f"| {r['cache_gb']:.2f} | {r['floor_gb']:.2f} | {r['gbs']:.0f} | {vs} |", flush=True)


if __name__ == "__main__":
  app.run(main)
