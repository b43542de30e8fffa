"""Identical NNX modules as one module whose params have a leading "layers" axis, initialised
and run with one traced layer (vmap for init, lax.scan for apply) regardless of depth."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

# Primitives of JAX's cuDNN fused attention forward (jax.nn.dot_product_attention with
# implementation="cudnn"): their outputs are the attention output and its softmax statistics,
# which is what the cuDNN backward reads.
CUDNN_ATTENTION_FWD = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper"})


def save_fused_attention(prim, *_, **__) -> bool:
  return prim.name in CUDNN_ATTENTION_FWD


# The primitives of Pallas kernels: ops' forward kernels (NSA's branches, gmm, LIF, scan,
# attention) are not dots, so checkpoint_dots alone re-ran each of them in the backward of
# every remat'd layer. "pallas_call": Triton, Mosaic TPU (and Mosaic GPU before jax 0.11);
# "mpmd_map": Mosaic GPU kernels in jax 0.11.
PALLAS_KERNELS = frozenset({"pallas_call", "mpmd_map"})


def save_pallas_outputs(prim, *_, **params) -> bool:
  if prim.name in PALLAS_KERNELS:
    return True
  # jax 0.11 binds a Mosaic GPU kernel inside a custom_vmap_call, which is all the policy sees
  # (e.g. the attention returning lse for NSA's compressed branch, re-run by the backward of
  # "dots" until session 19): save it when its body is a Pallas kernel
  if prim.name == "custom_vmap_call":
    call = params.get("call")
    eqns = getattr(getattr(call, "jaxpr", call), "eqns", ())
    return any(e.primitive.name in PALLAS_KERNELS for e in eqns)
  return False


def _either(*policies):
  """Saves what any of the policies saves."""
  out = policies[0]
  for p in policies[1:]:
    out = jax.checkpoint_policies.save_from_both_policies(out, p)
  return out


_DOTS_AND_KERNELS = (jax.checkpoint_policies.checkpoint_dots, save_fused_attention,
                     save_pallas_outputs)

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    # matmul outputs, and the cuDNN attention forward's: left out, the backward re-ran every
    # layer's attention forward (dense_1b 8x4096 on an H200: 36 cuDNN forwards per step for 18
    # layers, 39.4 ms of a 450 ms step)
    # Pallas kernels' outputs likewise, and the MoE experts' grouped matmuls by name
    # (jaxlm/layers/expert_pool: any gmm implementation, ragged_dot included)
    "dots": _either(*_DOTS_AND_KERNELS,
                    jax.checkpoint_policies.save_only_these_names("expert_dots")),
    # "dots" before session 18 (for A/B runs): Pallas kernels and grouped matmuls recomputed
    "dots_only": _either(jax.checkpoint_policies.checkpoint_dots, save_fused_attention),
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # "dots" plus the SwiGLU product and the RMSNorm outputs (named in jaxlm/layers): the
    # backward then recomputes almost nothing (dense_1b 8x4096 on an H200: the SwiGLU product
    # alone is 18 x 0.29 ms recomputed per step under "dots") for about 7 GB more activations;
    # session 16, same process: 402.8 ms a step against 401.7 under "dots" (no gain: the
    # profile's 10.4 ms multiply fusion is in both, so what it saves is not that recompute)
    "dots_and_acts": _either(*_DOTS_AND_KERNELS, jax.checkpoint_policies.save_only_these_names(
        "mlp_act", "norm_out", "expert_dots")),
}


def init_stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """n modules `make(rngs)` as one module whose params have a leading "layers" axis.

  The layers are initialised by one vmapped call over n keys split from one draw of
  `rngs.params()`, so the traced init holds one layer's initialisers whatever the depth
  (building n modules and stacking them made `jit(init)` compile time grow with n: 18 NSA
  layers took over a minute on an H200). Every param gets "layers" prepended to its
  logical axes.
  """
  keys = jax.random.split(rngs.params(), n)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
  stacked = jax.vmap(lambda k: nnx.split(make(nnx.Rngs(params=k)))[1])(keys)
  for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata().get("logical_axes")
    if axes is not None:
      var.set_metadata("logical_axes", ("layers",) + tuple(axes))
  return nnx.merge(graphdef, stacked)


def maybe_remat(fn: Callable, remat: str) -> Callable:
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=False)


def scan_blocks(stacked: nnx.Module, x, layer_xs, body: Callable, remat: str):
  """Run `body(block, x, layer_x) -> (x, layer_y)` over the stacked blocks.

  layer_xs: pytree with a leading layers axis (or None); returns (x, stacked layer_ys).
  """
  graphdef, state = nnx.split(stacked)
  return jax.lax.scan(_layer_step(graphdef, body, remat), x, (state, layer_xs))


def _layer_step(graphdef, body: Callable, remat: str) -> Callable:
  """The (remat'd) scan step of one stacked layer: (carry, (layer state, layer_x))."""
  def step(carry, inputs):
    layer_state, layer_x = inputs
    return body(nnx.merge(graphdef, layer_state), carry, layer_x)

  return maybe_remat(step, remat)


def scan_blocks_decode(stacked: nnx.Module, carry, caches: dict, body: Callable, layer_xs=None,
                       unroll: bool = False):
  """scan_blocks for decoding: the stacked caches ride in the scan's carry and every layer gets
  them whole, with its index: `body(block, carry, dict(caches, layer=i), layer_x) -> (carry,
  (caches, y))`, the layers writing their new tokens in place at their slot
  (jaxlm.layers.attention.write_cache with layer=i). As scan inputs and outputs instead, a
  decode step copied every cache whole: into the stacked outputs (zero-filled first), layer by
  layer, then into the donated result (compiled for an H200: temporaries as large as the cache,
  about four times its bytes moved a step). Returns (carry, caches, stacked ys).

  unroll: a Python loop over the layers with static indices instead of the scan, so each
  layer's params are static slices of the stack (ModelConfig.decode_unroll says why)."""
  graphdef, state = nnx.split(stacked)
  n = jax.tree.leaves(state)[0].shape[0]
  if unroll:
    at = lambda tree, i: None if tree is None else jax.tree.map(lambda a: a[i], tree)
    ys = []
    for i in range(n):
      carry, (caches, y) = body(nnx.merge(graphdef, at(state, i)), carry,
                                dict(caches, layer=i), at(layer_xs, i))
      ys.append(y)
    return carry, caches, jax.tree.map(lambda *a: jnp.stack(a), *ys)

  def step(c, inputs):
    carry, caches = c
    layer_state, i, layer_x = inputs
    carry, (caches, y) = body(nnx.merge(graphdef, layer_state), carry, dict(caches, layer=i),
                              layer_x)
    return (carry, caches), y

  (carry, caches), ys = jax.lax.scan(step, (carry, caches),
                                     (state, jnp.arange(n, dtype=jnp.int32), layer_xs))
  return carry, caches, ys


def decode_blocks(blocks, carry, caches: dict, body: Callable, layer_xs=None,
                  scanned: bool = True, unroll: bool = False):
  """scan_blocks_decode over stacked blocks (unroll: see there), or the same over a list of
  blocks (unrolled layers: each gets dict(caches, layer=i) with a static i and its slice of
  layer_xs)."""
  if scanned:
    return scan_blocks_decode(blocks, carry, caches, body, layer_xs, unroll)
  ys = []
  for i, blk in enumerate(blocks):
    layer_x = None if layer_xs is None else jax.tree.map(lambda a: a[i], layer_xs)
    carry, (caches, y) = body(blk, carry, dict(caches, layer=i), layer_x)
    ys.append(y)
  return carry, caches, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def scan_blocks_in_chunks(stacked: nnx.Module, x, layer_xs, body: Callable, remat: str,
                          chunk: int, chunk_xs: Callable):
  """scan_blocks as an outer scan over n / chunk chunks of `chunk` layers each (inner scans).
  chunk_xs(i) -> a dict of per-layer inputs (leading axis `chunk`) built inside the outer
  step for chunk i and merged into layer_xs: what it computes from closed-over values has its
  gradient accumulated once per chunk, not per layer. Returns what scan_blocks returns."""
  graphdef, state = nnx.split(stacked)
  n = jax.tree.leaves(state)[0].shape[0]
  if n % chunk:
    raise ValueError(f"{chunk}-layer chunks do not divide {n} layers")
  split = lambda t: jax.tree.map(lambda a: a.reshape((n // chunk, chunk) + a.shape[1:]), t)
  step = _layer_step(graphdef, body, remat)

  def outer(carry, inputs):
    i, chunk_state, xs = inputs
    return jax.lax.scan(step, carry, (chunk_state, dict(xs, **chunk_xs(i))))

  carry, ys = jax.lax.scan(outer, x, (jnp.arange(n // chunk, dtype=jnp.int32), split(state),
                                      split(layer_xs)))
  return carry, jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), ys)
