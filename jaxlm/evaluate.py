"""Validation loss / perplexity of loaded params over the held-out split."""
from __future__ import annotations

import functools
import math

import jax

from jaxlm.data import make_val_batches
from jaxlm.train.step import eval_step


def mean_loss(step_fn, params, batches, prepare=lambda b: b) -> dict:
  """Token-weighted validation loss of `step_fn` (an eval_step) over `batches`."""
  ce = n = 0.0
  for batch in batches:
    out = jax.device_get(step_fn(params, prepare(batch)))
    ce += float(out["ce_sum"])
    n += float(out["tokens"])
  loss = ce / max(n, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


def evaluate_run(run, max_batches: int) -> dict:
  t = run.cfg.train
  batches = make_val_batches(run.cfg.data, tokenizer=run.tokenizer, seq_len=t.seq_len,
                             batch_size=t.batch_size, max_batches=max_batches)
  return mean_loss(jax.jit(functools.partial(eval_step, fm=run.fm)), run.params, batches)
