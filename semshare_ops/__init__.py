"""semshare_ops: kernels for semantic KV-cache reuse (SemShareKV, KVShare) in LLM inference.

Sub-packages by job; each imports only those listed before it:
- `ops`: `torch.ops.semshare.{simhash, hamming_topk, rope_reuse_, partial_attn}` with docstrings and fake kernels,
  and `ops.oracle`, the same contract in plain torch;
- `engine`: `ReuseEngine` and `ReuseConfig` on Hugging Face causal LMs, `load_model`;
- `store`: `KVStore`, many users' requests and their K/V;
- integrations with serving engines, one sub-package each (`vllm`: a KV connector and plugin for vLLM);
- leaves that the library never imports: `cli` (the `semshare` command), `bench`, `eval`.
The engine and store load transformers only when first used.
"""
from .ops import hamming_topk, oracle, partial_attn, rope_reuse_, simhash

__version__ = "0.1.0"
__all__ = ["simhash", "hamming_topk", "rope_reuse_", "partial_attn", "oracle", "ReuseEngine", "ReuseConfig",
           "ReferenceEntry", "GenerationOutput", "load_model", "KVStore"]

_LAZY = {"ReuseEngine": "engine", "ReuseConfig": "engine", "ReferenceEntry": "engine",
         "GenerationOutput": "engine", "load_model": "engine", "KVStore": "store"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'semshare_ops' has no attribute {name!r}")
