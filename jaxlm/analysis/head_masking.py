"""Head masking: drop of a relational cloze metric (HIT@10) when the most important heads go.

Fact triples (subject, relation, object)
  From a file (one `subject<TAB>relation<TAB>object` per line) or mined from the corpus:
  word triples `S r O` with r one of `relations` (default "of") and S, O capitalised words
  (e.g. "Duke of York", "Prince of Wales"), counted over the documents; for every (S, r) the
  most frequent O is kept if it occurs at least `min_count` times, and the `max_triples` most
  frequent facts are used.
Cloze prompt: the tokens of "S r" (no other context); the answer is the first token of " O"
  as the tokenizer splits "S r O" (facts whose tokenization does not extend the prompt's are
  skipped). HIT@10 = fraction of facts whose answer token is among the 10 largest logits at
  the prompt's last position.
Masking head h of layer l multiplies its attention output by 0 (`common.scale_heads`, exact).
Head importance (three choices):
  gradient  I_h = sum_facts |d log p(O | S r) / d m_h| at m = 1 (m_h the head's output
            multiplier; Michel et al. 2019);
  lpi       the head's Gated-LPI (jaxlm/analysis/gated_lpi.py) between two checkpoints
            (default: the first and last of the run), F = sum_facts log p(O | S r);
  random    a random order (control; several seeds averaged).
The top-k heads by importance are masked together, for each k of `ks`.
"""
from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.analysis import common

_WORD = re.compile(r"[A-Za-z][A-Za-z']*")


def mine_triples(documents, relations=("of",), min_count: int = 3, max_triples: int = 200):
  """[(subject, relation, object, count)] mined from documents (module docstring)."""
  rel = set(relations)
  counts = collections.Counter()
  for doc in documents:
    words = _WORD.findall(doc)
    for a, r, b in zip(words, words[1:], words[2:]):
      if r in rel and a[0].isupper() and b[0].isupper() and not a.isupper() and not b.isupper():
        counts[(a, r, b)] += 1
  best: dict = {}
  for (a, r, b), n in counts.items():
    if n >= min_count and ((a, r) not in best or n > best[(a, r)][1]):
      best[(a, r)] = (b, n)
  facts = [(a, r, b, n) for (a, r), (b, n) in best.items()]
  facts.sort(key=lambda f: (-f[3], f[0], f[2]))
  return facts[:max_triples]


def read_triples(path: str):
  facts = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip() or line.startswith("#"):
        continue
      parts = line.split("\t")
      if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"{path}:{i}: expected subject<TAB>relation<TAB>object, got {line!r}")
      facts.append((parts[0].strip(), parts[1].strip(), parts[2].strip(), 1))
  return facts


def cloze_batch(tokenizer, facts, max_len: int = 0):
  """Right-padded prompts: dict(tokens [n, S] int32, last [n] (index of the prompt's last
  token), answer [n]) and the facts kept."""
  prompts, answers, kept = [], [], []
  for s, r, o, *_ in facts:
    p = list(tokenizer.encode(f"{s} {r}"))
    full = list(tokenizer.encode(f"{s} {r} {o}"))
    if len(full) > len(p) and full[:len(p)] == p and (not max_len or len(p) <= max_len):
      prompts.append(p)
      answers.append(full[len(p)])
      kept.append((s, r, o))
  if not prompts:
    raise ValueError("no usable fact triples (none tokenizes as prompt + answer)")
  width = max(len(p) for p in prompts)
  toks = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    toks[i, :len(p)] = p
  return {"tokens": jnp.asarray(toks), "last": jnp.asarray([len(p) - 1 for p in prompts]),
          "answer": jnp.asarray(answers, jnp.int32)}, kept


def _answer_logits(fm, params, batch):
  logits, _ = fm.apply(params, batch["tokens"])
  n = logits.shape[0]
  return logits[jnp.arange(n), batch["last"]]                     # [n, V]


def hit_at_k(fm, params, batch, head_mask=None, k: int = 10) -> float:
  p = params if head_mask is None else common.scale_heads(params, head_mask)
  return float(_hits(fm, p, batch, k))


def _hits_impl(fm, params, batch, k):
  logits = _answer_logits(fm, params, batch)
  ans = jnp.take_along_axis(logits, batch["answer"][:, None], axis=-1)
  rank = jnp.sum(logits > ans, axis=-1)                           # 0 = the top prediction
  return jnp.mean((rank < k).astype(jnp.float32))


_hits = jax.jit(_hits_impl, static_argnums=(0, 3))


def answer_logprob(fm, params, batch):
  logits = _answer_logits(fm, params, batch)
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.take_along_axis(lp, batch["answer"][:, None], axis=-1))


def gradient_importance(fm, params, batch) -> np.ndarray:
  """I_h = sum_facts |d log p(answer) / d m_h| at m = 1, [L, H]."""
  cfg = fm.cfg
  ones = jnp.ones((cfg.n_layers, cfg.n_heads), jnp.float32)

  def per_fact(mask, p, tokens, last, answer):
    one = {"tokens": tokens[None], "last": last[None], "answer": answer[None]}
    return answer_logprob(fm, common.scale_heads(p, mask), one)

  @jax.jit
  def grads(p, tokens, last, answer):  # lax.map, not vmap: ragged_dot (MoE) has no vmap rule
    return jax.lax.map(lambda f: jax.grad(per_fact)(ones, p, *f), (tokens, last, answer))

  g = grads(params, batch["tokens"], batch["last"], batch["answer"])
  return np.asarray(jnp.sum(jnp.abs(g), axis=0))


def lpi_importance(fm, params0, params1, batch, ig_steps: int = 8) -> np.ndarray:
  """Gated-LPI of every head between two checkpoints for F = sum_facts log p(answer), [L, H]."""
  from jaxlm.analysis import gated_lpi
  n, width = batch["tokens"].shape
  weights = jnp.zeros((n, width), jnp.float32).at[jnp.arange(n), batch["last"]].set(1.0)
  targets = jnp.zeros((n, width), jnp.int32).at[jnp.arange(n), batch["last"]].set(
      batch["answer"])
  contrib, _ = gated_lpi.integrated_gradients(fm, params0, params1, batch["tokens"], targets,
                                              steps=ig_steps, weights=weights)
  return gated_lpi.group_units(fm.cfg, contrib)["heads"]


def mask_curve(fm, params, batch, importance, ks, k_hit: int = 10) -> dict:
  """HIT@k_hit with the top-k heads (by importance [L, H]) masked, for each k in ks."""
  imp = np.asarray(importance, np.float64)
  order = np.argsort(-imp.ravel(), kind="stable")
  out = {}
  for k in ks:
    mask = np.ones(imp.size, np.float32)
    mask[order[:k]] = 0.0
    out[k] = hit_at_k(fm, params, batch, jnp.asarray(mask.reshape(imp.shape)), k_hit)
  return out


def analyze(run_dir: str, facts, ks=(1, 2, 4, 8), importance=("gradient", "lpi", "random"),
            random_seeds: int = 3, ig_steps: int = 8, step0: int | None = None) -> dict:
  steps = common.checkpoint_steps(run_dir)
  run = common.load(run_dir, steps[-1])
  fm = run.fm
  batch, kept = cloze_batch(run.tokenizer, facts)
  n_heads = fm.cfg.n_layers * fm.cfg.n_heads
  ks = [k for k in ks if k <= n_heads]
  base = hit_at_k(fm, run.params, batch)
  res = {"base": base, "n_facts": len(kept), "facts": kept, "curves": {}, "importance": {},
         "moe": fm.cfg.moe.kind, "n_heads": n_heads}
  for kind in importance:
    if kind == "gradient":
      imp = gradient_importance(fm, run.params, batch)
    elif kind == "lpi":
      s0 = steps[0] if step0 is None else step0
      if s0 == steps[-1]:
        continue
      imp = lpi_importance(fm, common.load(run_dir, s0).params, run.params, batch, ig_steps)
    elif kind == "random":
      curves = []
      for seed in range(random_seeds):
        rnd = np.random.default_rng(seed).random((fm.cfg.n_layers, fm.cfg.n_heads))
        curves.append(mask_curve(fm, run.params, batch, rnd, ks))
      res["curves"]["random"] = {k: float(np.mean([c[k] for c in curves])) for k in ks}
      continue
    else:
      raise ValueError(f"unknown importance {kind!r}")
    res["importance"][kind] = imp
    res["curves"][kind] = mask_curve(fm, run.params, batch, imp, ks)
  return res


def report(results: dict, out_dir: str) -> common.Report:
  md = ["### Head masking: relational HIT@10\n"]
  rows = []
  for label, r in results.items():
    for kind, curve in r["curves"].items():
      for k, v in curve.items():
        drop = (r["base"] - v) / r["base"] if r["base"] > 0 else float("nan")
        rows.append([label, r["moe"], r["n_facts"], kind, k, r["base"], v, drop])
  md += [common.markdown_table(["model", "moe", "facts", "importance", "heads masked",
                                "HIT@10 base", "HIT@10 masked", "relative drop"], rows), ""]
  first = next(iter(results.values()))
  md += ["Facts (first 12): " + ", ".join(" ".join(f) for f in first["facts"][:12]), ""]
  fig, axes = common.new_figure(len(results))
  for ax, (label, r) in zip(axes, results.items()):
    for kind, curve in r["curves"].items():
      ks = sorted(curve)
      ax.plot([0] + ks, [r["base"]] + [curve[k] for k in ks], marker="o", label=kind)
    ax.set_title(label)
    ax.set_xlabel("heads masked")
    ax.set_ylabel("HIT@10")
    ax.legend()
  figs = [common.save_figure(fig, out_dir, "head_masking.png")]
  return common.Report("\n".join(md), figs, results)
