"""Gated-LPI: neuron-level attribution of the log-probability increase between checkpoints.

Definition (used here; papers.md only says "neuron-level attribution of the log-probability
increase between checkpoints, decomposed across FFN/expert neurons and attention heads")
-----------------------------------------------------------------------------------------
Let F(theta) = sum_t w_t log p_theta(y_t | x_<=t) be the summed log-probability of fixed target
tokens (default: the next tokens of a fixed set of validation windows, w = 1), and theta_0 ->
theta_1 two checkpoints. Along the straight path theta(a) = theta_0 + a (theta_1 - theta_0),

    F(theta_1) - F(theta_0) = sum_i (theta_1 - theta_0)_i * int_0^1 dF/dtheta_i(theta(a)) da

(path / integrated-gradients decomposition; exact for any differentiable F). Each parameter
entry's term is assigned to the unit that owns it, and a unit's Gated-LPI is the sum of its
entries' terms:
  * FFN neuron n of dense layer l: column n of W_gate and W_up and row n of W_down;
  * expert neuron (pool g, expert e, n): the same three slices of expert e of pool g. For a
    UniPool model one pool serves every layer, so an expert neuron's attribution collects its
    effect through all the layers that route to it;
  * shared-expert neurons of MoE layers: like dense FFN neurons (reported separately);
  * attention head h of layer l: W_q[:, h] and W_o[h] (the head's own params) plus
    1/rep of its KV group's W_k and W_v (rep = heads per KV head, GQA);
  * the rest (embeddings, norms, routers, head) are reported per parameter name.
Why "gated": the gradient through W_down[n] is g_e(x) a_n(x) dF/dy, with a_n = silu(x W_gate[:,n])
(x W_up[:,n]) the neuron's activation and g_e(x) the router gate of its expert, so a neuron is
credited in proportion to its gated activation on the tokens that actually route to it (an
expert never chosen gets zero). The integral is a Riemann sum over `steps` points (midpoint
rule; `rule="left"` with steps=1 is the first-order Taylor form dF(theta_0) . delta). The sum
over all units equals F(theta_1) - F(theta_0) up to quadrature error and, for MoE models, the
jumps of F where the top-k choice switches along the path (a gradient cannot see those); the
report gives this completeness residual.

Summaries
  * concentration: neurons sorted by attribution (descending); share of the positive total
    sum_n max(A_n, 0) captured by the top `frac` of all neurons (sum of the positive parts of
    their attributions / the positive total), and the whole curve.
  * stability: over a checkpoint series s_0 < s_1 < ... the attribution vector of each interval
    [s_i, s_{i+1}]; Spearman rank correlation of consecutive intervals and of each interval with
    the last, and the overlap |top_i ∩ top_last| / |top| of the top-`frac` neuron sets.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.analysis import common


# --------------------------------------------------------------------------- attribution

def integrated_gradients(fm, params0: dict, params1: dict, tokens, targets, *, steps: int = 8,
                         rule: str = "midpoint", weights=None):
  """Per-entry path attribution (params-shaped tree) and (F(theta_0), F(theta_1))."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if rule not in ("midpoint", "left"):
    raise ValueError(f"unknown rule {rule!r}")
  delta = jax.tree.map(lambda a, b: b - a, params0, params1)
  acc = jax.tree.map(jnp.zeros_like, params0)
  for i in range(steps):
    alpha = (i + 0.5) / steps if rule == "midpoint" else i / steps
    acc = jax.tree.map(jnp.add, acc, _grad_at(fm, params0, delta, jnp.float32(alpha), tokens,
                                              targets, weights))
  contrib = jax.tree.map(lambda d, g: d * g / steps, delta, acc)
  return contrib, (float(_value(fm, params0, tokens, targets, weights)),
                   float(_value(fm, params1, tokens, targets, weights)))


@functools.partial(jax.jit, static_argnums=0)
def _grad_at(fm, params0, delta, alpha, tokens, targets, weights):
  p = jax.tree.map(lambda a, d: a + alpha * d, params0, delta)
  return jax.grad(lambda q: common.sum_logprob(fm, q, tokens, targets, weights))(p)


@functools.partial(jax.jit, static_argnums=0)
def _value(fm, params, tokens, targets, weights):
  return common.sum_logprob(fm, params, tokens, targets, weights)


def group_units(cfg, contrib: dict) -> dict:
  """Per-entry attribution -> units (module docstring). Returns numpy arrays:
  ffn [L, d_ff] (dense) or expert [n_pools, n_experts, d_expert] (MoE), shared [L, f'] when
  present, heads [L, H], other {name: float}."""
  c = jax.tree.map(lambda a: np.asarray(a, np.float64), contrib)
  blocks = common.stacked_blocks(c)
  out: dict = {"other": {}}
  used = set()
  if "mlp" in blocks:
    m = blocks["mlp"]
    out["ffn"] = m["w_gate"].sum(axis=1) + m["w_up"].sum(axis=1) + m["w_down"].sum(axis=2)
    used.add("mlp")
  if "pool" in c:
    p = c["pool"]
    out["expert"] = p["w_gate"].sum(axis=2) + p["w_up"].sum(axis=2) + p["w_down"].sum(axis=3)
    for k, v in p.items():
      if k not in ("w_gate", "w_up", "w_down"):
        out["other"][f"pool/{k}"] = float(v.sum())
  if "moe" in blocks:
    moe = blocks["moe"]
    if "shared" in moe:
      s = moe["shared"]
      out["shared"] = s["w_gate"].sum(axis=1) + s["w_up"].sum(axis=1) + s["w_down"].sum(axis=2)
    for k, v in moe.get("router", {}).items():
      out["other"][f"router/{k}"] = float(v.sum())
    used.add("moe")
  a = blocks["attn"]
  n_heads, n_kv = a["wq"].shape[2], a["wk"].shape[2]
  rep = n_heads // n_kv
  kv = (a["wk"].sum(axis=(1, 3)) + a["wv"].sum(axis=(1, 3))) / rep     # [L, KV]
  out["heads"] = a["wq"].sum(axis=(1, 3)) + a["wo"].sum(axis=(2, 3)) + np.repeat(kv, rep, axis=1)
  used.add("attn")
  for k, v in blocks.items():
    if k not in used:
      for path, leaf in jax.tree_util.tree_leaves_with_path(v):
        out["other"][f"blocks/{k}{jax.tree_util.keystr(path)}"] = float(np.sum(leaf))
  for k, v in c.items():
    if k not in ("blocks", "pool"):
      for path, leaf in jax.tree_util.tree_leaves_with_path(v):
        out["other"][f"{k}{jax.tree_util.keystr(path)}"] = float(np.sum(leaf))
  return out


def neuron_vector(units: dict) -> np.ndarray:
  """All FFN / expert / shared-expert neurons' attributions, flattened."""
  parts = [units[k].ravel() for k in ("ffn", "expert", "shared") if k in units]
  return np.concatenate(parts)


def total(units: dict) -> float:
  return float(sum(float(np.sum(units[k])) for k in ("ffn", "expert", "shared", "heads")
                   if k in units) + sum(units["other"].values()))


# --------------------------------------------------------------------------- summaries

def top_share(attr, frac: float = 0.01) -> float:
  """Share of the positive attribution total captured by the top ceil(frac * N) units."""
  a = np.sort(np.asarray(attr, np.float64).ravel())[::-1]
  pos = np.maximum(a, 0.0)
  tot = pos.sum()
  if tot <= 0:
    return float("nan")
  n = max(1, int(math.ceil(frac * a.size)))
  return float(pos[:n].sum() / tot)


def concentration_curve(attr) -> tuple[np.ndarray, np.ndarray]:
  """(fraction of units, cumulative share of the positive total), units sorted descending."""
  a = np.sort(np.asarray(attr, np.float64).ravel())[::-1]
  pos = np.maximum(a, 0.0)
  tot = max(pos.sum(), 1e-300)
  return np.arange(1, a.size + 1) / a.size, np.cumsum(pos) / tot


def top_set(attr, frac: float) -> set:
  a = np.asarray(attr).ravel()
  n = max(1, int(math.ceil(frac * a.size)))
  return set(np.argsort(-a, kind="stable")[:n].tolist())


def stability(vectors: list, frac: float = 0.01) -> dict:
  """Rank stability of a series of interval attribution vectors (module docstring)."""
  from scipy.stats import spearmanr
  def rho(a, b):
    r = spearmanr(a, b).statistic
    return float(r) if np.isfinite(r) else float("nan")
  last = vectors[-1]
  return {
      "consecutive": [rho(vectors[i], vectors[i + 1]) for i in range(len(vectors) - 1)],
      "vs_last": [rho(v, last) for v in vectors],
      "top_overlap_vs_last": [len(top_set(v, frac) & top_set(last, frac)) / len(top_set(last, frac))
                              for v in vectors],
  }


# --------------------------------------------------------------------------- a run

def analyze_series(run_dir: str, steps_list=None, *, n_seqs: int = 8, ig_steps: int = 8,
                   frac: float = 0.01) -> dict:
  """Gated-LPI over consecutive checkpoints of one run (all of them unless steps_list)."""
  steps_list = sorted(steps_list or common.checkpoint_steps(run_dir))
  if len(steps_list) < 2:
    raise ValueError(f"{run_dir}: need at least two checkpoints, have {steps_list}")
  runs = {s: common.load(run_dir, s) for s in steps_list}
  first = runs[steps_list[0]]
  batch = common.val_tokens(first, n_seqs)
  n_tok = int(np.prod(batch["targets"].shape))
  intervals = []
  for s0, s1 in zip(steps_list[:-1], steps_list[1:]):
    contrib, (f0, f1) = integrated_gradients(first.fm, runs[s0].params, runs[s1].params,
                                             batch["inputs"], batch["targets"], steps=ig_steps)
    units = group_units(first.fm.cfg, contrib)
    vec = neuron_vector(units)
    intervals.append({
        "from": s0, "to": s1, "delta_logprob": f1 - f0, "attributed": total(units),
        "delta_per_token": (f1 - f0) / n_tok, "units": units, "neurons": vec,
        "top_share": top_share(vec, frac), "top10_share": top_share(vec, 0.1),
        "head_top_share": top_share(units["heads"], max(frac, 1.0 / units["heads"].size)),
    })
  cum = intervals[0]["neurons"].copy()
  for it in intervals[1:]:
    cum = cum + it["neurons"]
  heads_total = sum(it["units"]["heads"] for it in intervals)
  return {"run_dir": run_dir, "steps": steps_list, "intervals": intervals,
          "cumulative_neurons": cum, "cumulative_top_share": top_share(cum, frac),
          "cumulative_heads": heads_total, "n_neurons": int(cum.size),
          "stability": stability([it["neurons"] for it in intervals], frac),
          "moe": first.fm.cfg.moe.kind, "frac": frac, "n_tokens": n_tok}


def report(results: dict, out_dir: str) -> common.Report:
  """Tables + PNGs for {label: analyze_series(...)}."""
  frac = next(iter(results.values()))["frac"]
  pct = f"{100 * frac:g}%"
  rows = []
  for label, r in results.items():
    first, last = r["intervals"][0], r["intervals"][-1]
    rows.append([label, r["moe"], r["n_neurons"], f"{r['steps'][0]}->{r['steps'][-1]}",
                 sum(it["delta_logprob"] for it in r["intervals"]) / r["n_tokens"],
                 max(abs(it["attributed"] - it["delta_logprob"]) /
                     max(abs(it["delta_logprob"]), 1e-9) for it in r["intervals"]),
                 first["top_share"], last["top_share"], r["cumulative_top_share"],
                 float(np.nanmean(r["stability"]["consecutive"]))
                 if r["stability"]["consecutive"] else float("nan")])
  md = ["### Gated-LPI: concentration and stability\n",
        common.markdown_table(
            ["model", "moe", "neurons", "steps", "Δ log p / token", "max completeness err",
             f"top-{pct} share (first interval)", f"top-{pct} share (last interval)",
             f"top-{pct} share (whole run)", "mean ρ consecutive"], rows), ""]
  for label, r in results.items():
    irow = [[f"{it['from']}->{it['to']}", it["delta_per_token"], it["attributed"] / r["n_tokens"],
             it["top_share"], it["top10_share"], it["head_top_share"],
             r["stability"]["vs_last"][i], r["stability"]["top_overlap_vs_last"][i]]
            for i, it in enumerate(r["intervals"])]
    md += [f"**{label}** per interval\n", common.markdown_table(
        ["interval", "Δ log p / tok", "attributed / tok", f"top-{pct} neurons",
         "top-10% neurons", "top head share", "ρ vs last", f"top-{pct} overlap vs last"],
        irow), ""]
    heads = r["cumulative_heads"]
    md += [f"**{label}** head attribution over the run (Σ intervals, per token), layer x head\n",
           common.markdown_table(["layer"] + [f"h{h}" for h in range(heads.shape[1])],
                                 [[l] + list(heads[l] / r["n_tokens"])
                                  for l in range(heads.shape[0])]), ""]
  fig, (ax1, ax2) = common.new_figure(2)
  for label, r in results.items():
    x, y = concentration_curve(r["cumulative_neurons"])
    ax1.plot(100 * x, y, label=label)
    ax2.plot([it["to"] for it in r["intervals"]], [it["top_share"] for it in r["intervals"]],
             marker="o", label=label)
  ax1.set_xscale("log")
  ax1.axvline(100 * frac, color="gray", lw=0.5)
  ax1.set_xlabel("% of neurons (sorted by Gated-LPI)")
  ax1.set_ylabel("share of positive Δ log p")
  ax1.set_title("concentration (whole run)")
  ax1.legend()
  ax2.set_xlabel("checkpoint step (interval end)")
  ax2.set_ylabel(f"top-{pct} share")
  ax2.set_title("concentration per interval")
  figs = [common.save_figure(fig, out_dir, "gated_lpi_concentration.png")]
  fig, (ax,) = common.new_figure(1)
  for label, r in results.items():
    ax.plot([it["to"] for it in r["intervals"]], r["stability"]["vs_last"], marker="o",
            label=label)
  ax.set_xlabel("checkpoint step (interval end)")
  ax.set_ylabel("Spearman ρ vs last interval")
  ax.legend()
  figs.append(common.save_figure(fig, out_dir, "gated_lpi_stability.png"))
  return common.Report("\n".join(md), figs, results)
