"""The multi-user KV store (KVShare): retrieval, the DELTA tree, LRU tiers, persistence, serving."""
from .store import KVStore

__all__ = ["KVStore"]
