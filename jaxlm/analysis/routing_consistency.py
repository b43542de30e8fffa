"""Local routing consistency of MoE models (moe-lrc): SRP and SCH.

Input: a routing trace, ids [n_seqs, seq, k] int (expert ids chosen for each token of one
layer, -1 = no expert), from `probe_forward(..., record_routing=True)`. Segments and caches
never cross sequence boundaries (each sequence is its own stream; the cache starts empty).

Segment Routing best Performance, SRP(m)
  For every sliding segment of m consecutive tokens (stride 1) let c_e = number of the
  segment's tokens routed to expert e and A = sum_e c_e (= m k for top-k routing). Predicting
  the expert set S_p = {e : c_e >= p} for every token of the segment has TP = sum_{e in S_p} c_e,
  m |S_p| predicted and A actual routing decisions, so F1_p = 2 TP / (m |S_p| + A). The
  segment's best set is the p with the largest F1 (ties: the largest p, i.e. the smallest set;
  the sets S_p are the prefixes of the experts sorted by count that end at a tie boundary).
  SRP(m) = micro average over segments: 2 sum TP* / sum (m |S*| + A), at each segment's best p.
  SRP = 1 iff every segment routes all of its tokens to the same k experts.

Segment Cache best Hit rate, SCH(m, C)
  A cache of C experts per layer, filled on demand. Token t requests its experts (its k ids);
  a request is a hit if the expert is cached; a miss loads it, evicting, when the cache is
  full, the cached expert (other than those the current token requests) with the fewest uses
  in the next m tokens t+1..t+m (its segment-future count), ties broken by least recent use.
  SCH(m, C) = hits / requests. As m grows this approaches Belady's optimal policy (evict what
  is needed least soon); m = 0 degenerates to LRU. Also reported: pure LRU and Belady (evict
  the cached expert whose next use is furthest away, MIN), as lower and upper references.
"""
from __future__ import annotations

import numpy as np


def _seqs(ids) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None, :, None]
  elif ids.ndim == 2:
    ids = ids[None]
  return ids.astype(np.int64)


def window_counts(ids_sk, n_experts: int, m: int) -> np.ndarray:
  """ids [seq, k] -> counts [seq - m + 1, E] of each expert in each window of m tokens."""
  s, _ = ids_sk.shape
  onehot = np.zeros((s, n_experts), np.int64)
  for j in range(ids_sk.shape[1]):
    valid = ids_sk[:, j] >= 0
    np.add.at(onehot, (np.nonzero(valid)[0], ids_sk[valid, j]), 1)
  cs = np.concatenate([np.zeros((1, n_experts), np.int64), np.cumsum(onehot, axis=0)])
  return cs[m:] - cs[:-m]


def srp_parts(ids, n_experts: int, m: int) -> tuple[float, float, int]:
  """(sum of 2 TP*, sum of (m |S*| + A), number of segments) over all segments of length m."""
  num = den = 0.0
  n = 0
  for seq in _seqs(ids):
    if seq.shape[0] < m:
      continue
    c = window_counts(seq, n_experts, m)                     # [W, E]
    a = c.sum(axis=1)                                        # actual decisions per window
    srt = -np.sort(-c, axis=1)                               # counts, descending
    tp = np.cumsum(srt, axis=1)                              # TP of the top-j set, j = 1..E
    j = np.arange(1, n_experts + 1)[None, :]
    dens = m * j + a[:, None]
    f1 = 2.0 * tp / np.maximum(dens, 1)
    # threshold sets only: prefixes ending at a tie boundary, without zero-count experts
    boundary = np.concatenate([srt[:, :-1] != srt[:, 1:], np.ones((c.shape[0], 1), bool)], 1)
    f1 = np.where(boundary & (srt > 0), f1, -1.0)
    best = np.argmax(f1, axis=1)                             # ties: the smallest best set
    rows = np.arange(c.shape[0])
    num += float(np.sum(2.0 * tp[rows, best]))
    den += float(np.sum(dens[rows, best]))
    n += c.shape[0]
  return num, den, n


def srp(ids, n_experts: int, m: int) -> float:
  """Segment Routing best Performance for segment length m (module docstring); nan when no
  sequence is at least m tokens long."""
  num, den, n = srp_parts(ids, n_experts, m)
  return num / den if n and den else float("nan")


def _simulate(seq, capacity: int, policy: str, m: int, n_experts: int) -> tuple[int, int]:
  """(hits, requests) of one sequence's requests through a cache of `capacity` experts."""
  s = seq.shape[0]
  if policy == "segment":
    onehot = np.zeros((s, n_experts), np.int64)
    for j in range(seq.shape[1]):
      valid = seq[:, j] >= 0
      np.add.at(onehot, (np.nonzero(valid)[0], seq[valid, j]), 1)
    cs = np.concatenate([np.zeros((1, n_experts), np.int64), np.cumsum(onehot, axis=0)])
  if policy == "belady":
    # next_use[t][e]: first t' > t where e is requested (s if never)
    next_use = np.full((s + 1, n_experts), s, np.int64)
    for t in range(s - 1, -1, -1):
      next_use[t] = next_use[t + 1]
      for e in seq[t]:
        if e >= 0:
          next_use[t, e] = t
  cache: dict[int, int] = {}          # expert -> last use time
  hits = reqs = 0
  for t in range(s):
    wanted = [int(e) for e in seq[t] if e >= 0]
    for e in wanted:
      reqs += 1
      if e in cache:
        hits += 1
      else:
        if len(cache) >= capacity:
          cands = [c for c in cache if c not in wanted] or list(cache)
          if policy == "lru":
            victim = min(cands, key=lambda c: cache[c])
          elif policy == "belady":
            victim = max(cands, key=lambda c: (next_use[t + 1, c], -cache[c]))
          else:  # segment: fewest uses in t+1..t+m, ties -> least recently used
            hi = min(s, t + 1 + m)
            victim = min(cands, key=lambda c: (cs[hi, c] - cs[t + 1, c], cache[c]))
          del cache[victim]
        cache[e] = t
      cache[e] = t
  return hits, reqs


def cache_hit_rate(ids, n_experts: int, capacity: int, policy: str = "segment",
                   m: int = 16) -> float:
  """Hit rate of a per-layer expert cache (module docstring). policy: segment | lru | belady.
  capacity >= 1 experts; m is the segment length of the segment policy."""
  if capacity < 1:
    raise ValueError(f"cache capacity must be >= 1, got {capacity}")
  if policy not in ("segment", "lru", "belady"):
    raise ValueError(f"unknown cache policy {policy!r}")
  hits = reqs = 0
  for seq in _seqs(ids):
    h, r = _simulate(seq, capacity, policy, m, n_experts)
    hits += h
    reqs += r
  return hits / reqs if reqs else float("nan")


def sch(ids, n_experts: int, m: int, capacity: int) -> float:
  """Segment Cache best Hit rate SCH(m, C)."""
  return cache_hit_rate(ids, n_experts, capacity, "segment", m)


# --------------------------------------------------------------------------- model level

def routing_trace(fm, params, tokens) -> np.ndarray:
  """ids [L, n_seqs, seq, k] of a model on tokens [n_seqs, seq] (probe_forward routing)."""
  import jax
  from jaxlm.analysis.common import probe_forward
  out = jax.jit(lambda p, t: probe_forward(fm, p, t, record_routing=True)["routing"]["ids"])(
      params, tokens)
  return np.asarray(out)


def analyze(trace, n_experts: int, top_k: int, segment_lengths=(4, 16, 64),
            capacities=None) -> dict:
  """SRP per layer and segment length, SCH (and LRU/Belady) per layer, cache size and m.

  trace: ids [L, n, s, k]. capacities default: k, 2k, 4k (capped at n_experts).
  Returns {"srp": {m: [L]}, "sch": {(m, C): [L]}, "lru": {C: [L]}, "belady": {C: [L]}}.
  """
  trace = np.asarray(trace)
  if capacities is None:
    capacities = sorted({min(n_experts, c * top_k) for c in (1, 2, 4)})
  out = {"srp": {}, "sch": {}, "lru": {}, "belady": {}, "segment_lengths": list(segment_lengths),
         "capacities": list(capacities), "n_layers": trace.shape[0]}
  for m in segment_lengths:
    out["srp"][m] = [srp(trace[l], n_experts, m) for l in range(trace.shape[0])]
  for c in capacities:
    out["lru"][c] = [cache_hit_rate(trace[l], n_experts, c, "lru") for l in range(trace.shape[0])]
    out["belady"][c] = [cache_hit_rate(trace[l], n_experts, c, "belady")
                        for l in range(trace.shape[0])]
    for m in segment_lengths:
      out["sch"][(m, c)] = [sch(trace[l], n_experts, m, c) for l in range(trace.shape[0])]
  return out


def random_trace_baseline(trace, n_experts: int, seed: int = 0) -> np.ndarray:
  """The same number of tokens routed uniformly at random (k distinct experts per token): the
  consistency a router without any locality would show."""
  trace = np.asarray(trace)
  rng = np.random.default_rng(seed)
  k = trace.shape[-1]
  flat = trace.reshape(-1, k)
  rand = np.argsort(rng.random((flat.shape[0], n_experts)), axis=1)[:, :k]
  return np.where(flat >= 0, rand, -1).reshape(trace.shape)


def report(results: dict, label: str) -> str:
  """Markdown tables of `analyze` output."""
  from jaxlm.analysis.common import markdown_table
  n_layers = results["n_layers"]
  ms, cs = results["segment_lengths"], results["capacities"]
  rows = [[f"layer {l}"] + [results["srp"][m][l] for m in ms] for l in range(n_layers)]
  rows.append(["mean"] + [float(np.nanmean(results["srp"][m])) for m in ms])
  text = [f"**{label}: SRP(m)** (micro-averaged best-set F1 over sliding segments)\n",
          markdown_table(["layer"] + [f"m={m}" for m in ms], rows), ""]
  head = ["cache C"] + [f"SCH m={m}" for m in ms] + ["LRU", "Belady"]
  rows = [[c] + [float(np.nanmean(results["sch"][(m, c)])) for m in ms]
          + [float(np.nanmean(results["lru"][c])), float(np.nanmean(results["belady"][c]))]
          for c in cs]
  text += [f"**{label}: cache hit rate** (mean over layers)\n", markdown_table(head, rows), ""]
  return "\n".join(text)
