"""Frozen configuration dataclasses, string overrides and validation.

One config path: a named preset (jaxlm/configs) plus `section.field=value`
overrides (absl `--set`), validated before anything compiles. Every error is a
ConfigError whose message starts with the dotted name of the offending field.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
  """A configuration value is unknown, of the wrong type, or inconsistent."""


DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")
ATTENTION_KINDS = ("full", "sliding", "nsa")
MOE_KINDS = ("none", "vanilla", "unipool")
ROUTERS = ("softmax_topk", "norm_router", "relu_rmsnorm")
MODEL_KINDS = ("transformer", "symboliclight")
SPIKING_ENCODERS = ("lif", "topk")
SPIKING_MIXERS = ("dual", "decay", "attention")
SPIKING_HEADS = ("dynamic_prior", "static_prior")
SPIKING_RESETS = ("hard", "subtract")
SPIKING_SURROGATES = ("atan", "sigmoid", "triangle")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Self-attention of the transformer block.

  kind=nsa: Native Sparse Attention (jaxlm/layers/nsa.py over ops.nsa; Yuan et al., 2025).
  Compressed branch: blocks of nsa_block_len keys every nsa_stride tokens, each mapped to one
  key/value by an MLP (hidden nsa_compress_hidden, 0 = 2 * head_dim) with intra-block position
  encoding; selected branch: the nsa_top_n best blocks of nsa_select_len tokens (always the
  first nsa_n_always_first and the nsa_n_local latest); window branch: the last nsa_window
  tokens. Gates sigmoid(W x + b) per branch and head. nsa_shared_kv: one k/v projection for
  all three branches instead of one each (the paper's default is one each).
  """
  kind: str = "full"            # full | sliding | nsa
  window: int = 0               # sliding: keys pos-window < j <= pos
  soft_cap: float = 0.0         # 0 = off; else logits = c*tanh(logits/c)
  implementation: str = ""      # "" = ops' per-platform default; else a name or "a,b" sequence
  nsa_block_len: int = 32       # l: tokens per compression block
  nsa_stride: int = 16          # d: distance between compression blocks
  nsa_select_len: int = 64      # l': tokens per selection block
  nsa_top_n: int = 16           # n: selection blocks per query and GQA group (forced included)
  nsa_window: int = 512         # w: sliding-window branch length
  nsa_n_always_first: int = 1   # leading selection blocks always selected
  nsa_n_local: int = 2          # trailing selection blocks always selected (incl. the query's)
  nsa_compress_hidden: int = 0  # compression MLP width; 0 = 2 * head_dim
  nsa_shared_kv: bool = False   # one k/v projection shared by the three branches


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts FFN (jaxlm/layers/moe.py). kind=none keeps the dense SwiGLU.

  vanilla: every layer owns n_experts FFN experts. unipool: the model owns n_groups pools of
  n_experts experts (consecutive layers share one pool), each layer has its own router.
  Loss coefficients multiply the values reported as moe/<name> in the train metrics; each
  layer-level loss is averaged over layers (see jaxlm/layers/moe_losses.py).
  """
  kind: str = "none"                 # none | vanilla | unipool
  n_experts: int = 8                 # FFN experts per layer (vanilla) / per pool (unipool)
  top_k: int = 1                     # relu_rmsnorm: the most experts a token may use
  d_expert: int = 0                  # expert SwiGLU width; 0 = model.d_ff
  n_shared_experts: int = 0          # always-on experts per layer (each d_expert wide)
  n_groups: int = 1                  # unipool: pools, each shared by n_layers/n_groups layers
  router: str = "softmax_topk"       # softmax_topk | norm_router | relu_rmsnorm (BlockFFN)
  renormalize: bool = True           # softmax_topk: renormalise the top-k probabilities
  norm_router_samples: int = 65536   # Monte-Carlo samples for NormRouter's constant c
  gating_residual: bool = False      # MoE++: logits_l = W_l x + G_l logits_{l-1}
  n_zero_experts: int = 0            # MoE++ E(x) = 0
  n_copy_experts: int = 0            # MoE++ E(x) = x
  n_constant_experts: int = 0        # MoE++ E(x) = a1 x + a2 v
  capacity_factor: float = 0.0       # 0 = dropless; else drop past ceil(cf*tokens*k/n_experts)
  balance_loss: float = 0.0          # Switch per-layer E*sum f_i P_i
  pool_balance_loss: float = 0.0     # UniPool M*sum fbar_i Pbar_i over the layers of a pool
  router_z_loss: float = 0.0         # mean logsumexp(router logits)^2
  l1_loss: float = 0.0               # BlockFFN token sparsity: mean sum_e s_e
  locality_loss: float = 0.0         # BlockFFN BCE(1[s_{t-1}>0], sigmoid(alpha s_t))
  locality_alpha: float = 1.0
  chunk_sparsity_loss: float = 0.0   # BlockFFN 1 - mean_{chunk,e} prod_t (1 - p_{t,e})
  chunk_size: int = 8
  implementation: str = ""           # ops.gmm implementation ("" = platform default)

  @property
  def n_extra_experts(self) -> int:
    return self.n_zero_experts + self.n_copy_experts + self.n_constant_experts

  @property
  def n_routed(self) -> int:
    """Router outputs: FFN experts plus MoE++ zero/copy/constant experts."""
    return self.n_experts + self.n_extra_experts


@dataclasses.dataclass(frozen=True)
class SpikingConfig:
  """SymbolicLight (model.kind=symboliclight, jaxlm/models/symboliclight.py); ignored otherwise.

  encoder: lif = LIF over LayerNorm(embedding) (ops.lif); topk = ablation: a deterministic
    per-token mask of the top floor(topk_fraction * d_model) channels by |x|, straight-through.
  mixer: dual = decay path + spike-gated local attention mixed by g = sigmoid(gate);
    decay = no attention path; attention = attention path only.
  head: dynamic_prior = W_out c + w_p W2 GELU(W1 c); static_prior = W_out c + a learned
    vocab bias (ablation). The paper's "decay only" run is mixer=decay + head=static_prior.
  Local attention: key j visible from query i iff j <= i and (i - window < j or j < n_anchors)
  and token j has a spike (ops.attention window / sinks / kv_valid).
  """
  encoder: str = "lif"               # lif | topk
  mixer: str = "dual"                # dual | decay | attention
  head: str = "dynamic_prior"        # dynamic_prior | static_prior
  beta: float = 0.95                 # LIF leak
  threshold: float = 1.0             # LIF and in-block spike threshold
  v_clamp: float = 3.0               # LIF membrane clamped to [-v_clamp, v_clamp]
  reset: str = "hard"                # hard | subtract
  surrogate: str = "atan"            # atan | sigmoid | triangle (dH/dz for every spike)
  surrogate_alpha: float = 2.0       # atan: 1 / (1 + (alpha z)^2)
  topk_fraction: float = 0.11        # encoder=topk: channels kept per token
  window: int = 256                  # local attention: keys i-window < j <= i
  n_anchors: int = 4                 # always-visible first tokens (attention sinks)
  decay_init: float = 3.0            # lambda_raw init (lambda = sigmoid, per head)
  gate_init: float = 0.0             # g = sigmoid(gate)
  prior_weight_init: float = 0.1     # w_p of the dynamic prior head
  prior_bottleneck: int = 0          # 0 = d_model // 4
  lif_implementation: str = ""       # ops.lif implementation ("" = platform default)
  scan_implementation: str = ""      # ops.scan implementation ("" = platform default)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  kind: str = "transformer"     # transformer | symboliclight
  vocab_size: int = 4096
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 0             # 0 = d_model // n_heads
  d_ff: int = 1024              # SwiGLU hidden width
  max_seq_len: int = 2048       # length of the RoPE table
  rope_base: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  init_std: float = 0.02
  dtype: str = "bfloat16"       # compute dtype
  param_dtype: str = "float32"  # master params
  scan_layers: bool = True
  remat: str = "none"           # none | full | dots | dots_no_batch
  attention: AttentionConfig = AttentionConfig()
  moe: MoEConfig = MoEConfig()
  spiking: SpikingConfig = SpikingConfig()

  @property
  def resolved_d_expert(self) -> int:
    return self.moe.d_expert or self.d_ff

  @property
  def n_pools(self) -> int:
    """Expert pools the model owns: one per layer (vanilla) or moe.n_groups (unipool)."""
    return {"none": 0, "vanilla": self.n_layers, "unipool": self.moe.n_groups}[self.moe.kind]

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32          # global sequences per optimizer step
  seq_len: int = 256
  grad_accum: int = 1           # micro-batches per step (batch_size % grad_accum == 0)
  lr: float = 3e-3
  min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0        # global-norm clip; 0 = off
  z_loss: float = 0.0           # coefficient of mean(logsumexp(logits)^2)
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 16
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  output_dir: str = "runs/default"
  peak_tflops: float = 0.0      # per-device bf16 peak for MFU; 0 = guess from device kind
  max_nonfinite_steps: int = 10 # stop after this many consecutive skipped (NaN/inf) steps


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "shakespeare"   # shakespeare | files
  paths: tuple[str, ...] = ()   # .txt / .jsonl / .array_record files or globs (source=files)
  jsonl_field: str = "text"
  tokenizer: str = "bpe"        # bpe (trained on the corpus, cached) | byte
  tokenizer_path: str = ""      # an existing `tokenizers` JSON instead of training one
  val_fraction: float = 0.05    # fraction of documents held out
  cache_dir: str = ""           # default $JAXLM_CACHE or ~/.cache/jaxlm
  num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 on one axis means 'all remaining devices'."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1

  @property
  def axis_names(self) -> tuple[str, ...]:
    return ("data", "fsdp", "tensor", "expert")

  def resolve(self, n_devices: int) -> tuple[int, ...]:
    sizes = [self.data, self.fsdp, self.tensor, self.expert]
    names = self.axis_names
    for n, s in zip(names, sizes):
      if s == 0 or s < -1:
        raise ConfigError(f"mesh.{n}={s}: must be a positive size or -1")
    if sizes.count(-1) > 1:
      raise ConfigError("mesh: at most one axis may be -1 (fill)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if n_devices % fixed:
        raise ConfigError(f"mesh: fixed axes product {fixed} does not divide {n_devices} devices")
      sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
      raise ConfigError(
          f"mesh: {dict(zip(names, sizes))} has {math.prod(sizes)} devices, but {n_devices} are present")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class Config:
  name: str = "custom"
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()


# --------------------------------------------------------------------------- overrides

def _field_types(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_value(text: str, tp, key: str):
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if text.lower() in ("none", "null") and len(args) < len(typing.get_args(tp)):
      return None
    return _parse_value(text, args[0], key)
  if origin is tuple:
    (elem,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
    items = [t.strip() for t in text.split(",") if t.strip()]
    return tuple(_parse_value(t, elem, key) for t in items)
  if tp is bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
  if tp is int:
    try:
      return int(text.replace("_", ""), 0)
    except ValueError:
      try:  # allow 1e3 style when exact
        f = float(text)
      except ValueError:
        f = math.nan
      if math.isfinite(f) and f == int(f):
        return int(f)
      raise ConfigError(f"{key}={text!r}: expected an integer") from None
  if tp is float:
    try:
      v = float(text)
    except ValueError:
      raise ConfigError(f"{key}={text!r}: expected a number") from None
    if not math.isfinite(v):
      raise ConfigError(f"{key}={text!r}: must be finite")
    return v
  if tp is str:
    return text
  raise ConfigError(f"{key}: cannot override fields of type {tp}")


def _set_path(obj, path: Sequence[str], text: str, full_key: str):
  types_ = _field_types(type(obj))
  name = path[0]
  if name not in types_:
    where = full_key.rsplit(".", len(path))[0] if len(path) < full_key.count(".") + 1 else ""
    prefix = f"{where}." if where else ""
    raise ConfigError(
        f"{full_key}: unknown key {prefix}{name}; valid keys: {', '.join(prefix + k for k in types_)}")
  tp = types_[name]
  if dataclasses.is_dataclass(tp):
    if len(path) == 1:
      raise ConfigError(f"{full_key}: is a section; set one of its fields, e.g. {full_key}.<field>=…")
    value = _set_path(getattr(obj, name), path[1:], text, full_key)
  else:
    if len(path) > 1:
      raise ConfigError(f"{full_key}: {name} has no sub-fields")
    value = _parse_value(text, tp, full_key)
  return dataclasses.replace(obj, **{name: value})


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
  """Apply `section.field=value` strings in order, then validate."""
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r}: expected the form section.field=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
      raise ConfigError(f"override {item!r}: {key!r} is not a dotted field name")
    cfg = _set_path(cfg, key.split("."), text.strip(), key)
  validate(cfg)
  return cfg


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def from_dict(d: dict, cls=Config):
  """Rebuild a config from `to_dict` output (e.g. a checkpoint's stored config)."""
  kwargs = {}
  types_ = _field_types(cls)
  for k, v in d.items():
    if k not in types_:
      raise ConfigError(f"{cls.__name__}: unknown key {k!r} in stored config")
    tp = types_[k]
    if dataclasses.is_dataclass(tp):
      kwargs[k] = from_dict(v, tp)
    elif typing.get_origin(tp) is tuple:
      kwargs[k] = tuple(v)
    else:
      kwargs[k] = v
  return cls(**kwargs)


# --------------------------------------------------------------------------- validation

def _check(cond: bool, key: str, msg: str):
  if not cond:
    raise ConfigError(f"{key}: {msg}")


def _check_types(obj, prefix: str):
  for name, tp in _field_types(type(obj)).items():
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
            "eval_batches", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps"):
    _check(getattr(t, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(t, k)}")
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
  _check(e.locality_alpha > 0, "model.moe.locality_alpha", f"must be > 0, got {e.locality_alpha}")
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
  batch_shards = shape[0] * shape[1] * shape[3]  # batch is split over data, fsdp and expert
  micro = cfg.train.batch_size // cfg.train.grad_accum
  _check(micro % batch_shards == 0, "train.batch_size",
         f"micro-batch {micro} (batch_size {cfg.train.batch_size} / grad_accum {cfg.train.grad_accum}) "
         f"is not divisible by the data×fsdp×expert axes "
         f"({shape[0]}×{shape[1]}×{shape[3]}={batch_shards})")
  return shape
