"""semshare_ops: kernels for semantic KV-cache reuse (SemShareKV, KVShare) in LLM inference.

The ops are `torch.ops.semshare.{simhash, hamming_topk, rope_reuse_, partial_attn}` (SPEC.md section 3);
`semshare_ops.ops` wraps them with docstrings and `semshare_ops.reference` states them in plain torch.
"""
from . import reference
from .ops import hamming_topk, partial_attn, rope_reuse_, simhash

__version__ = "0.1.0"
__all__ = ["simhash", "hamming_topk", "rope_reuse_", "partial_attn", "reference"]
