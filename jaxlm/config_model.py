"""Model sections of the config: ModelConfig and its attention, MoE and spiking parts.

Frozen dataclasses only; their allowed values are checked in jaxlm/config_validate.py. Import
them through jaxlm.config (the public module), which re-exports every name.
"""
from __future__ import annotations

import dataclasses


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
  # 0/1: experts' rows back to back; N > 1: each expert's rows start at a multiple of N
  # (zero-padded, ops.gmm.aligned_layout) so no gmm row tile of N rows straddles two experts:
  # for pools of many small groups (UniPool). The H100/H200 gmm tiles are 128 rows. H200,
  # session 16, UniPool M=192 at 64k tokens fwd+bwd: 15.09 ms with 128 against 14.86 ms
  # without (the gmm alone 13.48 vs 13.53): the padding costs what the aligned tiles save.
  group_align: int = 0
  # unipool: how the shared pools get their gradient. per_layer: autodiff (each layer's backward
  # adds a whole-pool tgmm to an f32 accumulator); deferred: one tgmm per weight over every
  # layer's rows after the last layer (jaxlm/layers/pool_grad.py; data / fsdp meshes only,
  # group_align <= 1)
  pool_grad: str = "per_layer"
  # deferred: layers per deferred tgmm (0 = all of a pool's layers at once); smaller chunks hold
  # fewer taps (memory) for one pool-gradient accumulation per chunk
  pool_grad_chunk: int = 0
  # meshes with an fsdp axis and no expert axis: gather_weights = FSDP (every expert's weights
  # gathered for each layer, tokens stay put); split_embed = the weights stay split over d and
  # the gate / up products are summed over "fsdp" (tokens move); auto = the one that moves less
  # per layer (jaxlm/layers/expert_pool.split_embed_moves_less): split_embed for decode and
  # for pools much larger than the batch (UniPool); with pool_grad="deferred" the taps split
  # the expert width over "fsdp" too. With an expert axis as well, split_embed moves the rows
  # each device receives across its fsdp group (expert_pool.ep_split_embed)
  fsdp_dispatch: str = "auto"

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
  # The decode step walks a scanned model's layers as an unrolled loop over static slices of
  # the stacked params (False: a lax.scan, as training). With a traced layer index XLA copied
  # the layer's weights out of the stack before their GEMMs, each decode step (compiled for an
  # H200, nsa_1b batch 8: 10 copies a layer, the MLP's 3 x 23 MB among them); static slices
  # fuse into most GEMMs (3 copies left: gate / up, merged into one GEMM, and the attention
  # output's cuBLAS call). Costs compile time linear in the layer count. Decode loops go
  # through FunctionalModel.for_decode, which unstacks the params once before the loop.
  decode_unroll: bool = True
  remat: str = "none"           # none | full | dots | dots_only | dots_no_batch | dots_and_acts
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
