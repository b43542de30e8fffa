"""jaxlm/train/model_flops.py: the matmul count equals the weights the layers build, and the
keys per query of every attention kind equal a brute-force count of the visible keys."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxlm.config import AttentionConfig, ModelConfig, SpikingConfig
from jaxlm.models import build
from jaxlm.train import model_flops
from tests.jaxlm.conftest import tiny_model


def _matrices_in_tree(m: ModelConfig) -> int:
  """Sizes of the weight matrices of the unstacked param tree, less the embedding table and
  NSA's compression MLPs (they run once per stride tokens, counted separately)."""
  fm = build(dataclasses.replace(m, scan_layers=False))
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(fm.param_shapes)[0]:
    name = jax.tree_util.keystr(path)
    if len(leaf.shape) >= 2 and "embed" not in name and "compress" not in name:
      total += int(np.prod(leaf.shape))
  return total


def _spiking(**sp):
  return ModelConfig(kind="symboliclight", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                     n_kv_heads=4, d_ff=64, max_seq_len=64, dtype="float32",
                     param_dtype="float32", spiking=SpikingConfig(**sp))


@pytest.mark.parametrize("m", [
    tiny_model(),
    tiny_model(attention=dict(kind="nsa", nsa_block_len=8, nsa_stride=4, nsa_select_len=8,
                              nsa_top_n=2, nsa_window=8)),
    tiny_model(attention=dict(kind="nsa", nsa_block_len=8, nsa_stride=4, nsa_select_len=8,
                              nsa_top_n=2, nsa_window=8, nsa_shared_kv=True)),
    _spiking(),
    _spiking(mixer="decay", head="static_prior"),
    _spiking(mixer="attention", prior_bottleneck=4),
], ids=["dense", "nsa", "nsa_shared_kv", "spiking_dual", "spiking_decay", "spiking_attention"])
def test_matmul_params_equal_the_layers_weights(m):
  assert model_flops.matmul_params_per_token(m) == _matrices_in_tree(m)


def _visible_brute_force(m: ModelConfig, t: int) -> int:
  if m.kind == "symboliclight":
    sp = m.spiking
    return sum(1 for j in range(t + 1) if t - sp.window < j or j < sp.n_anchors)
  a = m.attention
  if a.kind == "sliding":
    return sum(1 for j in range(t + 1) if t - a.window < j)
  cmp_blocks = sum(1 for j in range(t + 1) if j * a.nsa_stride + a.nsa_block_len - 1 <= t)
  blocks = list(range(t // a.nsa_select_len + 1))
  # the query's own block is always chosen; the rest are whole blocks
  chosen = blocks if len(blocks) <= a.nsa_top_n else blocks[-1:] + blocks[:a.nsa_top_n - 1]
  selected = sum(min(a.nsa_select_len, t + 1 - b * a.nsa_select_len) for b in chosen)
  window = sum(1 for j in range(t + 1) if t - a.nsa_window < j)
  return cmp_blocks + selected + window


@pytest.mark.parametrize("m,seq", [
    (tiny_model(attention=AttentionConfig(kind="sliding", window=16)), 100),
    (tiny_model(attention=AttentionConfig(kind="nsa", nsa_block_len=8, nsa_stride=4,
                                          nsa_select_len=8, nsa_top_n=3, nsa_window=16)), 101),
    (_spiking(window=16, n_anchors=3), 90),
])
def test_keys_per_query_equal_a_brute_force_count(m, seq):
  want = np.mean([_visible_brute_force(m, t) for t in range(seq)])
  assert model_flops.keys_per_query(m, seq) == pytest.approx(want)


def test_full_and_wide_windows_keep_the_seq_over_two_convention():
  assert model_flops.keys_per_query(tiny_model(), 64) == 32
  wide = tiny_model(attention=AttentionConfig(kind="sliding", window=64))
  assert model_flops.keys_per_query(wide, 64) == 32
  assert model_flops.keys_per_query(_spiking(mixer="decay"), 64) == 0


def test_sparse_presets_count_less_attention_than_full():
  """At the presets' lengths NSA's branches and SymbolicLight's window see fewer keys than full
  causal attention would, and the spiking FFN has two matrices, not SwiGLU's three."""
  from jaxlm import configs
  nsa = configs.get_preset("nsa_1b")
  full = dataclasses.replace(nsa.model, attention=AttentionConfig())
  s = 65536      # 2k compressed + 1k selected + 512 window keys against 32k
  assert model_flops.keys_per_query(nsa.model, s) < 0.12 * model_flops.keys_per_query(full, s)
  sl = configs.get_preset("symboliclight_194m").model
  assert model_flops.keys_per_query(sl, 1024) < 300
  d, f, L = sl.d_model, sl.d_ff, sl.n_layers
  assert model_flops.matmul_params_per_token(sl) < L * (4 * d * d + 3 * d * f) + d * sl.vocab_size
