"""Layer-wise KV retention (retain_ratio).

On small randomly initialised Llama and Qwen2 models (fixtures in conftest.py)."""


import math

import pytest
import torch

transformers = pytest.importorskip("transformers")


from engine_testutils import NEW, VOCAB, edited, engine_for, generate_with_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_retain_ratio_holds_fewer_kv(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "replace")
    half = engine_for(model, tokenizer, retain_ratio=0.5, check_layers=1).generate(
        target, reference=ref_entry, max_new_tokens=NEW)
    quarter = engine_for(model, tokenizer, retain_ratio=0.25, check_layers=1).generate(
        target, reference=ref_entry, max_new_tokens=NEW)
    keep_all = engine_for(model, tokenizer, retain_ratio=1.0, check_layers=1).generate(
        target, reference=ref_entry, max_new_tokens=NEW)
    for out in (half, quarter, keep_all):
        assert out.stats["mode"] == "reuse"
        assert len(out.token_ids) == NEW and all(0 <= t < VOCAB for t in out.token_ids)
    assert half.stats["kv_bytes"] < half.stats["kv_bytes_full"]
    assert half.stats["kv_bytes"] <= 0.75 * half.stats["kv_bytes_full"]
    assert quarter.stats["kv_bytes"] <= half.stats["kv_bytes"]
    assert keep_all.stats["kv_bytes"] == keep_all.stats["kv_bytes_full"]


def test_retain_with_default_config(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "insert")
    out = engine_for(model, tokenizer, retain_ratio=0.5).generate(target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse" and len(out.token_ids) == NEW
    assert out.stats["kv_bytes"] < out.stats["kv_bytes_full"]


def test_full_recompute_without_retention_unaffected_by_retention(model, tokenizer, reference_ids, ref_entry):
    """A retention request on the same model leaves no trace: ratio 1.0 + retain None is still a full prefill."""
    target = edited(reference_ids, "replace")
    engine_for(model, tokenizer, retain_ratio=0.5).generate(target, reference=ref_entry, max_new_tokens=4)
    engine = engine_for(model, tokenizer, recompute_ratio=1.0, retain_ratio=None)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    assert out.stats["kv_bytes"] == out.stats["kv_bytes_full"]


def test_selection_and_retention_keep_their_own_observers(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """The ranking reads the attention of its last `query_window` queries and retention that of its 16-token
    observer window, whichever is larger: each query's weights sum to 1 per head, so the scores sum to queries x
    heads. One observer once served both (the larger count), so retention changed the ranking and the ranking
    changed retention."""
    from semshare_ops.engine import engine as engine_module, rows as rows_module

    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "replace")[1:]  # no exact prefix: every slot
    heads = model.config.num_attention_heads
    ranked, retained = [], []
    select = rows_module.selection_scores
    monkeypatch.setattr(rows_module, "selection_scores",
                        lambda selection, reused, fresh, attention: ranked.append(float(attention.sum()))
                        or select(selection, reused, fresh, attention))
    retain = engine_module.ReuseEngine._retain

    def spy(self, cache, prefill, window):
        retained.extend(float(layer.retain_scores[:prefill].sum()) for layer in cache.layers)
        return retain(self, cache, prefill, window)

    monkeypatch.setattr(engine_module.ReuseEngine, "_retain", spy)
    for query_window, retain_ratio in ((2, None), (2, 0.5), (48, 0.5)):
        ranked.clear(), retained.clear()
        engine_for(model, tokenizer, selection="attention", query_window=query_window, recompute_tail=0,
                   check_layers=1, recompute_ratio=0.5, retain_ratio=retain_ratio).generate(
            target, reference=ref_entry, max_new_tokens=1)
        assert ranked and ranked[0] == pytest.approx(query_window * heads, rel=1e-4), (query_window, retain_ratio)
        if retain_ratio is not None:
            assert retained and retained == pytest.approx([16 * heads] * len(retained), rel=1e-4), query_window


def test_retention_keeps_the_sinks_the_window_and_the_most_attended(model, tokenizer, reference_ids, ref_entry,
                                                                    monkeypatch):
    """Which K/V entries a layer keeps: the first 4 tokens (attention sinks) and the 16-token observer window always,
    then the slots its observer attended to most; every layer past the check layer drops some at ratio 0.5."""
    from semshare_ops.engine.hf import TokenMajorLayer

    calls, keep = [], TokenMajorLayer.keep

    def spy(layer, slots):
        calls.append((layer.retain_scores.clone(), slots.clone()))
        return keep(layer, slots)

    monkeypatch.setattr(TokenMajorLayer, "keep", spy)
    target = edited(reference_ids, "replace")
    prefill, sinks, window = len(target) - 1, 4, 16
    engine = engine_for(model, tokenizer, retain_ratio=0.5, check_layers=1)
    assert engine.generate(target, reference=ref_entry, max_new_tokens=2).stats["mode"] == "reuse"
    assert len(calls) == engine.num_layers - 1
    chose = 0
    for scores, slots in calls:
        kept = set(slots.tolist())
        assert slots.tolist() == sorted(kept) and kept <= set(range(prefill))
        assert set(range(sinks)) | set(range(prefill - window, prefill)) <= kept
        middle = range(sinks, prefill - window)
        taken = [scores[i].item() for i in middle if i in kept]
        left = [scores[i].item() for i in middle if i not in kept]
        assert left and min(taken, default=math.inf) >= max(left)
        chose += bool(taken)
    assert chose  # some layer keeps more than the sinks and the window
