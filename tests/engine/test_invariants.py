"""The invariants of docs/contract.md section 4 against a full prefill of the same engine: identical target, recompute ratio 1.0,
quality growing with the ratio, reference entries never written, RoPE correction of reused keys.

On small randomly initialised Llama and Qwen2 models (fixtures in conftest.py)."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

import semshare_ops.ops as ss_ops  # noqa: E402

from engine_testutils import (
    EDITS, LAYERS, NEW, RATIOS, capture_assembled_cache, clone_entry, edited, engine_for, generate_with_logits, kl)  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method", ["edit", "lsh", "hybrid"])
def test_identical_target_equals_full_prefill(model, tokenizer, reference_ids, ref_entry, method):
    engine = engine_for(model, tokenizer, matching=method)  # default recompute_ratio: most layers reused
    full, full_logits = generate_with_logits(engine, reference_ids, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, reference_ids, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse"
    assert out.stats["matched_tokens"] == out.stats["prompt_tokens"] == len(reference_ids)
    assert out.stats["similarity"] == pytest.approx(1.0)
    assert out.stats["reuse_ratio"] > 0.3  # it did reuse (the check: a full recompute would trivially pass)
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


def test_prefix_target_reuses_exactly(model, tokenizer, reference_ids, ref_entry):
    """A prefix of the reference has exactly the reference's K/V (causality): no recompute beyond the mandatory."""
    target = reference_ids[:150]
    engine = engine_for(model, tokenizer, matching="edit", recompute_ratio=0.0, check_layers=1)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse" and out.stats["matched_tokens"] == 150
    assert out.stats["recomputed_tokens"][1:] == [1] * (LAYERS - 1)  # only the last prompt token
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


def test_single_token_target(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer)
    target = reference_ids[:1]
    out = engine.generate(target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse" and out.stats["prompt_tokens"] == 1
    assert out.token_ids == engine.generate(target, max_new_tokens=NEW).token_ids


@pytest.mark.parametrize("kind", EDITS + ["insert_start"])
def test_recompute_all_equals_full_prefill(model, tokenizer, reference_ids, ref_entry, kind, monkeypatch):
    target = edited(reference_ids, kind)
    engine = engine_for(model, tokenizer, recompute_ratio=1.0)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    seen = capture_assembled_cache(engine, monkeypatch)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse"
    # Every row past the exact common prefix, in every layer; the prefix is the reference's own K/V, exact already.
    exact = out.stats["exact_tokens"]
    first_edit = next(i for i, (a, b) in enumerate(zip(target, reference_ids)) if a != b)
    assert exact == first_edit > 0
    assert out.stats["recomputed_tokens"] == [len(target) - exact] * LAYERS
    assert out.stats["reuse_ratio"] == pytest.approx(exact / len(target), abs=1e-12)
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)

    # the assembled + recomputed cache is the full-prefill cache, slot for slot
    full_entry = engine.prefill(target)
    prefill = len(target) - 1
    for layer in range(LAYERS):
        assert torch.equal(seen["kv_pos"][layer], torch.arange(prefill))
        torch.testing.assert_close(seen["keys"][layer], full_entry.keys[layer, :prefill], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(seen["values"][layer], full_entry.values[layer, :prefill], atol=1e-5, rtol=1e-5)


def test_reused_cache_differs_before_full_recompute(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """Control for the test above: with little recompute the deep layers do hold reused (stale) K/V."""
    target = edited(reference_ids, "insert")
    engine = engine_for(model, tokenizer, recompute_ratio=0.0, check_layers=1)
    seen = capture_assembled_cache(engine, monkeypatch)
    engine.generate(target, reference=ref_entry, max_new_tokens=2)
    full_entry = engine.prefill(target)
    prefill = len(target) - 1
    torch.testing.assert_close(seen["keys"][0], full_entry.keys[0, :prefill], atol=1e-5, rtol=1e-5)  # recomputed
    assert (seen["keys"][-1] - full_entry.keys[-1, :prefill]).abs().max() > 1e-3


def test_quality_improves_with_recompute_ratio(model, tokenizer, reference_ids, ref_entry):
    """First-token logits approach the full prefill's as the ratio grows. check_layers=1 so that on 4 layers the
    ratios above the mandatory floor really differ (with the default 2 check layers every ratio <= 0.5 is equal)."""
    kinds = ["replace", "insert", "few", "insert_start"]
    diffs = {r: [] for r in RATIOS}
    kls = {r: [] for r in RATIOS}
    for kind in kinds:
        target = edited(reference_ids, kind)
        _, full_logits = generate_with_logits(engine_for(model, tokenizer), target, max_new_tokens=1)
        for r in RATIOS:
            engine = engine_for(model, tokenizer, recompute_ratio=r, check_layers=1)
            out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=1)
            assert out.stats["mode"] == "reuse"
            diffs[r].append(float((logits - full_logits).abs().max()))
            kls[r].append(kl(full_logits, logits))
        # per pair: the largest ratio never does worse than the smallest, and 1.0 is exact
        assert diffs[1.0][-1] <= 1e-4, f"{kind}: ratio 1.0 differs by {diffs[1.0][-1]}"
        assert diffs[1.0][-1] <= diffs[0.0][-1]
    mean_diff = [sum(diffs[r]) / len(kinds) for r in RATIOS]
    mean_kl = [sum(kls[r]) / len(kinds) for r in RATIOS]
    assert mean_diff[0] > 1e-3, "reuse at ratio 0 should differ from a full prefill (else the test proves nothing)"
    for a, b in zip(mean_diff, mean_diff[1:]):
        assert b <= a * 1.05 + 1e-6, f"mean max|dlogit| over ratios {RATIOS} is not non-increasing: {mean_diff}"
    for a, b in zip(mean_kl, mean_kl[1:]):
        assert b <= a * 1.05 + 1e-9, f"mean KL over ratios {RATIOS} is not non-increasing: {mean_kl}"
    assert mean_diff[-2] < mean_diff[0]  # strictly better somewhere before 1.0
    assert abs(mean_kl[-1]) < 1e-6


def test_recompute_ratio_sets_the_average(model, tokenizer, reference_ids, ref_entry):
    """With the "fixed" budget, recompute_ratio is the share recomputed averaged over layers when above the mandatory
    floor, as far as the rows past the exact common prefix allow: what the prefix saves is spent on the rows after
    it. (The "adaptive" budget, the default, puts the unmatched rows on top: test_selection.py.)"""
    target = edited(reference_ids, "replace")  # the first 120 tokens are the reference's: exact, never recomputed
    for r in (0.3, 0.5, 0.75, 0.9):
        out = engine_for(model, tokenizer, recompute_ratio=r, check_layers=1, budget="fixed").generate(
            target, reference=ref_entry, max_new_tokens=2)
        assert out.stats["exact_tokens"] == 120
        share = sum(out.stats["recomputed_tokens"]) / (LAYERS * len(target))
        assert share == pytest.approx(min(r, (len(target) - 120) / len(target)), abs=2 / len(target))


def test_serving_leaves_reference_untouched(model, tokenizer, reference_ids):
    entry = engine_for(model, tokenizer).prefill(reference_ids)
    before = clone_entry(entry)
    nbytes = entry.nbytes
    configs = [dict(matching="edit"), dict(matching="lsh"), dict(matching="hybrid", recompute_ratio=0.0),
               dict(recompute_ratio=1.0), dict(retain_ratio=0.5), dict(rope_correction=False)]
    for i, cfg in enumerate(configs):
        engine = engine_for(model, tokenizer, **cfg)
        for kind in ("insert", "replace", "identical"):
            engine.generate(edited(reference_ids, kind, seed=i), reference=entry, max_new_tokens=4)
    for name, value in before.items():
        now = getattr(entry, name)
        if torch.is_tensor(value):
            assert torch.equal(now, value), f"ReferenceEntry.{name} changed by serving requests"
        else:
            assert now == value
    assert entry.nbytes == nbytes
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.keys = entry.keys.clone()


def capture_rope_reuse(monkeypatch) -> dict:
    """Snapshot the assembled cache right after rope_reuse_ (before any recompute overwrites it)."""
    seen = {}
    original = ss_ops.rope_reuse_

    def spy(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox=True):
        original(k_dst, v_dst, k_src, v_src, src_idx, dst_idx, delta, inv_freq, neox)
        seen.update(keys=k_dst.clone(), values=v_dst.clone(), src=src_idx.clone(), dst=dst_idx.clone())

    monkeypatch.setattr(ss_ops, "rope_reuse_", spy)
    return seen


@pytest.mark.parametrize("kind", ["insert_start", "delete"])
def test_rope_correction_restores_layer0_keys(model, tokenizer, reference_ids, ref_entry, kind, monkeypatch):
    """Layer-0 K/V depend only on the token and its position, so for exact matches the re-rotated keys must equal
    the full prefill's; without correction the shifted ones keep their old position."""
    target = edited(reference_ids, kind)
    full_entry = engine_for(model, tokenizer).prefill(target)
    seen = capture_rope_reuse(monkeypatch)
    results = {}
    for correction in (True, False):
        engine = engine_for(model, tokenizer, matching="edit", rope_correction=correction)
        out = engine.generate(target, reference=ref_entry, max_new_tokens=4)
        assert out.stats["mode"] == "reuse" and len(out.token_ids) == 4
        dst, src = seen["dst"], seen["src"]
        assert torch.equal(torch.tensor(target)[dst], ref_entry.token_ids[src])  # edit matches are exact
        shifted = dst != src
        assert shifted.sum() > 50
        k_err = (seen["keys"][0, dst] - full_entry.keys[0, dst]).abs().amax(dim=(1, 2))
        v_err = (seen["values"][0, dst] - full_entry.values[0, dst]).abs().amax(dim=(1, 2))
        assert v_err.max() <= 1e-5  # values carry no position
        results[correction] = (k_err, shifted)
    k_err, shifted = results[True]
    assert k_err.max() <= 1e-4
    k_err, shifted = results[False]
    # Unshifted tokens need no correction; those of the exact common prefix are copied as they are, not re-rotated.
    assert not (~shifted).any() or k_err[~shifted].max() <= 1e-5
    assert int(seen["dst"].min()) >= out.stats["exact_tokens"] > 0
    assert k_err[shifted].min() > 1e-3  # every shifted key is wrong without it


def test_rope_correction_off_still_runs_and_recompute_all_is_exact(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "insert_start")
    engine = engine_for(model, tokenizer, rope_correction=False, recompute_ratio=1.0)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse"
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    partial = engine_for(model, tokenizer, rope_correction=False).generate(target, reference=ref_entry,
                                                                          max_new_tokens=NEW)
    assert partial.stats["mode"] == "reuse" and len(partial.token_ids) == NEW
