"""Dynamic Expert Sharing (DES) for parallel / block decoding: DES-Seq and DES-Vote.

The tokens of a block (B consecutive tokens of a sequence; B = the sequence length is
"sequence level") are decoded together; DES makes them share one expert coreset C per block
and MoE layer, so the block loads only |C| experts. Simulated here with teacher forcing over
validation windows: at every MoE layer, from the layer's unrestricted router scores of the
block's tokens (computed on the hidden states that the restricted layers below produced),
  DES-Seq(k')   C = union over the block's tokens of each token's top-k' experts (k' <= K);
  DES-Vote(b)   v_e = sum over the block's tokens of s_{t,e} 1[e in top-K(t)] (each token votes
                its top-K router weights); C = the max(K, ceil(b E)) experts of largest v
                (ties to the lower index);
then every token routes its top-K inside C, with the router's own masking (softmax over the
allowed experts, i.e. renormalised over C; NormRouter: z_i = 0 outside C before the norm),
via `probe_forward(expert_mask_fn=...)`. K = model.moe.top_k, E = router outputs.
Reported per policy: unique experts activated per block and layer (mean; the union of the
ids actually used) and its reduction against unrestricted routing, the loss and next-token
accuracy with and without DES, and "quality kept" = accuracy(DES) / accuracy(unrestricted).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.analysis import common


def _onehot(ids, n: int):
  """ids [..., k] (-1 = none) -> bool [..., n]."""
  return jnp.any(ids[..., None] == jnp.arange(n), axis=-2)


def _per_block(x_bse, block: int, reduce):
  """[b, s, E] -> [b, s, E]: reduce over each block of `block` tokens, broadcast back."""
  b, s, e = x_bse.shape
  nb = -(-s // block)
  pad = nb * block - s
  xp = jnp.pad(x_bse, ((0, 0), (0, pad), (0, 0)))
  r = reduce(xp.reshape(b, nb, block, e), axis=2)                  # [b, nb, E]
  return jnp.repeat(r, block, axis=1)[:, :s]


def seq_coreset(routing: dict, block: int, k_prime: int):
  """DES-Seq mask [b, s, E]: union of each token's top-k' experts over its block."""
  e = routing["scores"].shape[-1]
  top = routing["ids"][..., :k_prime]                              # ids are sorted by score
  return _per_block(_onehot(top, e), block, jnp.any)


def vote_coreset(routing: dict, block: int, beta: float, top_k: int):
  """DES-Vote mask [b, s, E]: the max(K, ceil(beta E)) experts with the largest block vote."""
  scores = routing["scores"]
  e = scores.shape[-1]
  votes = jnp.where(_onehot(routing["ids"], e), scores, 0.0)
  v = _per_block(votes, block, jnp.sum)
  n_keep = min(e, max(top_k, int(math.ceil(beta * e))))
  _, keep = jax.lax.top_k(v, n_keep)
  return _onehot(keep, e)


def policy_fn(policy: str, block: int, param, top_k: int):
  if policy == "seq":
    return lambda layer, routing: seq_coreset(routing, block, int(param))
  if policy == "vote":
    return lambda layer, routing: vote_coreset(routing, block, float(param), top_k)
  if policy == "none":
    return None
  raise ValueError(f"unknown DES policy {policy!r}")


def unique_per_block(ids, block: int) -> float:
  """ids [L, b, s, k] -> mean over layers, sequences and blocks of the distinct experts used."""
  ids = np.asarray(ids)
  n_layers, b, s, k = ids.shape
  vals = []
  for start in range(0, s, block):
    chunk = ids[:, :, start:start + block].reshape(n_layers, b, -1)
    for l in range(n_layers):
      for i in range(b):
        u = np.unique(chunk[l, i])
        vals.append(int(np.sum(u >= 0)))
  return float(np.mean(vals))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _run(fm, params, tokens, policy, block, param, top_k):
  out = common.probe_forward(fm, params, tokens, record_routing=True,
                             expert_mask_fn=policy_fn(policy, block, param, top_k))
  return out["logits"], out["routing"]["ids"]


def evaluate(fm, params, batch, policy: str = "none", block: int = 0, param=None) -> dict:
  """Loss, accuracy and unique experts per block of one DES policy on batch (inputs/targets)."""
  tokens, targets = batch["inputs"], batch["targets"]
  block = block or tokens.shape[1]
  logits, ids = _run(fm, params, tokens, policy, block, param, fm.cfg.moe.top_k)
  lp = common.token_logprobs(logits, targets)
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
  return {"loss": float(-jnp.mean(lp)), "acc": float(acc),
          "unique": unique_per_block(ids, block), "ids": np.asarray(ids)}


def analyze(run_dir: str, *, n_seqs: int = 8, blocks=(8, 0), k_primes=None,
            betas=(0.15, 0.25, 0.5)) -> dict:
  """Every policy at every block size (0 = the whole sequence) on validation windows."""
  run = common.load(run_dir)
  fm = run.fm
  if fm.cfg.moe.kind == "none":
    raise ValueError(f"{run_dir}: DES needs an MoE model")
  batch = common.val_tokens(run, n_seqs)
  k = fm.cfg.moe.top_k
  k_primes = k_primes or sorted({1, max(1, k - 1)})
  rows = []
  seq = batch["inputs"].shape[1]
  for block in blocks:
    base = evaluate(fm, run.params, batch, "none", block)
    policies = [("seq", kp) for kp in k_primes if kp <= k] + [("vote", b) for b in betas]
    for policy, param in policies:
      r = evaluate(fm, run.params, batch, policy, block, param)
      rows.append({"block": block or seq, "policy": f"DES-{policy.capitalize()}",
                   "param": param, "unique_base": base["unique"], "unique": r["unique"],
                   "unique_reduction": 1.0 - r["unique"] / base["unique"],
                   "loss_base": base["loss"], "loss": r["loss"], "acc_base": base["acc"],
                   "acc": r["acc"], "quality_kept": r["acc"] / max(base["acc"], 1e-9)})
  return {"rows": rows, "moe": fm.cfg.moe.kind, "n_experts": fm.cfg.moe.n_routed, "top_k": k,
          "step": run.step}


def report(results: dict, out_dir: str) -> common.Report:
  md = ["### DES expert sharing (teacher-forced blocks of validation windows)\n"]
  table = []
  for label, r in results.items():
    for row in r["rows"]:
      table.append([label, f"{r['n_experts']}/top-{r['top_k']}", row["block"], row["policy"],
                    row["param"], row["unique_base"], row["unique"], row["unique_reduction"],
                    row["loss_base"], row["loss"], row["acc_base"], row["acc"],
                    row["quality_kept"]])
  md += [common.markdown_table(
      ["model", "E/K", "block", "policy", "k' / β", "unique experts (base)", "unique (DES)",
       "reduction", "loss (base)", "loss (DES)", "acc (base)", "acc (DES)", "quality kept"],
      table), ""]
  fig, axes = common.new_figure(len(results))
  for ax, (label, r) in zip(axes, results.items()):
    for block in sorted({row["block"] for row in r["rows"]}):
      pts = [row for row in r["rows"] if row["block"] == block]
      ax.scatter([p["unique_reduction"] for p in pts], [p["quality_kept"] for p in pts],
                 label=f"block {block}")
      for p in pts:
        ax.annotate(f"{p['policy'][4]}{p['param']}", (p["unique_reduction"], p["quality_kept"]),
                    fontsize=6)
    ax.set_title(label)
    ax.set_xlabel("unique-expert reduction")
    ax.set_ylabel("accuracy kept")
    ax.legend(fontsize=7)
  figs = [common.save_figure(fig, out_dir, "expert_sharing.png")]
  return common.Report("\n".join(md), figs, results)
