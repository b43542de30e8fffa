"""Experiment 5: MoE++ and BlockFFN options vs a vanilla MoE of the same size.

Variants (same FFN experts: n_experts SwiGLU experts per layer of the same width):
  vanilla    softmax top-k (renormalised), per-layer balance loss
  moepp      MoE++: + zero / copy / constant experts (1 / 1 / 2), gating residual
             (logits_l = W_l x + G_l logits_{l-1}), same top-k, balance loss over all experts
  blockffn   BlockFFN: router RMSNorm(ReLU(W x)) (a token uses every expert with a positive
             score, at most top_k = n_experts), L1 token-sparsity + locality + chunk-sparsity
             losses, balance loss
Reported (validation data): loss / perplexity / accuracy; FFN expert assignments per token (the
compute the experts do); token-level sparsity = 1 - fraction of the FFN experts a token uses;
chunk-level sparsity = 1 - fraction of FFN experts used by any token of an 8-token chunk
(moe_losses.active_fractions); measured throughput of the train step and of the forward pass
(tokens/s; the expert layer is dropless through ops.gmm).

  python experiments/ablate_moe_options.py --preset=tiny --steps=300 --out_dir=/tmp/ablate_moe_opts
  python experiments/ablate_moe_options.py --preset=paper --size=182m --out_dir=runs/ablate_moe_options

--preset=paper: the vanilla_moe_<size> shapes (8 experts of 4 d per layer) with top-2 for all
three, as in MoE++; --preset=tiny: 4 layers, d_model 64, 8 experts of width 64, top-2,
batch 8 x 64 tokens. Loss coefficients: --l1, --locality, --chunk, --balance.
On CPU (and for any dense-over-groups gmm) the expert matmul costs the same whatever the
routing, so MoE++'s and BlockFFN's savings show up only in the assignments-per-token column,
not in the measured tokens/s; on GPU/TPU the grouped kernels skip empty work.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import ablation_common as ac

ac.add_common_flags(flags, default_steps=300, default_out="runs/ablate_moe_options")
_SIZE = flags.DEFINE_string("size", "182m", "--preset=paper: model size")
_TOPK = flags.DEFINE_integer("top_k", 2, "top-k of vanilla and MoE++")
_BAL = flags.DEFINE_float("balance", 1e-2, "per-layer balance loss of every variant")
_L1 = flags.DEFINE_float("l1", 5e-2, "BlockFFN L1 (token sparsity) coefficient")
_LOC = flags.DEFINE_float("locality", 1e-2, "BlockFFN locality loss coefficient")
_CHUNK = flags.DEFINE_float("chunk", 1e-1, "BlockFFN chunk sparsity loss coefficient")
_ONLY = flags.DEFINE_list("only", [], "run only these variant names (tests)")


def variants(preset: str, size: str, top_k: int, balance: float, l1: float, locality: float,
             chunk: float) -> list:
  from jaxlm.configs import get_preset
  if preset == "tiny":
    base = ac.tiny_moe_base()
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, d_ff=64))
  else:
    base = get_preset(f"vanilla_moe_{size}")
  common = dict(kind="vanilla", n_experts=8, n_groups=1, pool_balance_loss=0.0,
                balance_loss=balance)
  return [
      ac.replace_moe(base, "vanilla", router="softmax_topk", top_k=top_k, renormalize=True,
                     **common),
      ac.replace_moe(base, "moepp", router="softmax_topk", top_k=top_k, renormalize=True,
                     n_zero_experts=1, n_copy_experts=1, n_constant_experts=2,
                     gating_residual=True, **common),
      ac.replace_moe(base, "blockffn", router="relu_rmsnorm", top_k=8, l1_loss=l1,
                     locality_loss=locality, chunk_sparsity_loss=chunk, chunk_size=8, **common),
  ]


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  cfgs = variants(f.preset, _SIZE.value, _TOPK.value, _BAL.value, _L1.value, _LOC.value,
                  _CHUNK.value)
  if _ONLY.value:
    cfgs = [c for c in cfgs if c.name in _ONLY.value]
  runs = os.path.join(f.out_dir, "runs")
  cfgs = [ac.with_train(c, f, os.path.join(runs, c.name)) for c in cfgs]
  curves = [ac.train_or_load(c, f.reuse, eval_every=f.eval_every) for c in cfgs]
  write(curves, f.out_dir)


def stats(c) -> dict:
  """Validation routing statistics of one trained variant."""
  m = c.cfg.model
  v = c.val_aux
  n = m.moe.n_experts
  token_active = v["moe/token_active"]
  loads = [[v.get(f"moe/layer_load/{l * m.moe.n_routed + e}", 0.0) for e in range(m.moe.n_routed)]
           for l in range(m.n_layers)]
  ffn_slots = sum(sum(row[:n]) for row in loads) / m.n_layers   # FFN share of the k slots
  return {"ffn_per_token": token_active * n, "token_sparsity": 1 - token_active,
          "chunk_sparsity": 1 - v["moe/chunk_active"], "ffn_slot_share": ffn_slots,
          "layer_token_sparsity": [1 - v[f"moe/layer_token_active/{l}"] for l in range(m.n_layers)],
          "layer_chunk_sparsity": [1 - v[f"moe/layer_chunk_active/{l}"] for l in range(m.n_layers)]}


def write(curves, out_dir: str):
  import numpy as np
  os.makedirs(out_dir, exist_ok=True)
  van = next((c for c in curves if c.name == "vanilla"), curves[0])
  rows, extra = [], {}
  for c in curves:
    s = stats(c)
    extra[c.name] = s
    m = c.cfg.model.moe
    rows.append([c.name, m.router, m.top_k, m.n_experts, m.n_extra_experts, c.params["total"],
                 c.final_val, c.final_ppl, c.final_val - van.final_val, c.val_aux["accuracy"],
                 s["ffn_per_token"], s["token_sparsity"], s["chunk_sparsity"], c.tokens_per_s,
                 c.tokens_per_s / van.tokens_per_s, c.eval_tokens_per_s,
                 c.eval_tokens_per_s / van.eval_tokens_per_s])
  table = ac.markdown_table(
      ["variant", "router", "top-k", "FFN experts", "extra experts", "params", "val loss",
       "val ppl", "Δ vs vanilla", "val acc", "FFN experts / token", "token sparsity",
       "8-token chunk sparsity", "train tok/s", "train ×", "forward tok/s", "forward ×"], rows)
  per_layer = ac.markdown_table(
      ["variant"] + [f"layer {l} token / chunk sparsity" for l in
                     range(curves[0].cfg.model.n_layers)],
      [[c.name] + [f"{t:.3f} / {k:.3f}" for t, k in zip(extra[c.name]["layer_token_sparsity"],
                                                        extra[c.name]["layer_chunk_sparsity"])]
       for c in curves])
  ac.plot_curves(curves, os.path.join(out_dir, "loss_curves.png"),
                 "MoE++ / BlockFFN vs vanilla MoE")
  plt = ac._plt()
  fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=90)
  x = np.arange(len(curves))
  ax.bar(x - 0.2, [extra[c.name]["token_sparsity"] for c in curves], 0.4, label="token-level")
  ax.bar(x + 0.2, [extra[c.name]["chunk_sparsity"] for c in curves], 0.4,
         label="8-token chunk-level")
  ax.set_xticks(x)
  ax.set_xticklabels([c.name for c in curves])
  ax.set_ylabel("sparsity (1 - fraction of FFN experts used)")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, axis="y")
  ax.set_title("expert sparsity on validation data", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "sparsity.png"))
  plt.close(fig)
  sections = [("Final validation metrics", table),
              ("Per-layer sparsity (validation)", per_layer),
              ("Plots", "loss_curves.png (train/val curves), sparsity.png (token / chunk "
               "sparsity)")]
  ac.write_results(out_dir, "MoE++ and BlockFFN vs vanilla MoE", sections, ac.command_line(),
                   {"curves": [c.summary() for c in curves], "sparsity": extra})
  print(table)


if __name__ == "__main__":
  app.run(main)
