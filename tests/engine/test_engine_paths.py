"""The engine's full path against plain HF generate, string prompts, the baselines, match(), logits, entries, the
recompute tail, and the causal fast path (whole-cache steps to SDPA).

On small randomly initialised Llama and Qwen2 models (fixtures in conftest.py)."""

import dataclasses
import inspect
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import semshare_ops.ops as ss_ops  # noqa: E402
from semshare_ops.engine import GenerationOutput, ReferenceEntry, ReuseConfig  # noqa: E402

from engine_testutils import (
    LAYERS, NEW, FakeTokenizer, build_model, edited, engine_for, generate_with_logits, rand_tokens)  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_path_matches_plain_hf_generate(arch, model, tokenizer, reference_ids):
    """engine.generate without reference is HF greedy generation (the baseline every invariant compares to)."""
    target = edited(reference_ids, "replace")
    plain = build_model(arch, seed=0)  # same weights, stock attention, HF's own cache
    plain_out = plain.generate(torch.tensor([target]), attention_mask=torch.ones(1, len(target), dtype=torch.long),
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
    out, logits = generate_with_logits(engine_for(model, tokenizer), target, max_new_tokens=NEW)
    assert isinstance(out, GenerationOutput)
    assert out.token_ids == plain_out.sequences[0, len(target):].tolist()
    torch.testing.assert_close(logits, plain_out.scores[0][0].float(), atol=1e-4, rtol=1e-4)
    assert out.text == tokenizer.decode(out.token_ids)
    assert len(out.token_ids) == NEW


@pytest.mark.parametrize("field, value", [("cache_implementation", "static"), ("num_beams", 2), ("do_sample", True)])
def test_the_models_generation_config_leaves_the_engine_greedy(tokenizer, reference_ids, field, value):
    """A generation_config.json that asks for a static cache, beams or sampling: the engine still decodes greedily,
    one beam, over its own cache, with and without reuse (a static cache made HF refuse every request, beams made it
    refuse the engine's streamer)."""
    model = build_model("llama", seed=0)
    target = edited(reference_ids, "replace")
    plain = model.generate(torch.tensor([target]), attention_mask=torch.ones(1, len(target), dtype=torch.long),
                           max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, len(target):].tolist()
    setattr(model.generation_config, field, value)
    engine = engine_for(model, tokenizer)
    assert engine.generate(target, max_new_tokens=NEW).token_ids == plain
    same = engine.generate(target, reference=engine.prefill(target), max_new_tokens=NEW)
    assert same.stats["mode"] == "reuse" and same.token_ids == plain


def test_string_prompt_goes_through_tokenizer(model, tokenizer):
    engine = engine_for(model, tokenizer)
    text_a = "The quick brown fox jumps over the lazy dog. " * 6
    text_b = text_a.replace("lazy", "sleepy", 2)
    ref = engine.prefill(text_a)
    assert ref.token_ids.tolist() == tokenizer(text_a)["input_ids"]
    out = engine.generate(text_b, reference=ref, max_new_tokens=NEW)
    assert out.stats["prompt_tokens"] == len(tokenizer(text_b)["input_ids"])
    assert out.token_ids == engine.generate(tokenizer(text_b)["input_ids"], reference=ref,
                                            max_new_tokens=NEW).token_ids
    assert isinstance(out.text, str) and out.text == tokenizer.decode(out.token_ids)


def test_tokenize_checks_the_room_it_is_asked_to_leave(model, tokenizer):
    """`tokenize` is public (the store tokenizes a request before it looks for a donor): `max_new_tokens` is checked
    by name there, not left to a later step, and counts against the positions served."""
    engine = engine_for(model, tokenizer)
    assert engine.tokenize([5, 6, 7], max_new_tokens=4).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="max_new_tokens: expected at least 0, got -1"):
        engine.tokenize([5, 6, 7], max_new_tokens=-1)
    with pytest.raises(TypeError, match="max_new_tokens: expected an integer, got float 2.5"):
        engine.tokenize([5, 6, 7], max_new_tokens=2.5)
    with pytest.raises(ValueError, match="prompt / max_new_tokens"):
        engine.tokenize([5, 6, 7], max_new_tokens=engine.max_positions - 2)
    assert len(engine.tokenize([5] * engine.max_positions)) == engine.max_positions  # no room asked by default
    # A reference generates nothing: it may fill every position the engine serves.
    full = rand_tokens(engine.max_positions, seed=5)
    entry = engine.prefill(full)
    assert entry.keys.shape[1] == engine.max_positions
    assert engine.match(entry, full).matched == engine.max_positions  # match() asks no room either


def test_a_tensor_of_token_ids_is_a_prompt_like_its_list(model, tokenizer, reference_ids, ref_entry):
    """A 1-D integer tensor (any integer dtype) is served as the list of its ids."""
    engine = engine_for(model, tokenizer)
    target = edited(reference_ids, "replace")
    expected = engine.generate(target, reference=ref_entry, max_new_tokens=3).token_ids
    for dtype in (torch.int64, torch.int32):
        out = engine.generate(torch.tensor(target, dtype=dtype), reference=ref_entry, max_new_tokens=3)
        assert out.token_ids == expected and out.stats["mode"] == "reuse"


def test_the_text_leaves_special_tokens_out(model, reference_ids):
    """`out.text` is the answer as a user reads it: the tokenizer is asked to skip special tokens (an end of
    sequence, a chat template's markers), while `token_ids` keeps every id."""
    class Recording(FakeTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            self.asked.append(skip_special_tokens)
            return super().decode(ids)

    tokenizer = Recording()
    tokenizer.asked = []
    out = engine_for(model, tokenizer).generate(reference_ids[:20], max_new_tokens=2)
    assert tokenizer.asked == [True] and len(out.token_ids) == 2


def test_generate_decodes_64_tokens_unless_told(model, tokenizer, reference_ids):
    """The engine and the store decode the same 64 new tokens by default (a model that never stops early)."""
    from semshare_ops.store import KVStore

    out = engine_for(model, tokenizer).generate(reference_ids[:20])
    assert len(out.token_ids) == 64
    assert inspect.signature(KVStore.generate).parameters["max_new_tokens"].default == 64


def test_the_cache_goes_by_the_name_the_model_declares(model, tokenizer, reference_ids, ref_entry):
    """transformers 5.24 renamed forward's and the decoder layers' `past_key_values` to `cache` (the old name
    deprecated, removal announced for 5.40): where the model declares `cache`, no request passes the old name."""
    if "cache" not in inspect.signature(type(model).forward).parameters:
        pytest.skip("this transformers names the cache past_key_values")
    engine = engine_for(model, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.prefill(reference_ids)
        out = engine.generate(edited(reference_ids, "few"), reference=ref_entry, max_new_tokens=2)
        engine.generate(reference_ids, max_new_tokens=2)
    assert out.stats["mode"] == "reuse"
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_layer_slices_cover_exactly_the_layers_given():
    """How `rope_reuse_` is called per group of layers sharing a RoPE: one strided view where the group's layers are
    evenly spaced, else one slice per run of consecutive layers (mixed-attention families, e.g. 5 sliding : 1 global)."""
    from semshare_ops.engine.engine import layer_slices

    assert layer_slices([4]) == [slice(4, 5, 1)]
    assert layer_slices([1, 3, 5, 7]) == [slice(1, 8, 2)]
    assert layer_slices([0, 1, 2, 4, 5, 7]) == [slice(0, 3), slice(4, 6), slice(7, 8)]
    for layers in ([0, 1, 2, 3], [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11], [2, 5, 6, 7, 9], [0, 6, 12, 13]):
        covered = [i for part in layer_slices(layers) for i in range(32)[part]]
        assert covered == layers


def test_prefix_baseline_recomputes_only_the_suffix_and_is_exact(model, tokenizer, reference_ids, ref_entry):
    """Prefix caching: the block-aligned common prefix is exact, every later token is computed in every layer."""
    target = reference_ids[:150] + rand_tokens(30, seed=7)
    engine = engine_for(model, tokenizer, matching="prefix", recompute_ratio=0.0, min_similarity=0.0)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["matched_tokens"] == 144  # 9 whole blocks of 16
    assert out.stats["recomputed_tokens"] == [len(target) - 144] * LAYERS
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


def test_chunk_baseline_reuses_shifted_chunks(model, tokenizer, reference_ids, ref_entry):
    target = rand_tokens(5, seed=8) + reference_ids[:200]
    engine = engine_for(model, tokenizer, matching="chunk", recompute_ratio=0.15, recompute_decay=1.0,
                        check_layers=1)
    out = engine.generate(target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse" and out.stats["matched_tokens"] >= 176
    assert out.stats["recomputed_tokens"][0] == len(target)
    assert len(set(out.stats["recomputed_tokens"][1:])) == 1  # decay 1.0: a fixed count past the first layer


def test_match_is_what_generate_uses(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer)
    target = edited(reference_ids, "insert")
    m = engine.match(ref_entry, target)
    assert m.target_tokens == len(target)
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2)
    assert out.stats["matched_tokens"] == m.matched
    with pytest.raises(TypeError, match="reference"):
        engine.match("not an entry", target)


def test_generate_returns_logits_when_asked(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer)
    target = edited(reference_ids, "replace")
    out, hooked = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=4, output_logits=True,
                                       return_dict_in_generate=True)
    assert len(out.logits) == len(out.token_ids) == 4
    torch.testing.assert_close(out.logits[0][0].float(), hooked)
    assert engine.generate(target, max_new_tokens=2).logits is None


@pytest.mark.parametrize("with_reference", [False, True])
def test_return_entry_holds_the_prompt_cache(model, tokenizer, reference_ids, ref_entry, with_reference):
    engine = engine_for(model, tokenizer)
    target = edited(reference_ids, "delete")
    out = engine.generate(target, reference=ref_entry if with_reference else None, max_new_tokens=NEW,
                          return_entry=True)
    entry = out.entry
    assert isinstance(entry, ReferenceEntry) and entry.token_ids.tolist() == target
    assert entry.keys.shape[:2] == (LAYERS, len(target)) and entry.fingerprint == engine.fingerprint
    if not with_reference:  # a full prefill's entry is the prefill of the same prompt
        fresh = engine.prefill(target)
        torch.testing.assert_close(entry.keys, fresh.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entry.values, fresh.values, atol=1e-5, rtol=1e-5)
        assert torch.equal(entry.codes, fresh.codes)
    # the entry serves an identical request like a prefilled one: same output as a full prefill
    again = engine.generate(target, reference=entry, max_new_tokens=NEW)
    assert again.stats["matched_tokens"] == len(target)
    if not with_reference:
        assert again.token_ids == engine.generate(target, max_new_tokens=NEW).token_ids


def test_return_entry_rejected_with_retention(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer, retain_ratio=0.5)
    with pytest.raises(ValueError, match="return_entry"):
        engine.generate(reference_ids, reference=ref_entry, max_new_tokens=2, return_entry=True)


def test_recompute_tail_is_recomputed_in_every_layer(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer, matching="edit", recompute_ratio=0.0, recompute_tail=24, check_layers=1)
    target = [(reference_ids[0] + 1) % 512] + reference_ids[1:]  # no exact prefix: every row is reused K/V
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2)
    assert out.stats["exact_tokens"] == 0
    # Check layer: every row; then the tail, the unmatched first token and the last prompt token.
    assert out.stats["recomputed_tokens"] == [len(target)] + [24 + 1 + 1] * (LAYERS - 1)
    with pytest.raises(ValueError, match="recompute_tail"):
        ReuseConfig(recompute_tail=-1)


def count_attention_paths(monkeypatch) -> dict:
    """Count the steps semshare_attention sends to SDPA's causal kernel and to partial_attn (fast path on CPU too)."""
    from semshare_ops.engine import hf

    monkeypatch.setattr(hf, "CAUSAL_SDPA_DEVICE_TYPES", ("cpu", "cuda"))
    calls = {"sdpa": 0, "partial": 0}
    causal, partial = hf._causal_sdpa, hf.ops.partial_attn

    def sdpa_spy(*args, **kwargs):
        calls["sdpa"] += 1
        return causal(*args, **kwargs)

    def partial_spy(*args, **kwargs):
        calls["partial"] += 1
        return partial(*args, **kwargs)

    monkeypatch.setattr(hf, "_causal_sdpa", sdpa_spy)
    monkeypatch.setattr(hf.ops, "partial_attn", partial_spy)
    return calls


def force_general_path(monkeypatch) -> None:
    """Make every step take partial_attn (what the fast path must agree with)."""
    from semshare_ops.engine import hf

    monkeypatch.setattr(hf, "CAUSAL_SDPA_DEVICE_TYPES", ("cpu", "cuda"))

    def via_partial_attn(query, key, value, scale):
        positions = torch.arange(key.shape[0])
        return ss_ops.partial_attn(query[0].transpose(0, 1), key, value, positions, positions, scale=scale)[0]

    monkeypatch.setattr(hf, "_causal_sdpa", via_partial_attn)


def test_full_prefill_takes_causal_sdpa_and_agrees_with_partial_attn(model, tokenizer, reference_ids, monkeypatch):
    target = edited(reference_ids, "replace")
    engine = engine_for(model, tokenizer)
    calls = count_attention_paths(monkeypatch)
    fast, fast_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    assert calls["sdpa"] == LAYERS  # the prompt, once per layer
    assert calls["partial"] == LAYERS * (NEW - 1)  # every decode step sees the cache through positions
    monkeypatch.undo()
    force_general_path(monkeypatch)
    general, general_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    assert fast.token_ids == general.token_ids
    torch.testing.assert_close(fast_logits, general_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("retain", [None, 0.6])
def test_reuse_check_layers_take_causal_sdpa(model, tokenizer, reference_ids, ref_entry, retain, monkeypatch):
    """Check layers recompute every position (fast path; for the rows the next layer drops, the last one computes
    only K/V); deeper layers recompute a subset (partial_attn). With retention the observer's scores come out the
    same either way."""
    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "replace")[1:]  # no exact prefix
    engine = engine_for(model, tokenizer, check_layers=2, recompute_ratio=0.6, retain_ratio=retain)
    calls = count_attention_paths(monkeypatch)
    fast, fast_logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=2)
    counts = fast.stats["recomputed_tokens"]
    full_layers = sum(c == len(target) for c in counts)
    assert fast.stats["mode"] == "reuse" and full_layers == 2 and min(counts) < len(target)
    # The first check layer as one causal step; the last computes K/V of every row, then attends for the rows that
    # go on only (partial_attn).
    assert calls["sdpa"] == full_layers - 1
    monkeypatch.undo()
    force_general_path(monkeypatch)
    general, general_logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=2)
    # The same rows and counts; the check layer's deviation to float rounding (the two attention paths sum in
    # different orders, and which one rounds lower depends on the CPU's kernels).
    assert general.stats["check_deviation"] == pytest.approx(fast.stats["check_deviation"], rel=1e-5)
    assert general.stats == {**fast.stats, "ttft_ms": general.stats["ttft_ms"],
                             "check_deviation": general.stats["check_deviation"]}
    torch.testing.assert_close(fast_logits, general_logits, atol=1e-4, rtol=1e-4)


def test_compacted_layers_leave_the_fast_path():
    from semshare_ops.engine.hf import TokenMajorLayer

    layer = TokenMajorLayer(torch.randn(8, 2, 4), torch.randn(8, 2, 4))
    layer.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert layer.causal_step and layer.in_order
    layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert not layer.causal_step and layer.in_order
    layer.keep(torch.tensor([0, 2, 3, 4, 5]))
    assert not layer.in_order
    layer.write_positions = torch.arange(5)  # every live slot rewritten, but slots no longer hold positions 0..4
    layer.update(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert not layer.causal_step


# ---- cache storage handed from one request to the next -----------------------------------------------------------


def test_a_request_lays_its_cache_in_the_last_requests_storage_and_reads_none_of_it(model, tokenizer, reference_ids,
                                                                                    ref_entry):
    """The spare storage is poisoned with NaN: a served request that read one slot it did not write would come out
    NaN. Outputs equal those of requests on new zeroed memory, bit for bit, and the storage really is taken."""
    target = edited(reference_ids, "few")
    engine = engine_for(model, tokenizer)
    expected = [generate_with_logits(engine_for(model, tokenizer), target, reference=ref, max_new_tokens=NEW)
                for ref in (ref_entry, None)]
    for (want, want_logits), ref in zip(expected, (ref_entry, None)):
        size = LAYERS * (len(target) + NEW + 50) * engine.kv_heads * engine.head_dim
        engine._spare = (torch.full((size,), float("nan")), torch.full((size,), float("nan")))
        spare = engine._spare
        seen = []
        real_generate = engine._generate
        engine._generate = lambda ids, cache, kwargs: (seen.append(cache.keys.data_ptr()),
                                                       real_generate(ids, cache, kwargs))[1]
        out, logits = generate_with_logits(engine, target, reference=ref, max_new_tokens=NEW)
        del engine._generate
        assert seen == [spare[0].data_ptr()]  # the request's cache lay in the spare storage
        assert engine._spare is spare  # and it was handed back
        assert out.token_ids == want.token_ids
        assert torch.equal(logits, want_logits)


def test_entries_and_scores_do_not_share_the_storage_handed_on(model, tokenizer, reference_ids, ref_entry):
    """An entry handed back by one request stays as it was while later requests write into the storage it came from;
    score() hands its storage on too."""
    engine = engine_for(model, tokenizer)
    first = engine.generate(edited(reference_ids, "few"), reference=ref_entry, max_new_tokens=NEW, return_entry=True)
    keys, values = first.entry.keys.clone(), first.entry.values.clone()
    engine.generate(edited(reference_ids, "replace"), reference=ref_entry, max_new_tokens=NEW)
    logits, _ = engine.score(edited(reference_ids, "insert"), first.token_ids, reference=ref_entry)
    assert torch.isfinite(logits).all()
    assert torch.equal(first.entry.keys, keys) and torch.equal(first.entry.values, values)
    assert engine._spare is not None
    # A spare too small for the request is not used; the larger storage replaces it.
    small = (torch.zeros(8), torch.zeros(8))
    engine._spare = small
    engine.generate(reference_ids, reference=ref_entry, max_new_tokens=NEW)
    assert engine._spare is not small and engine._spare[0].numel() >= LAYERS * len(reference_ids)
    # prefill() makes the entry from its cache: that storage is never handed on.
    spare = engine._spare
    entry = engine.prefill(reference_ids)
    assert engine._spare is spare and entry.keys.data_ptr() != spare[0].data_ptr()


def test_of_two_storages_handed_back_the_larger_is_kept(model, tokenizer, reference_ids):
    """Two requests at once: the first lays its cache in the spare storage, the second (none left) in new memory
    of its own size. Whichever finishes last, the larger storage is the one kept for the next request."""
    engine = engine_for(model, tokenizer)
    engine.generate(reference_ids, max_new_tokens=2)  # leaves a spare for a whole prompt
    for order in ((0, 1), (1, 0)):
        large = engine._spare
        caches = [engine._request_cache(capacity=8), engine._request_cache(capacity=8)]
        assert caches[0].storage is large and caches[1].storage[0].numel() < large[0].numel()
        for i in order:
            engine._give_back(caches[i])
        assert engine._spare is large, order


def test_an_entry_is_never_copied_from_slots_out_of_position_order(model, tokenizer):
    """An entry's row i is position i's K/V. A cache one of whose layers was compacted (retention) or holds fewer
    slots than the prompt is refused, not copied out misplaced (generate refuses return_entry with retain_ratio
    before this; the check stands behind it)."""
    engine = engine_for(model, tokenizer)
    ids = torch.arange(10, 20)
    assert engine._entry_from_cache(ids, engine._new_cache(capacity=12, used=10), 10).keys.shape[:2] == (LAYERS, 10)
    short = engine._new_cache(capacity=12, used=9)
    compacted = engine._new_cache(capacity=12, used=10)
    compacted.layers[2].keep(torch.tensor([0, 1, 2, 3, 5, 4, 6, 7, 8, 9]))
    for cache in (short, compacted):
        with pytest.raises(RuntimeError, match="prompt slots are not in position order"):
            engine._entry_from_cache(ids, cache, 10)


def test_the_first_layer_capture_stops_only_its_own_thread(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """The engine captures the first layer's input with a hook on the model, which other engines may share: while
    one thread's hook is on (paused there), another thread's engine on the same model serves its request as if the
    hook were not there, and the first then finishes with its own hidden states."""
    import threading

    first, second = engine_for(model, tokenizer), engine_for(model, tokenizer, matching="edit")
    target, other = edited(reference_ids, "replace"), rand_tokens(49, seed=7)
    want_first = first.generate(target, reference=ref_entry, max_new_tokens=NEW, return_entry=True)
    want_second = second.generate(other, max_new_tokens=NEW)

    hooked, go = threading.Event(), threading.Event()
    real_new_cache = first._new_cache

    def pause_inside_the_capture(capacity, *args, **kwargs):
        if capacity == 1 and not hooked.is_set():  # _layer_input's cache: its hook is on the model now
            hooked.set()
            assert go.wait(60)
        return real_new_cache(capacity, *args, **kwargs)

    monkeypatch.setattr(first, "_new_cache", pause_inside_the_capture)
    got = {}

    def serve_first():
        try:
            got["first"] = first.generate(target, reference=ref_entry, max_new_tokens=NEW, return_entry=True)
        except BaseException as err:  # noqa: BLE001 -- checked below
            got["first"] = err

    thread = threading.Thread(target=serve_first)
    thread.start()
    try:
        assert hooked.wait(60)
        got["second"] = second.generate(other, max_new_tokens=NEW)
    finally:
        go.set()
        thread.join(60)
    assert got["second"].token_ids == want_second.token_ids
    assert not isinstance(got["first"], BaseException), got["first"]
    assert got["first"].token_ids == want_first.token_ids
    assert torch.equal(got["first"].entry.keys, want_first.entry.keys)
    assert torch.equal(got["first"].entry.values, want_first.entry.values)


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float64])
def test_torchs_default_dtype_changes_nothing(model, tokenizer, reference_ids, default):
    """A default dtype other than fp32 (left set after building a bf16 model, say) reached the LSH planes and the
    ranking's accumulator: prefill refused the engine's own planes, and in bf16 the rows chosen moved. Every float
    the engine and the store make for themselves is fp32: the same rows, bit for bit, under any default."""
    from semshare_ops.store import KVStore

    config = dict(recompute_decay=0.7, recompute_ratio=0.3)  # a shrinking set: the ranking accumulates
    target = edited(reference_ids, "replace")
    engine = engine_for(model, tokenizer, **config)
    want = engine.generate(target, reference=engine.prefill(reference_ids), max_new_tokens=4, return_entry=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        other = engine_for(model, tokenizer, **config)
        got = other.generate(target, reference=other.prefill(reference_ids), max_new_tokens=4, return_entry=True)
        store = KVStore(other)
        store.generate(reference_ids, max_new_tokens=2)
        served = store.generate(target, max_new_tokens=2)
    finally:
        torch.set_default_dtype(previous)
    assert got.token_ids == want.token_ids and got.stats["recomputed_tokens"] == want.stats["recomputed_tokens"]
    assert torch.equal(got.entry.keys, want.entry.keys) and torch.equal(got.entry.values, want.entry.values)
    assert served.stats["hit"]


@pytest.mark.parametrize("flips, share, dtype", [(1, None, torch.float32), (3, None, torch.float32),
                                                 (3, 0.02, torch.float32), (3, 0.1, torch.bfloat16)])
def test_self_check_tries_other_prompts_before_refusing(tokenizer, flips, share, dtype):
    """In half precision, rounding can flip a mixture-of-experts routing at a near-tie on one row of the check's
    prompt (gpt-oss and param2moe were refused so in bf16). Stand-in: the model's own logits are put off on one row
    for the first `flips` prompts, by 1 or by `share` of the largest logit. One prompt off: the next two agree and
    the model is served; every prompt off (an engine that computes something else than the model): refused, naming
    the difference, in fp32 down to 2% and in bf16 down to 10% (half precision's tolerance is 5%, fp32's 0.1%)."""
    from semshare_ops.engine import ReuseEngine
    from semshare_ops.engine.architecture import UnsupportedModelError

    model = build_model("llama", seed=0).to(dtype)
    forward, calls = model.forward, []

    def stock_off(*args, **kwargs):
        out = forward(*args, **kwargs)
        if kwargs.get("use_cache") is False:  # the check's stock call (the engine's own calls use its cache)
            calls.append(len(calls))
            if len(calls) <= flips:
                out.logits[0, 3] += 1.0 if share is None else share * out.logits.abs().max().clamp_min(1.0)
        return out

    model.forward = stock_off
    if flips == 1:
        engine = ReuseEngine(model, tokenizer, ReuseConfig())
        assert len(calls) == 2
        assert engine.generate(rand_tokens(30, seed=5), max_new_tokens=2).stats["mode"] == "full"
    else:
        size = "1" if share is None else r"0\.\d+"
        with pytest.raises(UnsupportedModelError,
                           match=rf"differ from its own attention by {size} .*\(and on two more\)"):
            ReuseEngine(model, tokenizer, ReuseConfig())
        assert len(calls) == 3


@pytest.mark.parametrize("key_scale", [1.0, 1e-3])
def test_self_check_refuses_a_model_that_acts_between_its_layers(tokenizer, key_scale):
    """The engine runs a model's decoder layers one by one; a model whose own forward changes the hidden states
    between two layers (stand-in: layer 1's input scaled by 1.01, only inside the model's forward) gives the same
    logits through semshare attention as through its own, but its K/V recomputed layer by layer differ: refused.
    The error is relative to the keys' size, so keys a thousandth of the usual scale are refused the same way."""
    from semshare_ops.engine import ReuseEngine
    from semshare_ops.engine.architecture import UnsupportedModelError

    model = build_model("llama", seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(key_scale)
    inside = []
    model.model.register_forward_pre_hook(lambda module, args: inside.append(True))
    # always_call: the engine reads layer 0's input by stopping the model's forward with an exception
    model.model.register_forward_hook(lambda module, args, out: inside.clear(), always_call=True)

    def between(module, args, kwargs):
        return ((args[0] * 1.01,) + args[1:], kwargs) if inside else None

    model.model.layers[1].register_forward_pre_hook(between, with_kwargs=True)
    with pytest.raises(UnsupportedModelError, match=r"its keys recomputed layer by layer differ from its own "
                                                    r"forward's by 0\.0\d+ \(relative\)"):
        ReuseEngine(model, tokenizer, ReuseConfig())


# ---- the shims on their own: the token-major layer, the cache, what an attention call passes ----------------------


def _kv(n, seed, heads=2, dim=5, v_dim=6):
    """K and V of n tokens as an attention module hands them to the cache: [1, H, n, D]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, n, dim, generator=g), torch.randn(1, heads, n, v_dim, generator=g)


def _token_major(*states):
    return torch.cat(states, 2)[0].transpose(0, 1)


def test_token_major_layer_appends_grows_and_reports_its_sizes():
    """Appends go to the next slots at the next positions; a full layer doubles, or grows to what it needs when that
    is more, keeping what it holds; empty slots have position -1."""
    from semshare_ops.engine.hf import TokenMajorLayer

    layer = TokenMajorLayer(torch.zeros(4, 2, 5), torch.zeros(4, 2, 6))
    assert layer.kv_pos.tolist() == [-1] * 4 and layer.used == layer.length == 0
    k1, v1 = _kv(3, seed=1)
    keys, values = layer.update(k1, v1)
    assert torch.equal(keys, _token_major(k1)) and torch.equal(values, _token_major(v1))
    k2, v2 = _kv(3, seed=2)  # 6 tokens in 4 slots: doubled to 8
    keys, values = layer.update(k2, v2)
    assert layer.keys.shape == (8, 2, 5) and layer.values.shape == (8, 2, 6)
    assert torch.equal(keys, _token_major(k1, k2)) and torch.equal(values, _token_major(v1, v2))
    assert layer.kv_pos.tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and layer.step_positions.tolist() == [3, 4, 5]
    assert layer.used == layer.length == layer.get_seq_length() == 6
    assert layer.nbytes() == 6 * (2 * 5 + 2 * 6) * 4
    assert layer.get_mask_sizes(3) == (9, 0) and layer.get_max_length() == -1
    k3, v3 = _kv(11, seed=3)  # 17 tokens: more than twice 8, grown to 17
    keys, values = layer.update(k3, v3)
    assert layer.keys.shape[0] == 17 and layer.kv_pos.tolist() == list(range(17))
    assert torch.equal(keys, _token_major(k1, k2, k3)) and torch.equal(values, _token_major(v1, v2, v3))

    layer.keep(torch.tensor([0, 3, 16]))  # compacted to 3 slots: the next token goes to slot 3 at position 17
    k4, v4 = _kv(1, seed=4)
    keys, values = layer.update(k4, v4)
    assert layer.kv_pos.tolist() == [0, 3, 16, 17, -1, -1] and layer.used == 4 and layer.length == 18  # 3 slots doubled
    assert torch.equal(keys, torch.cat([_token_major(k1, k2, k3)[[0, 3, 16]], _token_major(k4)]))
    assert torch.equal(values, torch.cat([_token_major(v1, v2, v3)[[0, 3, 16]], _token_major(v4)]))
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="batch size must be 1"):
        layer.update(*(torch.cat([s, s]) for s in _kv(1, seed=5)))


def test_a_compacted_layer_is_never_in_order_again():
    """Compaction ends slot == position for good: not after a compaction that keeps every position (reordered), nor
    after one that keeps none, where the next tokens land in slot 0 at the positions after the last."""
    from semshare_ops.engine.hf import TokenMajorLayer

    layer = TokenMajorLayer(torch.zeros(4, 2, 5), torch.zeros(4, 2, 6))
    layer.update(*_kv(3, seed=9))
    layer.keep(torch.tensor([2, 1, 0]))
    layer.update(*_kv(1, seed=10))
    assert not layer.in_order and not layer.causal_step and layer.kv_pos[:4].tolist() == [2, 1, 0, 3]
    layer.write_positions = torch.arange(4)  # every position rewritten, at slots that held others
    layer.update(*_kv(4, seed=11))
    assert not layer.causal_step
    layer.keep(torch.zeros(0, dtype=torch.long))
    layer.write_positions = None
    layer.update(*_kv(2, seed=12))
    assert not layer.causal_step and layer.kv_pos.tolist() == [4, 5] and layer.used == 2 and layer.length == 6


def test_token_major_layer_recomputes_in_place_and_stops_after_a_kv_only_write():
    """A layer that starts with `used` positions; a recompute writes slot == position and counts nothing new (a causal
    step only when it rewrites every position); a K/V-only layer raises KVWritten once its K/V are in."""
    from semshare_ops.engine.hf import KVWritten, TokenMajorLayer

    start_k, start_v = torch.randn(6, 2, 5), torch.randn(6, 2, 6)
    layer = TokenMajorLayer(start_k.clone(), start_v.clone(), used=3)
    assert layer.kv_pos.tolist() == [0, 1, 2, -1, -1, -1] and layer.used == layer.length == 3
    layer.write_positions = torch.tensor([0, 2])
    k, v = _kv(2, seed=6)
    keys, values = layer.update(k, v)
    assert keys.shape[0] == 3 and torch.equal(keys[[0, 2]], _token_major(k)) and torch.equal(keys[1], start_k[1])
    assert torch.equal(values[[0, 2]], _token_major(v)) and torch.equal(values[1], start_v[1])
    assert layer.used == layer.length == 3 and layer.step_positions.tolist() == [0, 2] and not layer.causal_step
    layer.write_positions = torch.arange(3)
    layer.update(*_kv(3, seed=7))
    assert layer.causal_step and layer.used == 3

    layer.write_positions, layer.stop_after_write = None, True
    k, v = _kv(2, seed=8)
    with pytest.raises(KVWritten):
        layer.update(k, v)
    assert torch.equal(layer.keys[3:5], _token_major(k)) and layer.kv_pos.tolist() == [0, 1, 2, 3, 4, -1]


def test_a_layer_that_returns_a_tuple_is_read_as_one_that_returns_its_hidden_states(model, tokenizer, monkeypatch):
    """Decoder layers of transformers 5 return their hidden states; older and remote-code ones a tuple whose first
    item they are. _run_layer reads both alike."""
    engine = engine_for(model, tokenizer)
    rows = torch.arange(4)
    layer = engine.decoder.layers[1]
    plain = layer.forward
    outputs = []
    for wrap in (False, True):
        if wrap:
            monkeypatch.setattr(layer, "forward", lambda *args, **kwargs: (plain(*args, **kwargs), None))
        cache = engine._new_cache(capacity=4)
        with torch.inference_mode(), cache.active():
            outputs.append(engine._run_layer(1, engine._layer_input(torch.arange(10, 14), rows), rows, cache))
    assert isinstance(outputs[1], torch.Tensor) and torch.equal(outputs[0], outputs[1])


def test_a_kv_only_pass_that_never_writes_is_an_error(model, tokenizer, monkeypatch):
    """_write_kv runs a layer only up to its K/V write. A layer that returns without writing to the cache (a family
    whose attention keeps its own) would leave the rows' old K/V in place: an error, and the layer's flag is reset
    either way."""
    engine = engine_for(model, tokenizer)
    rows = torch.arange(4)
    cache = engine._new_cache(capacity=4)
    with torch.inference_mode(), cache.active():
        hidden = engine._layer_input(torch.arange(10, 14), rows)
        engine._write_kv(1, hidden, rows, cache)  # a real layer stops at its write
        assert not cache.layers[1].stop_after_write and cache.layers[1].kv_pos.tolist() == [0, 1, 2, 3]
        monkeypatch.setattr(engine.decoder.layers[1], "forward", lambda hidden_states, **kwargs: hidden_states)
        with pytest.raises(RuntimeError, match="decoder layer 1 ran to its end without writing K/V"):
            engine._write_kv(1, hidden, rows, cache)
    assert not cache.layers[1].stop_after_write


def test_cache_allocation_lays_its_layers_in_storage_that_fits():
    """allocate: one [L, capacity, H, D] K and V allocation, the layers views of it, each with `used` positions; the
    storage of an earlier cache is taken when it is of the dtype and device and at least as large, else refused."""
    from semshare_ops.engine.hf import SemShareCache

    cache = SemShareCache.allocate(3, 5, 2, 4, 6, torch.float32, "cpu", used=2)
    assert cache.keys.shape == (3, 5, 2, 4) and cache.values.shape == (3, 5, 2, 6) and len(cache.layers) == 3
    assert all(layer.used == 2 and layer.kv_pos.tolist() == [0, 1, -1, -1, -1] for layer in cache.layers)
    assert cache.layers[2].keys.data_ptr() == cache.keys[2].data_ptr() == cache.storage[0].data_ptr() + 2 * 40 * 4
    assert cache.layers[1].values.data_ptr() == cache.values[1].data_ptr() == cache.storage[1].data_ptr() + 60 * 4
    assert cache.observe == cache.retain_observe == 0 and cache.stale.numel() == 0 and not cache.dropped
    assert cache.nbytes() == 3 * 2 * (2 * 4 + 2 * 6) * 4
    cache.set_write_positions(1, torch.tensor([1]))
    assert cache.layers[1].write_positions.tolist() == [1] and cache.layers[0].write_positions is None

    storage = (torch.randn(3 * 5 * 2 * 4 + 7), torch.randn(3 * 5 * 2 * 6))
    again = SemShareCache.allocate(3, 5, 2, 4, 6, torch.float32, "cpu", storage=storage)
    assert again.storage is storage and again.keys.data_ptr() == storage[0].data_ptr()
    assert again.values.data_ptr() == storage[1].data_ptr()
    assert all(layer.used == layer.length == 0 and layer.kv_pos.tolist() == [-1] * 5 for layer in again.layers)
    for bad in [(storage[0][:119], storage[1]), (storage[0], storage[1][:179]), (storage[0].double(), storage[1]),
                (storage[0], storage[1].half()), (storage[0], torch.empty(180, device="meta"))]:
        with pytest.raises(RuntimeError, match="storage handed in is too small or of another dtype or device"):
            SemShareCache.allocate(3, 5, 2, 4, 6, torch.float32, "cpu", storage=bad)


def test_visibility_takes_window_cap_and_sinks_and_refuses_the_rest():
    from semshare_ops.engine.hf import Visibility, visibility

    module = torch.nn.Identity()
    none = visibility(module, {"dropout": 0.0, "sliding_window": None, "softcap": None, "position_ids": 1,
                               "is_causal": True, "head_mask": None})
    assert none == Visibility() == Visibility(-1, 0.0, None) and none.plain
    with pytest.raises(dataclasses.FrozenInstanceError):
        none.window = 8
    sinks = torch.tensor([0.5, -1.25], dtype=torch.bfloat16, requires_grad=True)
    vis = visibility(module, {"sliding_window": 4096, "softcap": 50, "s_aux": sinks, "scaling": 0.125})
    assert vis.window == 4096 and type(vis.softcap) is float and vis.softcap == 50.0 and not vis.plain
    assert vis.sinks.dtype == torch.float32 and not vis.sinks.requires_grad and vis.sinks.tolist() == [0.5, -1.25]
    assert not Visibility(window=8).plain and not Visibility(softcap=30.0).plain
    assert not Visibility(sinks=torch.zeros(2)).plain
    with pytest.raises(NotImplementedError, match=r"Identity: .* the argument\(s\) alibi, head_mask that this model"):
        visibility(module, {"head_mask": torch.ones(1), "alibi": 1, "sliding_window": 8, "unused": None})
    with pytest.raises(NotImplementedError, match="Identity: attention dropout 0.1 \\(eval mode only\\)"):
        visibility(module, {"dropout": 0.1})


def test_attention_received_is_each_querys_softmax_weight_on_each_visible_slot():
    """Against a loop over queries, heads and slots: softmax of the (capped) logits over the keys the query sees
    (position known, not after it, inside the window), summed over the query heads (two per K/V head)."""
    from semshare_ops.engine.hf import Visibility, _attention_received

    g = torch.Generator().manual_seed(11)
    q, key = torch.randn(3, 4, 8, generator=g) * 2, torch.randn(6, 2, 8, generator=g)
    kv_pos, q_pos, scale = torch.tensor([0, 5, 2, -1, 4, 3]), torch.tensor([3, 4, 5]), 0.4
    for window, softcap, sink in [(-1, 0.0, None), (3, 2.5, None), (-1, 0.0, 0.7)]:
        logit = [[[float(q[i, h] @ key[j, h // 2]) * scale for j in range(6)] for h in range(4)] for i in range(3)]
        if softcap:
            logit = [[[softcap * math.tanh(x / softcap) for x in row] for row in head] for head in logit]
        sees = [[0 <= kv_pos[j] <= q_pos[i] and (window < 0 or kv_pos[j] > q_pos[i] - window) for j in range(6)]
                for i in range(3)]
        lse = torch.tensor([[math.log(sum(math.exp(logit[i][h][j]) for j in range(6) if sees[i][j])
                                      + (math.exp(sink) if sink is not None else 0.0)) for h in range(4)]
                            for i in range(3)])
        expected = torch.tensor([[sum(math.exp(logit[i][h][j] - lse[i, h]) for h in range(4)) if sees[i][j] else 0.0
                                  for j in range(6)] for i in range(3)])
        vis = Visibility(window, softcap, None if sink is None else torch.full((4,), sink))
        received = _attention_received(q, key, q_pos, kv_pos, lse, scale, vis)
        torch.testing.assert_close(received, expected, atol=1e-5, rtol=1e-5)
        if sink is None:  # every head's weights sum to one over what the query sees
            torch.testing.assert_close(received.sum(1), torch.full((3,), 4.0))
    assert sees[0] == [True, False, True, False, False, True]


def test_outside_a_semshare_cache_calls_go_to_the_previous_attention(monkeypatch):
    """The mask and attention of the implementation a model had before; "eager" is the modeling file's own function,
    and a module whose file has none is refused. Inside an active cache: no mask."""
    from transformers.models.llama import modeling_llama

    from semshare_ops.engine import hf

    config = modeling_llama.LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    assert hf.previous_implementation(config) == "sdpa"  # a config never switched
    monkeypatch.setitem(hf._PREVIOUS_ATTENTION, id(config), "eager")
    attention = modeling_llama.LlamaAttention(config, layer_idx=0)
    assert hf._previous_attention(attention) is modeling_llama.eager_attention_forward

    class Attention(torch.nn.Module):  # defined here, where no eager_attention_forward is
        pass

    module = Attention()
    module.config = config
    with pytest.raises(NotImplementedError, match="Attention: no eager_attention_forward in its modeling file"):
        hf._previous_attention(module)
    monkeypatch.setitem(hf._PREVIOUS_ATTENTION, id(config), "sdpa")
    assert hf._previous_attention(module) is hf.ALL_ATTENTION_FUNCTIONS["sdpa"]

    cache = hf.SemShareCache.allocate(1, 2, 1, 8, 8, torch.float32, "cpu")
    with cache.active() as active:
        assert active is cache and hf._ACTIVE_CACHE.get() is cache
        assert hf.semshare_mask(config=config, mask_function=None) is None
    assert hf._ACTIVE_CACHE.get() is None


def _attention_by_hand(query, key, value, q_pos, kv_pos, scale, window=-1):
    """Softmax attention written out: queries [1, Hq, n, D] over token-major keys [slots, Hkv, D] at the given
    positions; returns the output [n, Hq, Dv] and the weights [n, Hq, slots]."""
    q = query[0].transpose(0, 1)
    group = q.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    visible = (kv_pos[None, :] >= 0) & (kv_pos[None, :] <= q_pos[:, None])
    if window > 0:
        visible &= kv_pos[None, :] > q_pos[:, None] - window
    logits = torch.einsum("qhd,khd->qhk", q, k) * scale
    weights = torch.softmax(logits.masked_fill(~visible[:, None, :], float("-inf")), -1)
    return torch.einsum("qhk,khd->qhd", weights, v), weights


def test_semshare_attention_serves_the_active_layer(monkeypatch):
    """Inside an active cache: attention over the layer's slots at their positions, with the call's scale (else
    1/sqrt(D)) and window; the window recorded on the layer; on CPU never SDPA's causal kernel, and nowhere for a
    windowed step; the observers' scores only for a recompute step, over the last `observe` / `retain_observe`
    queries."""
    from semshare_ops.engine import hf

    monkeypatch.setattr(hf, "_causal_sdpa", lambda *args: pytest.fail("this step must not go to SDPA"))
    g = torch.Generator().manual_seed(21)
    module = torch.nn.Module()
    module.layer_idx = 1
    cache = hf.SemShareCache.allocate(2, 8, 2, 8, 8, torch.float32, "cpu")
    cache.observe, cache.retain_observe = 2, 3
    layer, pos = cache.layers[1], torch.arange(6)
    key, value = layer.update(torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g))
    query = torch.randn(1, 4, 6, 8, generator=g)
    assert layer.causal_step  # a prefill: SDPA's on CUDA only
    with cache.active():
        out, weights = hf.semshare_attention(module, query, key, value, None, scaling=None, dropout=0.0)
        assert out.shape == (1, 6, 4, 8) and weights is None and layer.window == -1 and layer.scores is None
        torch.testing.assert_close(out[0], _attention_by_hand(query, key, value, pos, pos, 8 ** -0.5)[0])
        monkeypatch.setattr(hf, "CAUSAL_SDPA_DEVICE_TYPES", ("cpu", "cuda"))
        out, _ = hf.semshare_attention(module, query, key, value, None, scaling=0.3, sliding_window=4)
        assert layer.window == 4 and layer.scores is None and layer.retain_scores is None
        torch.testing.assert_close(out[0], _attention_by_hand(query, key, value, pos, pos, 0.3, window=4)[0])

        layer.write_positions = torch.tensor([2, 3, 4, 5])  # a recompute of the last four positions
        key, value = layer.update(torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g))
        query = torch.randn(1, 4, 4, 8, generator=g)
        out, _ = hf.semshare_attention(module, query, key, value, None, scaling=0.3)
    expected, weights = _attention_by_hand(query, key, value, layer.write_positions, pos, 0.3)
    torch.testing.assert_close(out[0], expected)
    received = weights.sum(1)  # [queries, slots]: summed over the heads
    torch.testing.assert_close(layer.scores, received[-2:].sum(0))
    torch.testing.assert_close(layer.retain_scores, received[-3:].sum(0))


def test_a_call_with_the_models_own_cache_goes_to_the_previous_attention():
    """Inside an active semshare cache, K/V in HF's [1, H, n, D] layout (not a token-major layer's) go to the
    attention the model had before."""
    from transformers.models.llama import modeling_llama

    from semshare_ops.engine import hf

    config = modeling_llama.LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    module = modeling_llama.LlamaAttention(config, layer_idx=0).eval()
    g = torch.Generator().manual_seed(22)
    query, key, value = (torch.randn(1, h, 5, 8, generator=g) for h in (2, 1, 1))
    expected, _ = hf.ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, scaling=0.3)
    with hf.SemShareCache.allocate(1, 8, 1, 8, 8, torch.float32, "cpu").active():
        out, _ = hf.semshare_attention(module, query, key, value, None, scaling=0.3)
    assert torch.equal(out, expected)


def test_outside_a_cache_the_mask_is_the_previous_ones_and_its_window_is_collected_when_watched(monkeypatch):
    from transformers import masking_utils

    from semshare_ops.engine import hf

    calls = []
    monkeypatch.setattr(hf, "ALL_MASK_ATTENTION_FUNCTIONS", {"sdpa": lambda *a, **k: calls.append((a, k)) or "mask"})
    config, causal = transformers.LlamaConfig(), masking_utils.causal_mask_function
    assert hf.semshare_mask(7, config=config, mask_function=causal) == "mask"  # not watched: nothing collected
    assert calls == [((7,), {"config": config, "mask_function": causal})]
    with hf.watching_mask_windows() as windows:
        hf.semshare_mask(config=config, mask_function=masking_utils.sliding_window_causal_mask_function(4))
        hf.semshare_mask(config=config, mask_function=causal)
    assert windows == [4, None] and len(calls) == 3 and hf._MASK_WINDOWS.get() is None


def test_prefix_only_takes_the_exact_common_prefix_and_nothing_else(model, tokenizer, reference_ids, ref_entry):
    """generate(prefix_only=True), the store's path for a base under the gate: the reference's rows shared exactly
    with the prompt are taken as they are, whatever the similarity, and every other row is computed in every layer:
    the full prefill's tokens and logits for less work. A similar prompt is served the same way (no reuse past the
    prefix), and no gate applies (a prefix of one token is taken)."""
    engine = engine_for(model, tokenizer)
    n, k = len(reference_ids), 100
    for tail in (rand_tokens(n, seed=41), list(reference_ids[k + 1:])):  # unrelated, or the reference's own
        target = list(reference_ids[:k]) + [int(reference_ids[k]) ^ 1] + tail[:n - k - 1]
        full = engine.generate(target, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True)
        out = engine.generate(target, reference=ref_entry, max_new_tokens=NEW, prefix_only=True, output_logits=True,
                              return_dict_in_generate=True, min_similarity=1.0)
        assert out.stats["mode"] == "reuse" and out.stats["exact_tokens"] == k
        assert out.stats["matched_tokens"] == k and out.stats["recomputed_tokens"] == [len(target) - k] * LAYERS
        assert out.token_ids == full.token_ids
        torch.testing.assert_close(torch.cat(out.logits), torch.cat(full.logits), atol=1e-4, rtol=1e-4)
    target = [int(reference_ids[0])] + rand_tokens(n - 1, seed=42)
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2, prefix_only=True)
    assert out.stats["mode"] == "reuse" and out.stats["exact_tokens"] == 1


def test_a_forward_that_never_reaches_the_first_layer_is_named(model, tokenizer, monkeypatch):
    """_layer_input stops the model's own forward at its first decoder layer; a forward that returns without calling
    it (a model the engine misreads) is an error that says so, not an IndexError."""
    engine = engine_for(model, tokenizer)
    monkeypatch.setattr(engine.decoder, "forward", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="never called its first decoder layer"):
        engine._layer_input(torch.tensor([5, 6, 7]), torch.arange(3))
    # A forward that hands its first layer the hidden states by keyword is read as well as one that passes them by
    # position (every decoder served here does the latter)
    decoder = engine.decoder
    monkeypatch.setattr(decoder, "forward", lambda input_ids, **kwargs: decoder.layers[0](
        hidden_states=decoder.embed_tokens(input_ids)))
    ids = torch.tensor([5, 6, 7])
    torch.testing.assert_close(engine._layer_input(ids, torch.arange(3)), decoder.embed_tokens(ids[None]))


def test_an_entrys_embedding_is_the_mean_of_its_prompts_input_embeddings(model, tokenizer, reference_ids, ref_entry):
    """The store's retrieval key hashes it: fp32 [hidden], the mean over the prompt's tokens, for an entry made by
    prefill and one handed back by a reuse request alike."""
    engine = engine_for(model, tokenizer)
    target = edited(reference_ids, "few")
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2, return_entry=True)
    for entry, ids in ((ref_entry, reference_ids), (out.entry, target)):
        want = model.model.embed_tokens(torch.as_tensor(list(ids))).detach().double().mean(0)
        assert entry.embedding.dtype == torch.float32 and entry.embedding.shape == want.shape
        torch.testing.assert_close(entry.embedding.double(), want, atol=1e-6, rtol=1e-5)
