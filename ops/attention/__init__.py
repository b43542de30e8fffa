"""Flash attention op: `attention` (fwd + bwd) and `decode_attention` (KV cache, fwd)."""
from ops.attention.api import attention, decode_attention, implementations, decode_implementations
from ops.attention.config import AttentionBlockConfig

__all__ = ["attention", "decode_attention", "AttentionBlockConfig", "implementations",
           "decode_implementations"]
