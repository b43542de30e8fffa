"""Grouped (ragged) matmul for dropless MoE: `gmm`, `tgmm` and the routing helpers."""
from ops.gmm.api import gmm, tgmm, implementations
from ops.gmm.config import GmmBlockConfig
from ops.gmm.routing import (aligned_layout, aligned_rows, inverse_permutation, pad_rows,
                              permute, permute_rows, sort_by_group, unpad_rows, unpermute)

__all__ = ["gmm", "tgmm", "implementations", "GmmBlockConfig", "sort_by_group", "permute",
           "unpermute", "inverse_permutation", "permute_rows", "aligned_layout", "aligned_rows",
           "pad_rows", "unpad_rows"]
