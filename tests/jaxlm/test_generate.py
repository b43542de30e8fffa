"""KV-cache generation and sampling against full-forward references."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import AttentionConfig
from jaxlm.data import ByteTokenizer
from jaxlm.generate import Sampling, generate, sample_logits
from jaxlm.models import build
from jaxlm.sample import sample_text
from tests.jaxlm.conftest import random_params, tiny_model

B, PROMPT, NEW = 2, 5, 10


def _prompt(vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (B, PROMPT)).astype(np.int32)


def _greedy_reference(fm, params, prompt, n_new):
  """Argmax loop over full forwards (no cache). The buffer has a fixed length, so one compile;
  causality makes the logits at position p depend on tokens <= p only."""
  total = prompt.shape[1] + n_new
  fwd = jax.jit(lambda p, t: fm.apply(p, t)[0])
  buf = np.zeros((prompt.shape[0], total), np.int32)
  buf[:, :prompt.shape[1]] = prompt
  for i in range(n_new):
    pos = prompt.shape[1] + i
    logits = np.asarray(fwd(params, buf))[:, pos - 1]
    buf[:, pos] = logits.argmax(-1)
  return buf[:, prompt.shape[1]:]


CASES = {
    # scanned layers decode through FunctionalModel.for_decode's unrolled twin, or (decode_unroll
    # off) through the scanned layers at a traced index
    "gqa_scanned": dict(),
    "gqa_scanned_decode_scan": dict(decode_unroll=False),
    "nsa_scanned": dict(attention=AttentionConfig(kind="nsa", nsa_block_len=4, nsa_stride=2,
                                                  nsa_select_len=4, nsa_top_n=2, nsa_window=4)),
    "sliding_unscanned_tied": dict(scan_layers=False, tie_embeddings=True,
                                   attention=AttentionConfig(kind="sliding", window=4)),
}


@pytest.fixture(scope="module", params=list(CASES))
def model(request):
  cfg = tiny_model(**CASES[request.param])
  fm = build(cfg)
  params = random_params(fm, seed=2, std=0.3)  # peaked logits: no near-ties in argmax
  prompt = _prompt(cfg.vocab_size)
  return fm, params, prompt, _greedy_reference(fm, params, prompt, NEW)


def _gen(fm, params, prompt, sampling, seed=0, n=NEW):
  return np.asarray(generate(fm, params, prompt, jax.random.key(seed), max_new_tokens=n,
                             sampling=sampling))


def test_greedy_equals_argmax_over_full_forwards(model):
  fm, params, prompt, ref = model
  out = _gen(fm, params, prompt, Sampling(temperature=0.0))
  assert out.shape == (B, NEW) and out.dtype == np.int32
  np.testing.assert_array_equal(out, ref)
  assert len(set(ref.ravel().tolist())) > 1  # not a degenerate constant output


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
  fm, params, prompt, ref = model
  np.testing.assert_array_equal(_gen(fm, params, prompt, Sampling(temperature=1.0, top_k=1), seed=3), ref)
  np.testing.assert_array_equal(_gen(fm, params, prompt, Sampling(temperature=1.5, top_p=1e-6), seed=4), ref)


def test_temperature_sampling_is_deterministic_in_the_key(model):
  fm, params, prompt, ref = model
  s = Sampling(temperature=2.0)
  a, b = _gen(fm, params, prompt, s, seed=7), _gen(fm, params, prompt, s, seed=7)
  np.testing.assert_array_equal(a, b)
  c = _gen(fm, params, prompt, s, seed=8)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a, ref)
  assert a.min() >= 0 and a.max() < fm.cfg.vocab_size


# ------------------------------------------------------------------ sample_logits itself

_sample = jax.jit(sample_logits, static_argnums=2)


def test_for_decode_unstacks_a_scanned_model_once():
  fm = build(tiny_model())
  params = random_params(fm)
  dm, dp = fm.for_decode(params)
  assert fm.cfg.scan_layers and not dm.cfg.scan_layers
  assert jax.tree.structure(dp) == jax.tree.structure(dm.param_shapes)
  np.testing.assert_array_equal(dp["blocks"][1]["attn"]["wq"], params["blocks"]["attn"]["wq"][1])
  for cfg in (tiny_model(decode_unroll=False), tiny_model(scan_layers=False)):
    other = build(cfg)
    assert other.for_decode(params) == (other, params)


def test_sample_logits_respects_top_k_and_top_p():
  rng = np.random.default_rng(0)
  row = rng.normal(0, 2, 32).astype(np.float32)
  logits = jnp.asarray(np.tile(row, (4000, 1)))
  order = np.argsort(-row)
  key = jax.random.key(0)
  # top_k=3: only the three largest ever come out, each with its renormalised probability
  got = np.asarray(_sample(key, logits, Sampling(temperature=1.0, top_k=3)))
  assert set(got.tolist()) <= set(order[:3].tolist())
  p = np.exp(row[order[:3]] - row[order[:3]].max())
  p /= p.sum()
  freq = np.array([(got == t).mean() for t in order[:3]])
  np.testing.assert_allclose(freq, p, atol=0.04)
  # top_p: the smallest prefix (by probability) whose mass reaches top_p
  probs = np.exp(row - row.max())
  probs /= probs.sum()
  cum = np.cumsum(probs[order])
  top_p = float(cum[4] - 1e-3)  # needs exactly the 5 most likely tokens
  got = np.asarray(_sample(key, logits, Sampling(temperature=1.0, top_p=top_p)))
  assert set(got.tolist()) == set(order[:5].tolist())
  # temperature 0 is argmax
  got = np.asarray(_sample(key, logits[:3], Sampling(temperature=0.0)))
  assert got.tolist() == [int(order[0])] * 3


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_sampling_settings_raise(kw):
  with pytest.raises(ValueError):
    Sampling(**kw)


# ------------------------------------------------------------------ text in, text out

def test_sample_text_checks_length_and_returns_text():
  cfg = tiny_model(vocab_size=260, max_seq_len=24)
  fm = build(cfg)
  params = random_params(fm, seed=1)
  tok = ByteTokenizer()
  prompt = "ROMEO:\n"  # 7 bytes
  with pytest.raises(ValueError, match="max_seq_len=24"):
    sample_text(fm, params, tok, prompt, 18, Sampling(temperature=0.0))
  with pytest.raises(ValueError, match="max_seq_len"):
    sample_text(fm, params, tok, "x" * 30, 1, Sampling(temperature=0.0))
  text = sample_text(fm, params, tok, prompt, 17, Sampling(temperature=0.0))  # exactly fits
  assert isinstance(text, str)
  ids = np.asarray([tok.encode(prompt)], np.int32)
  greedy = _gen(fm, params, ids, Sampling(temperature=0.0), n=17)[0]
  assert text == tok.decode([int(t) for t in greedy])
  texts = sample_text(fm, params, tok, prompt, 17, Sampling(temperature=1.0), seed=3, num_samples=2)
  assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
