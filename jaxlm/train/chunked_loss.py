"""Cross entropy of the output head a chunk of positions at a time (TrainConfig.loss_chunks).

The head's float32 logits [batch, seq, vocab] are the largest activation of a small-d_model,
large-vocab model: unipool_469m at 32 x 1024 tokens holds 6.6 GB of f32 logits and two more
logits-sized buffers for the softmax's gradient (16.5 GB at its peak, compiled for an H200).
Here the sequence is cut into `n` chunks; a scan applies the head and the cross entropy to one
chunk at a time, and the backward computes each chunk's logits again (jax.checkpoint), so only
one chunk's logits are ever live. Costs one more head matmul in the backward (2·tokens·d·vocab
FLOPs). The sums (cross entropy, squared log-sum-exp) are the same as the unchunked loss's up
to float32 summation order.

Chunks run along the sequence, so the batch axis keeps its sharding (data / fsdp) in every
chunk. The head must treat each position on its own (true of the transformer's and
SymbolicLight's heads); `n` must divide the sequence length.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def logit_sums(logits, targets, mask) -> dict:
  """{"ce": Σ mask·CE, "z": Σ mask·logsumexp²} of logits [..., vocab] f32 and targets / mask
  [...]."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  lse = jax.nn.logsumexp(logits, axis=-1)
  return {"ce": jnp.sum(ce * mask), "z": jnp.sum(jnp.square(lse) * mask)}


def chunked_logit_sums(head: Callable, x, targets, mask, n_chunks: int) -> dict:
  """logit_sums(head(x), targets, mask) with head applied to n_chunks slices of the sequence.

  head: x [batch, s, d] -> logits [batch, s, vocab] f32, position by position;
  x: [batch, seq, d]; targets: [batch, seq] int; mask: [batch, seq] f32.
  """
  b, s = targets.shape
  if s % n_chunks:
    raise ValueError(f"train.loss_chunks={n_chunks} does not divide the sequence length {s}")
  if n_chunks == 1:
    return logit_sums(head(x), targets, mask)
  c = s // n_chunks

  def split(a):  # [b, s, ...] -> [n_chunks, b, c, ...]
    return jnp.moveaxis(a.reshape((b, n_chunks, c) + a.shape[2:]), 1, 0)

  # Nothing saved: the backward recomputes the chunk's logits from x, so no [b, c, vocab]
  # residual outlives its chunk.
  @jax.checkpoint
  def one(xc, tc, mc):
    return logit_sums(head(xc), tc, mc)

  def body(acc, chunk):
    sums = one(*chunk)
    return jax.tree.map(jnp.add, acc, sums), None

  zero = {"ce": jnp.zeros((), jnp.float32), "z": jnp.zeros((), jnp.float32)}
  sums, _ = jax.lax.scan(body, zero, (split(x), split(targets), split(mask)))
  return sums
