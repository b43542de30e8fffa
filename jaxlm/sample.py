"""Text in, text out: tokenize a prompt, generate, detokenize."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.generate import Sampling, generate


def sample_text(fm, params, tokenizer, prompt: str, max_new_tokens: int, sampling: Sampling,
                seed: int = 0, num_samples: int = 1) -> str | list[str]:
  ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  limit = fm.cfg.max_seq_len
  if len(ids) + max_new_tokens > limit:
    raise ValueError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceed "
                     f"model.max_seq_len={limit}")
  prompt_arr = jnp.asarray([ids] * num_samples, jnp.int32)
  params = jax.device_get(params)
  out = jax.device_get(generate(fm, params, prompt_arr, jax.random.key(seed),
                                max_new_tokens=max_new_tokens, sampling=sampling))
  texts = [tokenizer.decode([int(t) for t in row]) for row in out]
  return texts[0] if num_samples == 1 else texts
