"""ops.nsa's GPU kernels lower for an H200 on this CPU host (tests/ops/op_testing.lower_for_gpu):
Pallas Triton kernels are translated to Triton IR and Mosaic GPU kernels pass their layout
inference, with the H200's default block configs and the paper's structure. Interpret mode
replaces those code paths, so a kernel it accepts can still fail on the GPU; these catch that
in CI, before device time is spent."""
import functools

import jax
import jax.numpy as jnp
import pytest

from ops import nsa as nsa_op
from ops.nsa import decode as decode_mod
from ops.nsa.config import NSABlockConfig, NSAConfig
from tests.ops import op_testing as ot

BF16 = jnp.bfloat16
H200 = NSABlockConfig.for_device("NVIDIA H200")


def _sds(*shape, dtype=BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("group,implementation", [(16, "pallas_triton"), (4, "pallas_triton"),
                                                  (16, None)])
def test_training_forward_and_backward_lower(group, implementation):
  """The whole op (compressed branch, scores, top-n, selected attention, window) and its
  gradients through every input, 2048 tokens, kv heads 1 / 4; implementation None is what an
  H200 runs by default (the compressed branch on the Mosaic GPU attention)."""
  cfg = NSAConfig()
  b, t, d = 1, 2048, 128
  kvh = 4 if group == 4 else 1
  h = kvh * group
  n_cmp = cfg.n_cmp(t)
  args = (_sds(b, t, h, d), _sds(b, n_cmp, kvh, d), _sds(b, n_cmp, kvh, d),
          _sds(b, t, kvh, d), _sds(b, t, kvh, d), _sds(b, t, kvh, d), _sds(b, t, kvh, d),
          _sds(b, t, h, 3))

  def loss(*a):
    o = nsa_op.nsa(*a, cfg=cfg, implementation=implementation, config=H200)
    return jnp.sum(o.astype(jnp.float32))

  text = ot.lower_for_gpu(jax.grad(loss, argnums=tuple(range(8))), *args).as_text()
  for kernel in ("nsa_selection_scores", "nsa_topn", "nsa_selected_fwd", "nsa_selected_dq",
                 "nsa_selected_dkv"):
    assert kernel in text, kernel
  if implementation is None:
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("fuse_topn", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_decode_lowers(fuse_topn, stacked):
  """One token against 8192 cached ones, batch 2, 16 heads over 1 kv head: the five kernels
  (four with decode_fuse_topn), on per-layer caches and on caches stacked over 3 layers read at
  a traced layer."""
  cfg = NSAConfig()
  b, h, kvh, d, max_len = 2, 16, 1, 128, 8192
  lead = (3,) if stacked else ()
  n_cmp = cfg.n_cmp(max_len)
  caches = [_sds(*lead, b, n, kvh, d) for n in (n_cmp, n_cmp, max_len, max_len, max_len,
                                                max_len)]
  args = (_sds(b, h, d), *caches, _sds(b, h, 3), _sds(b, dtype=jnp.int32))
  fn = functools.partial(decode_mod.nsa_decode, cfg=cfg, implementation="pallas_triton",
                         config=H200.replace(decode_fuse_topn=fuse_topn))
  if stacked:
    args = args + (_sds(dtype=jnp.int32),)
    call = lambda *a: fn(*a[:-1], layer=a[-1])
  else:
    call = fn
  text = ot.lower_for_gpu(call, *args).as_text()
  kernels = ["nsa_decode_cmp", "nsa_decode_slc_win", "nsa_decode_combine"]
  kernels += ["nsa_decode_scores_topn"] if fuse_topn else ["nsa_decode_scores", "nsa_decode_topn"]
  for kernel in kernels:
    assert kernel in text, kernel
  assert ("nsa_decode_scores_topn" in text) == fuse_topn
