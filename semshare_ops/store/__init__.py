"""KVShare-style multi-user KV store on top of `ReuseEngine` (docs/contract.md section 5).

    store = KVStore(engine, capacity_bytes=1 << 30)
    out = store.generate(prompt, tenant="alice", max_new_tokens=64)
    out.stats["hit"], out.stats["base_id"], out.stats["tenant"], out.stats["request_id"]

A request runs in four steps: (1) retrieve the stored prompts near it (its embedding's nearest keys, and the stored
prompts that begin with the same 16 tokens), (2) widen that set with their parents and children in the DELTA tree
of stored entries, (3) align every candidate with the request and pick the one that leaves the fewest tokens to
recompute, (4) serve the request from it and store the request's own K/V as its child.

One module per concern, each with the why in its docstring:
- `store`: `KVStore` itself: steps 3 and 4, tenants and namespaces, the locks; it glues the others;
- `retrieval`: step 1: the prompt keys (SimHash of the mean embedding, or MiniLM from `embedder`), the anchors;
- `tree`: step 2, and the DELTA tree: parents, edit scripts, depth, merging chains when an entry leaves;
- `tiers`: the byte budgets: the device tier and the CPU offload tier, least recently used out first;
- `persistence`: `save` / `load`: crash-safe generations committed by one rename of `index.json`, checked whole;
- `checks`: the store's argument checks (tenant, settings, ids, directories), each error naming its argument;
- `entries`: the per-entry record all of them share, the snapshots handed out, the entry checksum.
"""
from .store import KVStore

__all__ = ["KVStore"]
