"""Helpers of the store tests: prompts with known alignments, and a check of the DELTA tree's invariants.

Prompts are token-id lists: base prompts draw from ids [2, 400), edits insert ids from [400, 512) that occur nowhere
else, so the token alignment (and with `matching="edit"` the engine's cost of a base) is known exactly.
"""

import torch

from semshare_ops.store.store import KVStore
from semshare_ops.store.tree import edit_script

from engine_testutils import HEAD_DIM, KV_HEADS, LAYERS

TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # K/V bytes of one prompt token over all layers (fp32)
NEW = 3
STORE_KEYS = {"hit", "base_id", "tenant", "request_id", "mode", "prompt_tokens", "matched_tokens",
              "recomputed_tokens", "reuse_ratio", "kv_bytes", "kv_bytes_full", "ttft_ms", "similarity"}


def base_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


_fresh = iter(range(400, 10**9))


def fresh(n: int) -> list[int]:
    """Ids in [400, 512) that no base prompt holds, all different from each other within the test run's cycle."""
    return [400 + next(_fresh) % 112 for _ in range(n)]


def replace(ids: list[int], at: int, n: int) -> list[int]:
    new = list(ids)
    new[at:at + n] = fresh(n)
    return new


def assert_tree_consistent(store: KVStore):
    entries = {e.id: e for e in store.entries()}
    for e in entries.values():
        if e.parent is None:
            assert e.edits is None
        else:
            assert e.parent in entries and e.id in entries[e.parent].children
            assert (e.edits, e.opcodes) == edit_script(entries[e.parent].entry.token_ids.tolist(),
                                                       e.entry.token_ids.tolist())
        for c in e.children:
            assert entries[c].parent == e.id
