"""Config validation: ConfigError naming the first invalid field, before anything compiles.

`validate` checks one Config on its own (types, ranges, cross-field consistency);
`validate_for_devices` adds the checks that depend on the device count. The choice tuples
below are the allowed values of the string fields.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from jaxlm.config_model import ModelConfig
from jaxlm.config_run import Config, ConfigError

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_only", "dots_no_batch", "dots_and_acts")
ATTENTION_KINDS = ("full", "sliding", "nsa")
MOE_KINDS = ("none", "vanilla", "unipool")
POOL_GRADS = ("per_layer", "deferred")
FSDP_DISPATCHES = ("auto", "gather_weights", "split_embed")
MU_DTYPES = ("float32", "bfloat16")
ROUTERS = ("softmax_topk", "norm_router", "relu_rmsnorm")
MODEL_KINDS = ("transformer", "symboliclight")
SPIKING_ENCODERS = ("lif", "topk")
SPIKING_MIXERS = ("dual", "decay", "attention")
SPIKING_HEADS = ("dynamic_prior", "static_prior")
SPIKING_RESETS = ("hard", "subtract")
SPIKING_SURROGATES = ("atan", "sigmoid", "triangle")


def field_types(cls) -> dict[str, Any]:
  """{field name: resolved type} of a config dataclass (shared with the override parser)."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check(cond: bool, key: str, msg: str):
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def _check_types(obj, prefix: str):
  for name, tp in field_types(type(obj)).items():
    value = getattr(obj, name)
    key = f"{prefix}{name}"
    if dataclasses.is_dataclass(tp):
      _check(isinstance(value, tp), key, f"expected a {tp.__name__} section")
      _check_types(value, key + ".")
    elif tp is float:
      _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
             f"expected a number, got {value!r}")
      _check(math.isfinite(value), key, f"must be finite, got {value!r}")
    elif tp in (int, bool, str):
      ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
      _check(ok, key, f"expected {tp.__name__}, got {value!r}")


def validate(cfg: Config) -> Config:
  """Raise ConfigError naming the first invalid field; return cfg unchanged otherwise."""
  _check_types(cfg, "")
  m, t, d = cfg.model, cfg.train, cfg.data
  _check(m.kind in MODEL_KINDS, "model.kind", f"{m.kind!r} not in {MODEL_KINDS}")
  for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
    _check(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
  _check(m.head_dim >= 0, "model.head_dim", f"must be >= 0 (0 = d_model // n_heads), got {m.head_dim}")
  if m.head_dim == 0:
    _check(m.d_model % m.n_heads == 0, "model.n_heads",
           f"{m.n_heads} heads do not divide model.d_model={m.d_model} (or set model.head_dim)")
  _check(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
         f"{m.n_kv_heads} kv heads do not divide model.n_heads={m.n_heads}")
  _check(m.resolved_head_dim % 2 == 0, "model.head_dim",
         f"RoPE needs an even head_dim, got {m.resolved_head_dim}")
  _check(m.rope_base > 1, "model.rope_base", f"must be > 1, got {m.rope_base}")
  _check(m.norm_eps > 0, "model.norm_eps", f"must be > 0, got {m.norm_eps}")
  _check(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}")
  _check(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} not in {DTYPES}")
  _check(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} not in {DTYPES}")
  _check(m.remat in REMAT, "model.remat", f"{m.remat!r} not in {REMAT}")
  a = m.attention
  _check(a.kind in ATTENTION_KINDS, "model.attention.kind", f"{a.kind!r} not in {ATTENTION_KINDS}")
  _check(a.window >= 0, "model.attention.window", f"must be >= 0, got {a.window}")
  if a.kind == "sliding":
    _check(a.window >= 1, "model.attention.window", "sliding attention needs window >= 1")
  _check(a.soft_cap >= 0, "model.attention.soft_cap", f"must be >= 0, got {a.soft_cap}")
  if a.kind == "nsa":
    _validate_nsa(m)
  _validate_moe(m)
  if m.kind == "symboliclight":
    _validate_spiking(m)

  for k in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
            "eval_batches", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
            "loss_chunks"):
    _check(getattr(t, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(t, k)}")
  _check(t.seq_len % t.loss_chunks == 0, "train.loss_chunks",
         f"{t.loss_chunks} does not divide train.seq_len={t.seq_len} (chunks run along the "
         "sequence)")
  _check(t.seq_len <= m.max_seq_len, "train.seq_len",
         f"{t.seq_len} is longer than the RoPE table model.max_seq_len={m.max_seq_len}")
  _check(t.batch_size % t.grad_accum == 0, "train.grad_accum",
         f"{t.grad_accum} does not divide train.batch_size={t.batch_size}")
  _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
  _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
  _check(0 <= t.warmup_steps < t.steps, "train.warmup_steps",
         f"must be in [0, train.steps={t.steps}), got {t.warmup_steps}")
  _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
  _check(0 <= t.b1 < 1, "train.b1", f"must be in [0, 1), got {t.b1}")
  _check(0 <= t.b2 < 1, "train.b2", f"must be in [0, 1), got {t.b2}")
  _check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
  _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
  _check(t.mu_dtype in MU_DTYPES, "train.mu_dtype", f"{t.mu_dtype!r}; choose from {MU_DTYPES}")
  _check(t.z_loss >= 0, "train.z_loss", f"must be >= 0, got {t.z_loss}")
  _check(t.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0, got {t.peak_tflops}")
  _check(bool(t.output_dir), "train.output_dir", "must not be empty")

  _check(d.source in ("shakespeare", "files"), "data.source", f"{d.source!r} not in ('shakespeare', 'files')")
  if d.source == "files":
    _check(len(d.paths) > 0, "data.paths", "data.source=files needs at least one path or glob")
  _check(d.tokenizer in ("bpe", "byte"), "data.tokenizer", f"{d.tokenizer!r} not in ('bpe', 'byte')")
  _check(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
  _check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
  if d.tokenizer == "byte":
    _check(m.vocab_size >= 257, "model.vocab_size", f"byte tokenizer needs >= 257, got {m.vocab_size}")

  for n in cfg.mesh.axis_names:
    s = getattr(cfg.mesh, n)
    _check(s == -1 or s >= 1, f"mesh.{n}", f"must be a positive size or -1, got {s}")
  return cfg


def _validate_nsa(m: ModelConfig):
  a, p = m.attention, "model.attention."
  _check(m.kind == "transformer", "model.attention.kind",
         f"nsa is an attention of model.kind=transformer, got model.kind={m.kind!r}")
  for k in ("nsa_block_len", "nsa_stride", "nsa_select_len", "nsa_top_n", "nsa_window"):
    _check(getattr(a, k) >= 1, p + k, f"must be >= 1, got {getattr(a, k)}")
  for k in ("nsa_n_always_first", "nsa_n_local", "nsa_compress_hidden"):
    _check(getattr(a, k) >= 0, p + k, f"must be >= 0, got {getattr(a, k)}")
  forced = a.nsa_n_always_first + a.nsa_n_local
  _check(a.nsa_top_n >= forced, p + "nsa_top_n",
         f"{a.nsa_top_n} selected blocks cannot hold the {forced} always-selected ones "
         f"({p}nsa_n_always_first + {p}nsa_n_local)")
  _check(a.nsa_block_len % a.nsa_stride == 0, p + "nsa_block_len",
         f"{a.nsa_block_len} is not a multiple of {p}nsa_stride={a.nsa_stride}")
  _check(a.nsa_select_len % a.nsa_stride == 0, p + "nsa_select_len",
         f"{a.nsa_select_len} is not a multiple of {p}nsa_stride={a.nsa_stride}")
  _check(a.window == 0, p + "window",
         f"kind=nsa sets its window with {p}nsa_window (leave window=0), got {a.window}")
  _check(a.soft_cap == 0, p + "soft_cap", f"kind=nsa has no logit soft cap, got {a.soft_cap}")


def _validate_moe(m: ModelConfig):
  e = m.moe
  _check(e.kind in MOE_KINDS, "model.moe.kind", f"{e.kind!r} not in {MOE_KINDS}")
  if e.kind == "none":
    return
  _check(e.router in ROUTERS, "model.moe.router", f"{e.router!r} not in {ROUTERS}")
  for k in ("n_experts", "top_k", "n_groups", "norm_router_samples", "chunk_size"):
    _check(getattr(e, k) >= 1, f"model.moe.{k}", f"must be >= 1, got {getattr(e, k)}")
  for k in ("d_expert", "n_shared_experts", "n_zero_experts", "n_copy_experts",
            "n_constant_experts"):
    _check(getattr(e, k) >= 0, f"model.moe.{k}", f"must be >= 0, got {getattr(e, k)}")
  for k in ("capacity_factor", "balance_loss", "pool_balance_loss", "router_z_loss", "l1_loss",
            "locality_loss", "chunk_sparsity_loss"):
    _check(getattr(e, k) >= 0, f"model.moe.{k}", f"must be >= 0, got {getattr(e, k)}")
  _check(e.group_align >= 0, "model.moe.group_align", f"must be >= 0, got {e.group_align}")
  _check(e.locality_alpha > 0, "model.moe.locality_alpha", f"must be > 0, got {e.locality_alpha}")
  _check(e.pool_grad in POOL_GRADS, "model.moe.pool_grad", f"{e.pool_grad!r} not in {POOL_GRADS}")
  if e.pool_grad == "deferred":
    _check(e.kind == "unipool", "model.moe.pool_grad",
           f"'deferred' is for shared pools (moe.kind=unipool), got kind={e.kind!r}")
    _check(e.group_align <= 1, "model.moe.pool_grad",
           f"'deferred' needs model.moe.group_align 0 or 1, got {e.group_align}")
  _check(e.fsdp_dispatch in FSDP_DISPATCHES, "model.moe.fsdp_dispatch",
         f"{e.fsdp_dispatch!r} not in {FSDP_DISPATCHES}")
  per_pool = m.n_layers // max(e.n_groups, 1)
  _check(e.pool_grad_chunk >= 0 and (e.pool_grad_chunk == 0 or per_pool % e.pool_grad_chunk == 0),
         "model.moe.pool_grad_chunk",
         f"{e.pool_grad_chunk} must be 0 or divide the {per_pool} layers of a pool")
  if e.kind == "unipool":
    _check(e.n_routed >= e.top_k, "model.moe.n_experts",
           f"pool size {e.n_experts} (+{e.n_extra_experts} MoE++ experts) is smaller than "
           f"model.moe.top_k={e.top_k}")
    _check(m.n_layers % e.n_groups == 0, "model.moe.n_groups",
           f"{e.n_groups} pool groups do not divide model.n_layers={m.n_layers}")
  else:
    _check(e.top_k <= e.n_routed, "model.moe.top_k",
           f"{e.top_k} > model.moe.n_experts={e.n_experts} (+{e.n_extra_experts} MoE++ experts)")
    _check(e.n_groups == 1, "model.moe.n_groups",
           f"pool groups are for moe.kind=unipool (vanilla has one pool per layer), got {e.n_groups}")


def _validate_spiking(m: ModelConfig):
  sp = m.spiking
  _check(sp.encoder in SPIKING_ENCODERS, "model.spiking.encoder",
         f"{sp.encoder!r} not in {SPIKING_ENCODERS}")
  _check(sp.mixer in SPIKING_MIXERS, "model.spiking.mixer", f"{sp.mixer!r} not in {SPIKING_MIXERS}")
  _check(sp.head in SPIKING_HEADS, "model.spiking.head", f"{sp.head!r} not in {SPIKING_HEADS}")
  _check(sp.reset in SPIKING_RESETS, "model.spiking.reset", f"{sp.reset!r} not in {SPIKING_RESETS}")
  _check(sp.surrogate in SPIKING_SURROGATES, "model.spiking.surrogate",
         f"{sp.surrogate!r} not in {SPIKING_SURROGATES}")
  _check(0 < sp.beta <= 1, "model.spiking.beta", f"must be in (0, 1], got {sp.beta}")
  _check(sp.threshold > 0, "model.spiking.threshold", f"must be > 0, got {sp.threshold}")
  _check(sp.v_clamp > sp.threshold, "model.spiking.v_clamp",
         f"must be > model.spiking.threshold={sp.threshold} (else the LIF never fires), "
         f"got {sp.v_clamp}")
  _check(sp.surrogate_alpha > 0, "model.spiking.surrogate_alpha",
         f"must be > 0, got {sp.surrogate_alpha}")
  _check(0 < sp.topk_fraction <= 1, "model.spiking.topk_fraction",
         f"must be in (0, 1], got {sp.topk_fraction}")
  if sp.encoder == "topk":
    _check(int(sp.topk_fraction * m.d_model) >= 1, "model.spiking.topk_fraction",
           f"keeps floor({sp.topk_fraction} * model.d_model={m.d_model}) = 0 channels")
  _check(sp.window >= 1, "model.spiking.window", f"must be >= 1, got {sp.window}")
  _check(sp.n_anchors >= 0, "model.spiking.n_anchors", f"must be >= 0, got {sp.n_anchors}")
  _check(sp.prior_bottleneck >= 0, "model.spiking.prior_bottleneck",
         f"must be >= 0 (0 = d_model // 4), got {sp.prior_bottleneck}")
  if sp.head == "dynamic_prior" and sp.prior_bottleneck == 0:
    _check(m.d_model >= 4, "model.spiking.prior_bottleneck",
           f"d_model // 4 = 0 for model.d_model={m.d_model}; set it explicitly")
  _check(m.moe.kind == "none", "model.moe.kind",
         f"model.kind=symboliclight has its own spiking FFN; got moe.kind={m.moe.kind!r}")
  _check(m.attention.kind == "full" and m.attention.window == 0, "model.attention.window",
         "model.kind=symboliclight sets its local window with model.spiking.window "
         "(leave model.attention.kind=full, window=0)")


def validate_for_devices(cfg: Config, n_devices: int) -> tuple[int, ...]:
  """Checks that depend on the device count; returns the resolved mesh shape."""
  shape = cfg.mesh.resolve(n_devices)
  if cfg.model.moe.kind != "none":
    _check(cfg.model.moe.n_experts % shape[3] == 0, "model.moe.n_experts",
           f"{cfg.model.moe.n_experts} experts do not divide over mesh.expert={shape[3]} devices")
  _check(cfg.model.moe.pool_grad != "deferred" or shape[2] == shape[3] == 1,
         "model.moe.pool_grad", f"'deferred' runs on data / fsdp axes only; mesh.tensor="
         f"{shape[2]}, mesh.expert={shape[3]} (use 'per_layer')")
  batch_shards = shape[0] * shape[1] * shape[3]  # batch is split over data, fsdp and expert
  micro = cfg.train.batch_size // cfg.train.grad_accum
  _check(micro % batch_shards == 0, "train.batch_size",
         f"micro-batch {micro} (batch_size {cfg.train.batch_size} / grad_accum {cfg.train.grad_accum}) "
         f"is not divisible by the data×fsdp×expert axes "
         f"({shape[0]}×{shape[1]}×{shape[3]}={batch_shards})")
  return shape
