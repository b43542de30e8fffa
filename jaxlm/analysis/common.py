"""Shared pieces of the analysis tools: a probing forward pass, parameter views, runs, output.

Probing forward (`probe_forward`)
---------------------------------
The analysis tools need three things the training forward does not expose: the routing
decisions of every MoE layer, per-token restrictions of the experts a router may choose
(DES coresets), and masks on attention heads. Rather than threading analysis-only arguments
through `jaxlm/models/transformer.py`, `probe_forward` runs the model's own modules (its
`Block`s' attention, norms, SwiGLU, `MoEFFN` and `Router`, the `ExpertPool`, the head) layer by
layer in a Python loop, with the same arithmetic as `Transformer._dense_forward` /
`_moe_forward` (no KV cache, no segment ids). `tests/jaxlm/test_analysis.py` checks that its
logits equal `fm.apply`'s for dense, vanilla-MoE and UniPool models, so a change in the model
that this loop misses fails a test instead of silently skewing an analysis.

  * expert restriction: `expert_mask_fn(layer, routing) -> bool [b, s, E] | None` is called
    with the layer's unrestricted routing (ids/scores/gates reshaped [b, s, ...]) and its
    result is passed as `MoEFFN(..., expert_mask=...)` (masked experts cannot be chosen; the
    router's own masking semantics apply: -inf logits for softmax, z_i = 0 before the norm for
    NormRouter). Layer l's mask is chosen from layer l's scores computed on the hidden state
    that the restricted layers < l produced (sequential, as at decode time).
  * head masks: masking head h of layer l (multiplying its attention output o_h by m) is exactly
    multiplying `wo[l, h]` by m, since y = sum_h o_h wo_h; `scale_heads(params, mask)` does that
    on the params, so masks and head-mask gradients need no model change.

Parameter views: with model.scan_layers the block params are stacked [L, ...]; without it they
are a per-layer mapping. `stacked_blocks` / `with_stacked_blocks` convert between the two.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.layers.expert_pool import pool_of_layer


# --------------------------------------------------------------------------- params

def stacked_blocks(params: dict) -> dict:
  """Block params with a leading layers axis (whatever model.scan_layers was)."""
  blocks = params["blocks"]
  keys = list(blocks)
  if keys and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
    order = sorted(keys, key=int)
    return jax.tree.map(lambda *a: jnp.stack(a), *[blocks[k] for k in order])
  return blocks


def with_stacked_blocks(params: dict, stacked: dict) -> dict:
  """params with its blocks replaced by `stacked` [L, ...], in params' own layout."""
  blocks = params["blocks"]
  keys = list(blocks)
  out = dict(params)
  if keys and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
    out["blocks"] = {k: jax.tree.map(lambda a, i=int(k): a[i], stacked) for k in keys}
  else:
    out["blocks"] = stacked
  return out


def scale_heads(params: dict, head_mask) -> dict:
  """Multiply each attention head's output by head_mask [L, H] (0 = masked head).

  Implemented on the output projection: y = sum_h o_h wo_h, so scaling wo[l, h] by m scales
  head h's contribution exactly as masking o_h would (differentiable in head_mask)."""
  blocks = stacked_blocks(params)
  attn = dict(blocks["attn"])
  wo = attn["wo"]
  attn["wo"] = wo * jnp.asarray(head_mask, wo.dtype)[:, :, None, None]
  return with_stacked_blocks(params, dict(blocks, attn=attn))


# --------------------------------------------------------------------------- forward

def _layer_modules(model) -> list:
  if model.cfg.scan_layers:
    graphdef, state = nnx.split(model.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(model.cfg.n_layers)]
  return list(model.blocks)


def probe_forward(fm, params: dict, tokens, *, expert_mask_fn: Callable | None = None,
                  record_routing: bool = False) -> dict:
  """Forward of a transformer (dense / vanilla / unipool) layer by layer (module docstring).

  tokens [b, s] int32. Returns dict(logits [b, s, V] f32) and, with record_routing (MoE),
  routing = dict(ids [L, b, s, k], scores [L, b, s, E], gates [L, b, s, k]) of the routing the
  layers actually used (after any expert mask, before capacity dropping).
  """
  cfg = fm.cfg
  if cfg.kind != "transformer":
    raise ValueError(f"probe_forward supports model.kind=transformer, got {cfg.kind!r}")
  model = fm.module(params)
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
  x = model.embed(tokens, jnp.dtype(cfg.dtype))
  moe = cfg.moe.kind != "none"
  pools = model.pool.arrays() if moe else None
  prev = jnp.zeros((b, s, cfg.moe.n_routed), jnp.float32) if moe and cfg.moe.gating_residual \
      else None
  recorded = []
  for layer, blk in enumerate(_layer_modules(model)):
    h, _ = blk.attn(blk.attn_norm(x), positions, None, None)
    x = x + h
    xn = blk.mlp_norm(x)
    if not moe:
      x = x + blk.mlp(xn)
      continue
    g = pool_of_layer(layer, cfg.n_layers, cfg.n_pools)
    experts = jax.tree.map(lambda a: a[g], pools)
    x2 = xn.reshape(b * s, -1)
    prev2 = None if prev is None else prev.reshape(b * s, -1)
    mask2 = None
    if expert_mask_fn is not None:
      free = blk.moe.router(x2, prev2)
      mask = expert_mask_fn(layer, _bs(free, b, s))
      if mask is not None:
        mask2 = jnp.asarray(mask, bool).reshape(b * s, -1)
    y, logits, _ = blk.moe(xn, experts, prev, expert_mask=mask2)
    if record_routing:
      recorded.append(_bs(blk.moe.router(x2, prev2, mask2), b, s))
    x = x + y
    if prev is not None:
      prev = logits
  out = {"logits": model.to_logits(x)}
  if record_routing and moe:
    out["routing"] = {k: jnp.stack([r[k] for r in recorded]) for k in ("ids", "scores", "gates")}
  return out


def _bs(routing, b: int, s: int) -> dict:
  return {"ids": routing.ids.reshape(b, s, -1), "scores": routing.scores.reshape(b, s, -1),
          "gates": routing.gates.reshape(b, s, -1)}


def token_logprobs(logits, targets):
  """log p(targets) [b, s] from logits [b, s, V]."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


def sum_logprob(fm, params, tokens, targets, weights=None):
  """sum_t w_t log p_params(target_t | tokens_<=t), through fm.apply (the training forward)."""
  logits, _ = fm.apply(params, tokens)
  lp = token_logprobs(logits, targets)
  return jnp.sum(lp if weights is None else lp * weights)


# --------------------------------------------------------------------------- runs

TINY_STEPS = 200


def tiny_config(kind: str, out_dir: str, steps: int = TINY_STEPS, checkpoint_every: int = 50,
                batch_size: int = 8, seq_len: int = 64, extra: Sequence[str] = ()):
  """Config of a CPU-sized run for the analyses: kind in {dense, moe, unipool, moe_top2}.

  dense is tiny_cpu narrowed to the MoE presets' width (d_model 128, d_ff 512 = one expert),
  so the dense model has the MoE models' active parameters; moe = tiny_vanilla_moe_cpu
  (4 experts per layer, top-1), unipool = tiny_unipool_cpu (one pool of 16, NormRouter top-1),
  moe_top2 = tiny_vanilla_moe_cpu with top_k=2 (DES needs K > 1 to have choices to share).
  Checkpoints every `checkpoint_every` steps, all kept (a series for Gated-LPI).
  """
  from jaxlm import config as config_lib
  from jaxlm import configs
  preset = {"dense": "tiny_cpu", "moe": "tiny_vanilla_moe_cpu", "unipool": "tiny_unipool_cpu",
            "moe_top2": "tiny_vanilla_moe_cpu"}[kind]
  sets = [f"train.steps={steps}", f"train.batch_size={batch_size}", f"train.seq_len={seq_len}",
          f"train.warmup_steps={max(1, min(20, steps // 10))}",
          f"train.checkpoint_every={checkpoint_every}", "train.keep_checkpoints=1000",
          f"train.eval_every={steps}", "train.eval_batches=2",
          f"train.log_every={max(1, min(50, steps))}", "train.async_checkpoint=false",
          f"train.output_dir={os.path.join(out_dir, kind)}", "mesh.data=1"]
  if kind == "dense":
    sets += ["model.d_model=128", "model.d_ff=512", "model.rope_base=1000000.0"]
  if kind == "moe_top2":
    sets += ["model.moe.top_k=2"]
  return config_lib.apply_overrides(configs.get_preset(preset), sets + list(extra))


def train_run(cfg, *, save_initial: bool = True) -> str:
  """Train cfg (resuming if its output_dir has checkpoints); also saves the initial params as
  checkpoint 0 so that the series starts at initialisation. Returns the run directory."""
  import jax as _jax
  from jaxlm.train.loop import Trainer
  run_dir = cfg.train.output_dir
  trainer = Trainer(cfg, devices=_jax.devices()[:1])
  try:
    steps = trainer.ckpt.all_steps()
    if steps and steps[-1] >= cfg.train.steps:
      return run_dir
    if save_initial and not steps:
      trainer.save(trainer.initial_state())
      trainer.ckpt.wait()
    trainer.run(progress=False)
  finally:
    trainer.close()
  return run_dir


def checkpoint_steps(run_dir: str) -> list[int]:
  from jaxlm.train.checkpoint import Checkpointer
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=1_000_000, async_save=False)
  try:
    return list(ckpt.all_steps())
  finally:
    ckpt.close()


def load(run_dir: str, step: int | None = None):
  """jaxlm.train.restore.load_run on one device."""
  from jaxlm.train.restore import load_run
  return load_run(run_dir, step, mesh_devices=jax.devices()[:1])


def val_tokens(run, n_seqs: int, seq_len: int | None = None) -> dict:
  """The first n_seqs validation windows of a run: dict(inputs, targets) int32 [n, seq]."""
  from jaxlm.data import make_val_batches
  seq_len = seq_len or run.cfg.train.seq_len
  batches = make_val_batches(run.cfg.data, tokenizer=run.tokenizer, seq_len=seq_len,
                             batch_size=n_seqs, max_batches=1)
  b = batches[0]
  return {"inputs": jnp.asarray(b["inputs"]), "targets": jnp.asarray(b["targets"])}


# --------------------------------------------------------------------------- output

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  def fmt(v):
    if isinstance(v, (float, np.floating)):
      if math.isnan(v):
        return "nan"
      return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


def write_text(out_dir: str, name: str, text: str) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text if text.endswith("\n") else text + "\n")
  return path


def new_figure(ncols: int = 1, width: float = 4.5, height: float = 3.2):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
  return fig, list(axes[0])


def save_figure(fig, out_dir: str, name: str) -> str:
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


@dataclasses.dataclass
class Report:
  """What a tool writes: markdown (tables + notes) and the PNGs it saved."""
  markdown: str
  figures: list
  data: dict


# --------------------------------------------------------------------------- scripts

def resolve_runs(runs: Sequence[str], preset: str, work_dir: str, kinds: Sequence[str],
                 train_steps: int, checkpoint_every: int, extra: Sequence[str] = ()) -> dict:
  """{label: run_dir} for a script: `runs` entries `label=run_dir` (trained runs), or with
  preset=tiny the CPU runs of `kinds` trained (or resumed) under work_dir."""
  if runs:
    out = {}
    for item in runs:
      label, sep, path = item.partition("=")
      if not sep:
        label, path = os.path.basename(os.path.normpath(item)), item
      out[label] = path
    return out
  if preset != "tiny":
    raise ValueError(f"--preset={preset!r}: pass --runs=label=run_dir, or use --preset=tiny")
  out = {}
  for kind in kinds:
    cfg = tiny_config(kind, work_dir, steps=train_steps, checkpoint_every=checkpoint_every,
                      extra=extra)
    out[kind] = train_run(cfg)
  return out


def finish(report: Report, out_dir: str, name: str, command: str) -> str:
  """Write <out_dir>/<name>.md (command + tables + figure links); returns the path."""
  figs = "\n".join(f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in report.figures)
  text = f"Command: `{command}`\n\n{report.markdown}\n{figs}\n"
  path = write_text(out_dir, f"{name}.md", text)
  print(text)
  return path
