"""Experiment 4: SymbolicLight ablations at matched budgets (arXiv 2605.21333).

Variants (same data, steps and optimiser; jaxlm/config.py SpikingConfig switches):
  full           LIF encoder, dual-path SparseTCAM (decay + spike-gated local attention),
                 dynamic prior head
  no_attn        mixer=decay (the spike-gated local attention path removed)
  decay_only     mixer=decay + head=static_prior (the paper's "decay only")
  static_prior   head=static_prior (prior net replaced by a learned vocabulary bias)
  topk_matched   encoder=topk keeping the fraction of channels the trained `full` model's LIF
                 encoder fires on validation data (matched sparsity)
  topk_0.11      encoder=topk with the paper's fraction 0.11 (floor(0.11 d) channels)
Reported: validation loss / perplexity, encoder activation sparsity (1 - encoder spike rate),
in-block spike rate, FFN spike rate and the fraction of active tokens, all on validation data.

  python experiments/ablate_symboliclight.py --preset=tiny --steps=300 --out_dir=/tmp/ablate_sl
  python experiments/ablate_symboliclight.py --preset=paper --out_dir=runs/ablate_symboliclight

--preset=paper: symboliclight_194m and its ablation presets (0.5B tokens each by default;
--steps shortens). --preset=tiny: tiny_symboliclight_cpu shrunk for the shared 2-core CPU
(d_model 64, spiking FFN 256, local window 32, batch 8 x 64 tokens).
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags

import ablation_common as ac

ac.add_common_flags(flags, default_steps=300, default_out="runs/ablate_symboliclight")
_ONLY = flags.DEFINE_list("only", [], "run only these variant names (tests)")

SPIKE_KEYS = ("spiking/activation_sparsity", "spiking/encoder_spike_rate", "spiking/spike_rate",
              "spiking/ffn_spike_rate", "spiking/active_fraction")


def base_config(preset: str):
  from jaxlm.configs import get_preset
  if preset == "tiny":
    base = get_preset("tiny_symboliclight_cpu")
    m = dataclasses.replace(base.model, d_model=64, d_ff=256, spiking=dataclasses.replace(
        base.model.spiking, window=32))
    return dataclasses.replace(base, model=m, train=dataclasses.replace(
        base.train, batch_size=8, seq_len=64))
  base = get_preset("symboliclight_194m")
  ablation = get_preset("symboliclight_194m_topk")  # the ablations' 0.5B-token budget
  return dataclasses.replace(base, train=ablation.train)


def variants(preset: str) -> list:
  base = base_config(preset)
  full = dataclasses.replace(base, name="full")
  return [
      full,
      ac.replace_spiking(base, "no_attn", mixer="decay"),
      ac.replace_spiking(base, "decay_only", mixer="decay", head="static_prior"),
      ac.replace_spiking(base, "static_prior", head="static_prior"),
      ac.replace_spiking(base, "topk_0.11", encoder="topk", topk_fraction=0.11),
  ]


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  cfgs = variants(f.preset)
  if _ONLY.value:
    cfgs = [c for c in cfgs if c.name in _ONLY.value or c.name == "full"]
  runs = os.path.join(f.out_dir, "runs")
  cfgs = [ac.with_train(c, f, os.path.join(runs, c.name)) for c in cfgs]
  curves = [ac.train_or_load(cfgs[0], f.reuse, eval_every=f.eval_every)]
  rate = curves[0].val_aux["spiking/encoder_spike_rate"]
  d = cfgs[0].model.d_model
  # topk keeps floor(fraction * d) channels: aim at the LIF rate, at least one channel
  frac = max(rate, 1.0 / d) + 0.5 / d
  matched = ac.with_train(ac.replace_spiking(cfgs[0], "topk_matched", encoder="topk",
                                             topk_fraction=min(frac, 1.0)),
                          f, os.path.join(runs, "topk_matched"))
  rest = cfgs[1:]
  if not _ONLY.value or "topk_matched" in _ONLY.value:
    rest = rest + [matched]
  for c in rest:
    curves.append(ac.train_or_load(c, f.reuse, eval_every=f.eval_every))
  write(curves, f.out_dir)


def write(curves, out_dir: str):
  os.makedirs(out_dir, exist_ok=True)
  full = curves[0]
  rows = []
  for c in curves:
    sp = c.cfg.model.spiking
    v = c.val_aux
    kept = (int(sp.topk_fraction * c.cfg.model.d_model) if sp.encoder == "topk" else None)
    rows.append([c.name, sp.encoder + (f" (k={kept})" if kept is not None else ""), sp.mixer,
                 sp.head, c.params["total"], c.final_val, c.final_ppl,
                 c.final_ppl / full.final_ppl, v.get("accuracy"),
                 *(v.get(k) for k in SPIKE_KEYS), c.tokens_per_s])
  table = ac.markdown_table(
      ["variant", "encoder", "mixer", "head", "params", "val loss", "val ppl", "ppl / full",
       "val acc", "encoder sparsity", "encoder spike rate", "block spike rate",
       "FFN spike rate", "active tokens", "train tok/s"], rows)
  ac.plot_curves(curves, os.path.join(out_dir, "loss_curves.png"), "SymbolicLight ablations")
  ac.plot_bars([c.name for c in curves], [c.final_ppl for c in curves],
               os.path.join(out_dir, "ppl.png"), "final validation perplexity", "perplexity",
               baseline=full.final_ppl)
  sections = [("Final validation metrics (spike statistics on validation data)", table),
              ("Plots", "loss_curves.png (train/val curves), ppl.png (final perplexity)")]
  ac.write_results(out_dir, "SymbolicLight ablations", sections, ac.command_line(),
                   {"curves": [c.summary() for c in curves]})
  print(table)


if __name__ == "__main__":
  app.run(main)
