"""semshare_ops: kernels for semantic KV-cache reuse (SemShareKV, KVShare) in LLM inference.

The ops are `torch.ops.semshare.{simhash, hamming_topk, rope_reuse_, partial_attn}` (SPEC.md section 3);
`semshare_ops.ops` wraps them with docstrings and `semshare_ops.reference` states them in plain torch.
The HF pipeline (`ReuseEngine`, `ReuseConfig`, `load_model`) loads transformers only when first used.
"""
from . import reference
from .ops import hamming_topk, partial_attn, rope_reuse_, simhash

__version__ = "0.1.0"
__all__ = ["simhash", "hamming_topk", "rope_reuse_", "partial_attn", "reference", "ReuseEngine", "ReuseConfig",
           "ReferenceEntry", "GenerationOutput", "load_model", "KVStore"]

_LAZY = {"ReuseEngine": "pipeline", "ReuseConfig": "pipeline", "ReferenceEntry": "pipeline",
         "GenerationOutput": "pipeline", "load_model": "models",
         "KVStore": "store"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'semshare_ops' has no attribute {name!r}")
