"""Native Sparse Attention: compressed, selected and sliding-window branches (+ decode)."""
from ops.nsa.api import (compressed_attention, implementations, nsa, nsa_decode, select_blocks,
                         selected_attention)
from ops.nsa.compress import overlap_matrix, slc_from_cmp, unfold_blocks
from ops.nsa.config import NSABlockConfig, NSAConfig

__all__ = ["nsa", "nsa_decode", "compressed_attention", "select_blocks", "selected_attention",
           "unfold_blocks", "overlap_matrix", "slc_from_cmp", "NSAConfig", "NSABlockConfig",
           "implementations"]
