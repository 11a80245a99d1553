"""The stats contract of docs/contract.md section 5, the similarity gate, bad input and the config.

On small randomly initialised Llama and Qwen2 models (fixtures in conftest.py)."""

import dataclasses
import re
import time

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402
from semshare_ops.engine.rows import decaying_counts  # noqa: E402

from engine_testutils import (
    EDITS, HEAD_DIM, REF_LEN, KV_HEADS, LAYERS, MAX_POS, NEW, STATS_KEYS, VOCAB, FakeTokenizer, build_model, edited,
    engine_for,
    generate_with_logits, rand_tokens)  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def check_stats(stats: dict, prompt_tokens: int, elapsed_ms: float):
    assert STATS_KEYS <= set(stats), f"missing stats keys: {STATS_KEYS - set(stats)}"
    assert stats["mode"] in ("full", "reuse", "fallback")
    for key in ("prompt_tokens", "matched_tokens", "kv_bytes", "kv_bytes_full"):
        assert isinstance(stats[key], int) and not isinstance(stats[key], bool), key
    assert stats["prompt_tokens"] == prompt_tokens
    assert 0 <= stats["matched_tokens"] <= prompt_tokens
    rec = stats["recomputed_tokens"]
    assert isinstance(rec, list) and len(rec) == LAYERS
    assert all(isinstance(c, int) and 1 <= c <= prompt_tokens for c in rec)
    assert isinstance(stats["reuse_ratio"], float)
    assert stats["reuse_ratio"] == pytest.approx(1 - sum(rec) / (LAYERS * prompt_tokens), abs=1e-12)
    assert 0.0 <= stats["reuse_ratio"] <= 1.0
    # what a full prefill holds: layers x tokens x (K + V) x kv heads x head dim x fp32
    assert stats["kv_bytes_full"] == LAYERS * prompt_tokens * 2 * KV_HEADS * HEAD_DIM * 4
    assert 0 < stats["kv_bytes"] <= stats["kv_bytes_full"]
    assert isinstance(stats["ttft_ms"], float) and 0 < stats["ttft_ms"] <= elapsed_ms
    sim = stats["similarity"]
    assert sim is None or (isinstance(sim, float) and 0.0 <= sim <= 1.0)


def timed(engine, prompt, **kwargs):
    start = time.perf_counter()
    out = engine.generate(prompt, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def test_stats_full(model, tokenizer, reference_ids):
    target = edited(reference_ids, "replace")
    out, ms = timed(engine_for(model, tokenizer), target, max_new_tokens=NEW)
    s = out.stats
    check_stats(s, len(target), ms)
    assert s["mode"] == "full" and s["similarity"] is None and s["reuse_ratio"] == 0.0
    assert s["matched_tokens"] == 0 and s["recomputed_tokens"] == [len(target)] * LAYERS
    assert s["kv_bytes"] == s["kv_bytes_full"]
    assert s["exact_tokens"] == 0 and s["check_deviation"] is None  # nothing taken from a reference, nothing ranked


@pytest.mark.parametrize("method", ["edit", "lsh", "hybrid"])
@pytest.mark.parametrize("kind", EDITS)
def test_stats_reuse(model, tokenizer, reference_ids, ref_entry, method, kind):
    target = edited(reference_ids, kind)
    out, ms = timed(engine_for(model, tokenizer, matching=method), target, reference=ref_entry, max_new_tokens=4)
    s = out.stats
    check_stats(s, len(target), ms)
    assert s["similarity"] == pytest.approx(s["matched_tokens"] / len(target))
    if method == "lsh" and kind in ("insert", "delete"):
        # position is folded into the LSH codes, so tokens shifted by an insertion / deletion mostly stay
        # unmatched and the request may fall back: the stats are still complete (checked above)
        assert s["mode"] in ("reuse", "fallback")
        return
    assert s["mode"] == "reuse"
    assert s["matched_tokens"] >= 0.8 * len(target)
    assert s["reuse_ratio"] > 0.0
    unmatched = len(target) - s["matched_tokens"]
    # step 4: the unmatched tokens and the last prompt token are recomputed in every layer
    assert all(c >= unmatched + (1 if unmatched < len(target) else 0) for c in s["recomputed_tokens"])
    assert all(b <= a for a, b in zip(s["recomputed_tokens"], s["recomputed_tokens"][1:])), "must not grow w/ depth"


def test_check_deviation_is_over_every_matched_row(model, tokenizer, reference_ids, ref_entry):
    """The check layers recompute every row, so the deviation there is one number whatever the budget makes
    mandatory later: the matched rows of the tail, of the query window or of retention's observer window count, as
    the contract says (the mean over the matched rows)."""
    target = edited(reference_ids, "few")
    base = engine_for(model, tokenizer).generate(target, reference=ref_entry, max_new_tokens=1).stats
    assert base["check_deviation"] > 0.0
    for kwargs in ({"recompute_tail": 200}, {"selection": "attention"}, {"retain_ratio": 0.5}):
        stats = engine_for(model, tokenizer, **kwargs).generate(target, reference=ref_entry, max_new_tokens=1).stats
        assert stats["check_deviation"] == pytest.approx(base["check_deviation"], rel=1e-5), kwargs


def test_stats_fallback(model, tokenizer, reference_ids, ref_entry):
    target = rand_tokens(250, seed=999)
    out, ms = timed(engine_for(model, tokenizer), target, reference=ref_entry, max_new_tokens=4)
    check_stats(out.stats, len(target), ms)
    assert out.stats["mode"] == "fallback"
    assert out.stats["reuse_ratio"] == 0.0 and out.stats["kv_bytes"] == out.stats["kv_bytes_full"]
    assert out.stats["exact_tokens"] == 0 and out.stats["check_deviation"] is None
    assert out.stats["recomputed_tokens"] == [len(target)] * LAYERS


@pytest.mark.parametrize("method", ["edit", "lsh", "hybrid"])
def test_unrelated_target_falls_back_to_full_prefill(model, tokenizer, ref_entry, method):
    target = rand_tokens(250, seed=999)
    engine = engine_for(model, tokenizer, matching=method, min_similarity=0.5)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "fallback"
    assert out.stats["similarity"] is not None and out.stats["similarity"] < 0.5
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-5, rtol=1e-5)


def test_min_similarity_is_the_threshold(model, tokenizer, reference_ids, ref_entry):
    unrelated = rand_tokens(250, seed=999)
    out = engine_for(model, tokenizer, min_similarity=0.0).generate(unrelated, reference=ref_entry, max_new_tokens=2)
    assert out.stats["mode"] == "reuse"  # nothing is too dissimilar at threshold 0
    target = edited(reference_ids, "replace")
    out = engine_for(model, tokenizer, min_similarity=1.0).generate(target, reference=ref_entry, max_new_tokens=2)
    assert out.stats["mode"] == "fallback" and out.stats["similarity"] < 1.0
    out = engine_for(model, tokenizer, min_similarity=1.0).generate(reference_ids, reference=ref_entry,
                                                                    max_new_tokens=2)
    assert out.stats["mode"] == "reuse"


def test_empty_prompt_rejected(model, tokenizer, ref_entry):
    engine = engine_for(model, tokenizer)
    for call in (lambda: engine.generate([], max_new_tokens=2), lambda: engine.generate("", max_new_tokens=2),
                 lambda: engine.generate([], reference=ref_entry, max_new_tokens=2), lambda: engine.prefill([])):
        with pytest.raises(ValueError, match="prompt"):
            call()


def test_reference_from_another_model_rejected(arch, model, tokenizer, reference_ids):
    other = build_model(arch, seed=1)  # same architecture and sizes, other weights
    foreign = engine_for(other, tokenizer).prefill(reference_ids)
    with pytest.raises(ValueError, match="reference"):
        engine_for(model, tokenizer).generate(reference_ids, reference=foreign, max_new_tokens=2)
    other_arch = build_model("qwen2" if arch == "llama" else "llama", seed=0)
    foreign = engine_for(other_arch, tokenizer).prefill(reference_ids)
    with pytest.raises(ValueError, match="reference"):
        engine_for(model, tokenizer).generate(reference_ids, reference=foreign, max_new_tokens=2)


def test_prompt_too_long_rejected(model, tokenizer, ref_entry):
    engine = engine_for(model, tokenizer)
    too_long = rand_tokens(MAX_POS + 1, seed=5)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(too_long, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(too_long, reference=ref_entry, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt"):
        engine.prefill(too_long)
    with pytest.raises(ValueError):  # fits alone, but not with the new tokens
        engine.generate(too_long[: MAX_POS - 4], max_new_tokens=8)


def test_token_ids_out_of_vocab_rejected(model, tokenizer):
    engine = engine_for(model, tokenizer)
    for bad in ([5, VOCAB, 7], [5, -1, 7]):
        with pytest.raises(ValueError, match="prompt"):
            engine.generate(bad, max_new_tokens=2)


@pytest.mark.parametrize("field, value", [("matching", "foo"), ("recompute_ratio", 1.5), ("recompute_ratio", -0.1),
                                          ("retain_ratio", 0.0), ("retain_ratio", 1.5), ("min_similarity", 2.0),
                                          ("min_similarity", -0.1), ("check_layers", 0), ("guard_margin", -0.5),
                                          ("recompute_decay", 0.0), ("recompute_decay", 1.5), ("retain_decay", 0.0),
                                          ("retain_decay", 1.01), ("lsh_seed", -2**63 - 1), ("lsh_seed", 2**64),
                                          ("lsh_max_distance", -1), ("embedding_rope_base", 1.0)])
def test_bad_config_rejected(field, value):
    """Just past each end of a range (the ends themselves: test_config_accepts_the_ends_of_every_range)."""
    with pytest.raises(ValueError, match=f"^{field}: "):  # its own check, not another naming it
        ReuseConfig(**{field: value})


@pytest.mark.parametrize("fields", [
    dict(recompute_ratio=0.0), dict(recompute_ratio=1.0), dict(retain_ratio=1.0), dict(min_similarity=0.0),
    dict(min_similarity=1.0), dict(check_layers=1), dict(query_window=1), dict(budget_cap=1.0),
    dict(recompute_decay=1.0), dict(retain_decay=1.0), dict(lsh_bits=1, lsh_max_distance=0), dict(lsh_bits=1024),
    dict(lsh_bits=64, lsh_max_distance=63), dict(lsh_seed=-2**63), dict(lsh_seed=2**64 - 1),
    dict(embedding_rope_base=1.001)], ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()))
def test_config_accepts_the_ends_of_every_range(fields):
    """A range's closed ends, and values just inside its open ones, are valid: a bound one step too tight
    refuses them."""
    cfg = ReuseConfig(**fields)
    assert {name: getattr(cfg, name) for name in fields} == fields


def test_config_defaults():
    """The defaults docs/contract.md's ReuseConfig table states, every one (its first five are the contract's)."""
    want = dict(matching="hybrid", recompute_ratio=0.2, retain_ratio=None, min_similarity=0.5, rope_correction=True,
                check_layers=2, recompute_decay=1.0, recompute_tail=0, recompute_boundary=4, selection="deviation",
                query_window=16, progressive=True, budget="adaptive", budget_cap=None, guard_margin=0.0,
                decode_recompute=0, retain_decay=0.9, lsh_bits=128, lsh_max_distance=24, lsh_seed=0,
                embedding_rope_base=10000.0)
    cfg = ReuseConfig()
    assert {name: getattr(cfg, name) for name in want} == want


# ---- typed arguments: every bad value named, nothing served --------------------------------------------------------


@pytest.mark.parametrize("field, value, error", [
    ("lsh_bits", 0, ValueError), ("lsh_bits", 1025, ValueError), ("lsh_bits", True, TypeError),
    ("lsh_bits", 64.0, TypeError),
    ("embedding_rope_base", 0.0, ValueError), ("embedding_rope_base", -1.0, ValueError),
    ("embedding_rope_base", float("nan"), ValueError), ("recompute_ratio", "0.2", TypeError),
    ("recompute_ratio", float("inf"), ValueError), ("check_layers", 1.5, TypeError), ("rope_correction", 1, TypeError),
    ("min_similarity", None, TypeError), ("lsh_max_distance", 128, ValueError), ("matching", None, ValueError),
    ("guard_margin", "1", TypeError), ("guard_margin", float("inf"), ValueError), ("guard_margin", True, TypeError),
    pytest.param("budget_cap", 10**400, ValueError, id="budget_cap-int-past-float"),
    pytest.param("embedding_rope_base", 10**400, ValueError, id="embedding_rope_base-int-past-float")])
def test_config_fields_are_typed(field, value, error):
    with pytest.raises(error, match=f"^{field}: "):  # the field's own check, not another that names it
        ReuseConfig(**{field: value})


@pytest.mark.parametrize("prompt", [None, 5, 3.5, {"a": 1}, b"abc", [1.0, 2.0], ["1", "2"], [True, 3],
                                    torch.tensor([1.0, 2.0]), [None, 3], [3, None]])
def test_prompts_that_are_not_text_or_token_ids_are_refused(model, tokenizer, ref_entry, prompt):
    engine = engine_for(model, tokenizer)
    with pytest.raises(TypeError, match="prompt"):
        engine.generate(prompt, reference=ref_entry, max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt"):
        engine.prefill(prompt)


ENGINE_ARGS = ("inputs_embeds", "attention_mask", "assistant_model", "prompt_lookup_num_tokens", "past_key_values",
               "cache")


@pytest.mark.parametrize("kwargs, name", [({"max_new_tokens": -500}, "max_new_tokens"),
                                          # the engine's message: HF's own refusal of 0 names it too
                                          ({"max_new_tokens": 0}, "max_new_tokens: expected at least 1, got 0"),
                                          ({"max_new_tokens": 2.5}, "max_new_tokens"),
                                          ({"num_return_sequences": 2}, "num_return_sequences / num_beams: the engine"),
                                          ({"num_beams": 3}, "num_return_sequences / num_beams: the engine"),
                                          ({"min_similarity": 1.5}, "min_similarity"),
                                          ({"return_entry": "no"}, "return_entry"),
                                          ({"prefix_only": np.bool_(True)}, "prefix_only: expected a bool, got bool_? "
                                                                            "np.True_"),
                                          ({"use_cache": False}, "use_cache"),
                                          ({"inputs_embeds": torch.zeros(1, 3, 8)}, "inputs_embeds"),
                                          ({"attention_mask": torch.ones(1, 3)}, "attention_mask"),
                                          ({"assistant_model": object()}, "assistant_model"),
                                          ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
                                          ({"past_key_values": None}, "past_key_values"),
                                          ({"cache": None}, "cache"),
                                          ({"streamer": "x"}, "streamer"),
                                          ({"logits_processor": "x"}, "logits_processor"),
                                          ({"logits_processor": [1]}, "logits_processor: expected a list of logits"),
                                          ({"max_new_tokens": 10**6}, "prompt / max_new_tokens")])
def test_generate_arguments_are_checked(model, tokenizer, kwargs, name):
    engine = engine_for(model, tokenizer)
    if name in ENGINE_ARGS:  # refused by the engine, not by HF's own error that may name it too
        name = f"{name}: set by the engine"
    with pytest.raises((TypeError, ValueError), match=name):
        engine.generate([5, 6, 7], **{"max_new_tokens": 2, **kwargs})


def test_a_generation_config_without_cache_or_with_more_sequences_still_decodes_greedily_over_the_cache(
        model, tokenizer, reference_ids):
    """use_cache=False in a generation config (the model's own, as some checkpoints ship it, or one passed) made HF
    feed the whole sequence again at every step into the engine's cache: other tokens from the third on, served as a
    normal result. num_return_sequences=2 there failed inside HF. The engine's decoding is greedy, one sequence,
    over its cache, whatever the config says: the tokens are the model's own greedy ones."""
    from transformers import GenerationConfig

    engine = engine_for(model, tokenizer)
    prompt = reference_ids[:40]
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    for config in (GenerationConfig(use_cache=False), GenerationConfig(num_return_sequences=2, do_sample=True)):
        assert engine.generate(prompt, max_new_tokens=6, generation_config=config).token_ids == expected
    saved = model.generation_config.use_cache
    model.generation_config.use_cache = False
    try:
        assert engine.generate(prompt, max_new_tokens=6).token_ids == expected
    finally:
        model.generation_config.use_cache = saved


def test_engine_arguments_and_prompt_devices_are_named(model, tokenizer):
    with pytest.raises(TypeError, match="tokenizer: expected"):
        ReuseEngine(model, None)

    class NoDecode:  # callable, but nothing to turn the ids back into text
        def __call__(self, text):
            return tokenizer(text)

    class NotCallable:  # decodes, but cannot tokenize a prompt
        decode = staticmethod(tokenizer.decode)

    for wrong in (NoDecode(), NotCallable()):
        with pytest.raises(TypeError, match=f"tokenizer: expected .*got {type(wrong).__name__}"):
            ReuseEngine(model, wrong)
    with pytest.raises(TypeError, match="model: expected"):
        ReuseEngine(None, tokenizer)
    engine = engine_for(model, tokenizer)
    with pytest.raises(ValueError, match="prompt: a tensor on the meta device"):
        engine.generate(torch.tensor([5, 6, 7], device="meta"), max_new_tokens=2)

    class FloatTokenizer(FakeTokenizer):  # int() of its ids truncated them: the prompt served was another one
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [float(i) + 0.5 for i in super().__call__(text)["input_ids"]]}

    with pytest.raises(TypeError, match="tokenizer: expected it to return a list of int token ids"):
        ReuseEngine(model, FloatTokenizer()).generate("hello", max_new_tokens=1)


def test_ttft_of_a_one_token_request_is_most_of_the_call_in_milliseconds(model, tokenizer, reference_ids, ref_entry):
    """With one new token, the first token is the request (all but decoding its text and handing storage back):
    `ttft_ms` is in milliseconds, not seconds or microseconds. (About 0.97 of the call here; asked for half.)"""
    engine = engine_for(model, tokenizer)
    for reference in (ref_entry, None):
        start = time.perf_counter()
        out = engine.generate(reference_ids, reference=reference, max_new_tokens=1)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        assert 0.5 * elapsed_ms <= out.stats["ttft_ms"] <= elapsed_ms, (out.stats["ttft_ms"], elapsed_ms)


def test_per_call_gate_leaves_the_config_alone(model, tokenizer, ref_entry):
    engine = engine_for(model, tokenizer, min_similarity=1.0)
    target = edited(rand_tokens(REF_LEN, seed=100), "few")
    assert engine.generate(target, reference=ref_entry, max_new_tokens=2).stats["mode"] == "fallback"
    assert engine.generate(target, reference=ref_entry, max_new_tokens=2, min_similarity=0.0).stats["mode"] == "reuse"
    # score() takes the per-call gate too, each way
    assert engine.score(target, [5, 6], reference=ref_entry)[1]["mode"] == "fallback"
    assert engine.score(target, [5, 6], reference=ref_entry, min_similarity=0.0)[1]["mode"] == "reuse"
    assert engine_for(model, tokenizer).score(target, [5, 6], reference=ref_entry, min_similarity=1.0)[1]["mode"] \
        == "fallback"
    assert engine.config.min_similarity == 1.0


def test_fingerprint_follows_every_weight(arch, tokenizer):
    """A fine-tune that keeps the embeddings (as LoRA does) changes K/V: its fingerprint differs, and its engine
    refuses the base model's entries. The same weights in another model object give the same fingerprint, loaded
    from another path too (a store moved with its model directory)."""
    base, twin, same = build_model(arch, seed=0), build_model(arch, seed=0), build_model(arch, seed=0)
    with torch.no_grad():
        twin.model.layers[-1].self_attn.v_proj.weight[0, 0] += 1e-3
    assert torch.equal(base.model.embed_tokens.weight, twin.model.embed_tokens.weight)
    base.config._name_or_path, same.config._name_or_path = "/models/here", "/mnt/copied/there"
    e_base, e_twin, e_same = (engine_for(m, tokenizer) for m in (base, twin, same))
    assert e_base.fingerprint != e_twin.fingerprint and e_base.fingerprint == e_same.fingerprint
    with pytest.raises(ValueError, match="reference"):
        e_twin.generate([5, 6, 7], reference=e_base.prefill([5, 6, 7, 8]), max_new_tokens=1)


def test_tensor_digest_sees_every_word_and_remembers_per_version():
    """The fingerprint's digest of a weight: any one changed word changes it, in the first chunk or a later one (the
    chunks weighted apart, so two swapped chunks differ too), a tail of fewer than 8 bytes included, a word's top bit
    too (every word's multiplier is odd, so no bit is lost mod 2^64); the same bytes give the same digest, another
    length another one. It is remembered on the tensor until the tensor changes."""
    from semshare_ops.engine.engine import _DIGEST_CHUNK, tensor_digest

    chunk = 8 * _DIGEST_CHUNK  # bytes
    base = torch.randint(0, 256, (2 * chunk + 13,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    digest = tensor_digest(base)
    assert digest == tensor_digest(base.clone()) and digest.endswith(f":{base.numel()}")
    for where, bit in [(0, 1), (chunk - 1, 1), (chunk + 5, 1), (2 * chunk + 12, 1)] + \
            [(8 * w + 7, 0x80) for w in (0, 1, 2, 3, 5, 8, 13, 21, chunk // 8 + 1)]:  # the top bit of a word too
        changed = base.clone()
        changed[where] ^= bit
        assert tensor_digest(changed) != digest, where
    swapped = torch.cat([base[chunk:2 * chunk], base[:chunk], base[2 * chunk:]])
    assert tensor_digest(swapped) != digest
    assert tensor_digest(base[:-1]) != digest

    remembered = base.clone()
    first = tensor_digest(remembered)
    remembered._semshare_digest = (remembered._semshare_digest[0], "remembered")
    assert tensor_digest(remembered) == "remembered"  # not hashed again while unchanged
    remembered[0] ^= 1  # an in-place change moves the version counter: hashed again
    assert tensor_digest(remembered) not in ("remembered", first)


def test_fingerprint_follows_an_in_place_update(arch, tokenizer):
    """Weights changed in place under a live engine (a training step, a LoRA merge into the module): the engine's
    fingerprint is taken again, so entries of the old weights are refused, not served as exact K/V."""
    model = build_model(arch, seed=0)
    engine = engine_for(model, tokenizer)
    prompt = rand_tokens(REF_LEN, seed=100)
    before, old_entry = engine.fingerprint, engine.prefill(prompt)
    assert engine.generate(prompt, reference=old_entry, max_new_tokens=2).stats["mode"] == "reuse"
    with torch.no_grad():
        model.model.layers[-1].self_attn.v_proj.weight.mul_(-1.0)
    assert engine.fingerprint != before and engine.fingerprint == engine_for(model, tokenizer).fingerprint
    with pytest.raises(ValueError, match="reference: .*weights changed"):
        engine.generate(prompt, reference=old_entry, max_new_tokens=2)
    new_entry = engine.prefill(prompt)
    assert new_entry.fingerprint == engine.fingerprint
    out = engine.generate(prompt, reference=new_entry, max_new_tokens=2)
    assert out.stats["mode"] == "reuse" and out.token_ids == engine.generate(prompt, max_new_tokens=2).token_ids


def test_fingerprint_is_taken_once_when_the_engine_is_made_and_again_only_after_a_change(arch, tokenizer,
                                                                                         monkeypatch):
    """The weights' digest is a pass over every weight: the engine takes it when it is made (not in the first
    request's time) and keeps it while no parameter or buffer changed; a change takes it again, once."""
    calls = []
    real = ReuseEngine._fingerprint
    monkeypatch.setattr(ReuseEngine, "_fingerprint", lambda self: calls.append(1) or real(self))
    model = build_model(arch, seed=0)
    engine = engine_for(model, tokenizer)
    assert len(calls) == 1
    prompt = rand_tokens(REF_LEN, seed=100)
    entry = engine.prefill(prompt)
    engine.generate(prompt, reference=entry, max_new_tokens=2)
    before = engine.fingerprint
    assert len(calls) == 1
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)
    after = engine.fingerprint  # taken again: the weights changed
    assert after != before and engine.fingerprint == after  # and kept again
    assert len(calls) == 2


def test_score_arguments_are_checked_and_named(model, tokenizer):
    """score takes what generate takes, refused under the same names: the gate, and its continuation as token ids
    named `continuation` (not `prompt`)."""
    engine = engine_for(model, tokenizer)
    prompt = rand_tokens(40, seed=5)
    for gate, error in ((2.0, ValueError), (-1, ValueError), ("x", TypeError), (True, TypeError)):
        with pytest.raises(error, match="min_similarity"):
            engine.score(prompt, [5, 6], min_similarity=gate)
    for continuation, error in ((5, TypeError), (None, TypeError), ("5 6", TypeError), ([5.0], TypeError),
                                (torch.tensor([5.0]), TypeError), ([VOCAB], ValueError), ([], ValueError)):
        with pytest.raises(error, match="continuation"):
            engine.score(prompt, continuation)
    for gate in (0.0, 1.0, 0, 1):  # the ends are gates too
        assert engine.score(prompt, [5, 6], min_similarity=gate)[0].shape == (2, VOCAB)
    gate = np.float32(0.3)  # numpy's numbers are numbers, in generate too
    logits, _ = engine.score(prompt, [5, 6], min_similarity=gate)
    assert logits.shape == (2, VOCAB)
    assert len(engine.generate(prompt, max_new_tokens=2, min_similarity=gate).token_ids) == 2
    for flag in ("yes", 1, None):
        with pytest.raises(TypeError, match="prefix_only: expected a bool"):
            engine.generate(prompt, max_new_tokens=2, prefix_only=flag)


def test_a_set_up_that_fails_refuses_the_model_by_name(model, tokenizer, monkeypatch):
    """Anything a new family does differently while the engine is made, which no check names, is refused as a
    model the engine cannot serve (a ValueError naming the class and the error), neither raised raw nor ignored."""
    from semshare_ops.engine import engine as engine_module

    def fails(model):
        raise RuntimeError("an attention interface this engine does not know")

    monkeypatch.setattr(engine_module, "use_semshare_attention", fails)
    with pytest.raises(ValueError, match=f"{type(model).__name__}: setting up reuse failed \\(RuntimeError: an "
                                         "attention interface this engine does not know\\)"):
        ReuseEngine(model, tokenizer)


def test_a_config_is_a_reuse_config(model, tokenizer):
    with pytest.raises(TypeError, match="config: expected a ReuseConfig"):
        ReuseEngine(model, tokenizer, {"matching": "edit"})
    engine = engine_for(model, tokenizer)
    with pytest.raises(TypeError, match="config: expected a ReuseConfig"):
        with engine.using({"matching": "edit"}):
            pass
    with pytest.raises(ValueError, match="lsh_seed"):
        ReuseConfig(lsh_seed=2**70)
    assert engine.config == ReuseConfig()
    current = engine.config
    with engine.using(None) as same:  # None keeps the current config
        assert same is engine and engine.config is current
    other = ReuseConfig(recompute_ratio=0.5)
    with pytest.raises(RuntimeError, match="inside"):
        with engine.using(other):
            assert engine.config is other
            raise RuntimeError("inside")
    assert engine.config is current  # put back, an error inside the block too


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 130, 1024])
def test_codes_take_as_many_words_as_their_bits_need(model, tokenizer, reference_ids, bits):
    """An entry's codes are ceil(lsh_bits / 64) int64 words per token, and the engine that made them serves them."""
    engine = engine_for(model, tokenizer, lsh_bits=bits, lsh_max_distance=min(24, bits - 1))
    entry = engine.prefill(reference_ids)
    assert entry.codes.shape == (len(reference_ids), -(-bits // 64))
    out = engine.generate(edited(reference_ids, "replace"), reference=entry, max_new_tokens=2, min_similarity=0.0)
    assert out.stats["mode"] == "reuse"


def test_lsh_settings_are_fixed_per_engine_and_checked_on_entries(model, tokenizer, reference_ids):
    """The token codes depend on lsh_bits, lsh_seed and embedding_rope_base: `using` refuses to change them (they
    were silently ignored), and an entry hashed with other settings is refused by name (it matched nothing)."""
    engine = engine_for(model, tokenizer)
    for change in ({"lsh_bits": 64}, {"lsh_seed": 7}, {"embedding_rope_base": 500000.0}):
        with pytest.raises(ValueError, match=f"config.{next(iter(change))}: .*make another engine"):
            with engine.using(ReuseConfig(**change)):
                pass
    with engine.using(ReuseConfig(recompute_ratio=0.5)):  # the rest may change
        assert engine.config.recompute_ratio == 0.5
    target = edited(reference_ids, "few")
    own = engine.prefill(reference_ids)
    assert own.codes_lsh == engine.codes_lsh == (128, 0, 10000.0)
    for change in ({"lsh_bits": 64}, {"lsh_seed": 7}, {"embedding_rope_base": 500000.0}):
        other = engine_for(model, tokenizer, **change).prefill(reference_ids)
        assert other.fingerprint == engine.fingerprint  # the model's; the codes are not
        with pytest.raises(ValueError, match="reference: its token codes were made with other LSH settings"):
            engine.generate(target, reference=other, max_new_tokens=2)
    assert engine.generate(target, reference=own, max_new_tokens=2).stats["mode"] == "reuse"


def test_token_ids_are_the_models_vocabulary_ends_included(model, tokenizer):
    """Ids 0 and vocab_size - 1 are token ids like any other; -1 and vocab_size are refused naming the prompt."""
    engine = engine_for(model, tokenizer)
    prompt = [0] + rand_tokens(20, seed=9) + [VOCAB - 1]
    assert engine.tokenize(prompt).tolist() == prompt
    assert len(engine.generate(prompt, max_new_tokens=2).token_ids) == 2
    for bad in (-1, VOCAB):
        with pytest.raises(ValueError, match=re.escape(f"prompt: token ids must lie in [0, {VOCAB})")):
            engine.generate(prompt[:5] + [bad], max_new_tokens=2)


def test_token_ids_past_the_model_from_a_tokenizer_are_refused(model):
    """A tokenizer that knows more ids than the model's embedding: refused naming the prompt, as a list of such ids
    is (not an IndexError from the embedding)."""
    engine = engine_for(model, FakeTokenizer(vocab=4 * VOCAB))
    text = "".join(chr(c) for c in range(200, 260))
    with pytest.raises(ValueError, match="prompt: token ids must lie in .*the tokenizer made one outside it"):
        engine.generate(text, max_new_tokens=2)


@pytest.mark.parametrize("decay", [0.1, 1e-12, 1e-300])
@pytest.mark.parametrize("target", [100.0, 300.0])
def test_a_steep_decay_still_meets_the_budget(decay, target):
    """The per-layer counts meet the target mean for any decay in (0, 1]: a small one made the bisection's top
    overflow (ZeroDivisionError from 1e-12 over 30 layers) or too coarse to resolve (at 0.1 the base came out
    about 1e15 times too big, every tail layer that could be full was)."""
    layers, total = 30, 1000  # at 300 a layer eight layers are full: the bisection must reach far past total
    counts = decaying_counts(total, layers, 2, 10, target, decay)
    assert counts[:2] == [total, total] and all(10 <= c <= total for c in counts)
    assert counts == sorted(counts, reverse=True)
    assert target <= sum(counts) / layers <= target + 1.0  # a count moves by one row: the mean by 1/30


def test_more_lead_layers_than_layers_gives_one_count_per_layer():
    """check_layers above the model's depth: every layer is a check layer, and there are exactly `layers` counts
    (not `lead` of them, which would shift every later layer's count)."""
    assert decaying_counts(12, 2, 3, 0, 4.0, 1.0) == [12, 12]
    assert decaying_counts(12, 3, 3, 0, 4.0, 1.0) == [12, 12, 12]


def test_a_mean_that_counts_reach_exactly_is_met_not_passed():
    """The bisection takes the smallest counts whose mean is at least the target: a target of exactly 5 rows a layer
    gives 5 in every layer (decay 1.0), not 6."""
    assert decaying_counts(10, 4, 0, 0, 5.0, 1.0) == [5, 5, 5, 5]
    assert decaying_counts(10, 4, 1, 0, 7.0, 1.0) == [10, 6, 6, 6]  # one lead layer: 10 + 3 c >= 28, c = 6 exactly


def test_a_huge_boundary_costs_no_more_than_the_prompt(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "few")
    out = engine_for(model, tokenizer, recompute_boundary=10**9).generate(target, reference=ref_entry,
                                                                         max_new_tokens=2)
    every = engine_for(model, tokenizer, recompute_boundary=len(target)).generate(target, reference=ref_entry,
                                                                                 max_new_tokens=2)
    assert out.token_ids == every.token_ids and out.stats["recomputed_tokens"] == every.stats["recomputed_tokens"]


def test_a_config_stays_as_checked():
    """Checked when made, and frozen: a field set afterwards (5.0 as a ratio) would skip every check."""
    cfg = ReuseConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.recompute_ratio = 5.0
    assert cfg.recompute_ratio == 0.2
    with pytest.raises(ValueError, match="recompute_ratio"):
        dataclasses.replace(cfg, recompute_ratio=5.0)


def test_a_reference_whose_kv_were_swapped_is_refused_by_name(model, tokenizer, reference_ids, ref_entry):
    """The fingerprint vouches for the model, not for tensors replaced in the entry afterwards: K/V of another dtype
    or length failed inside rope_reuse_ as `k_src`, an argument the caller never passed."""
    engine = engine_for(model, tokenizer)
    for swapped in (dataclasses.replace(ref_entry, keys=ref_entry.keys.half()),
                    dataclasses.replace(ref_entry, values=ref_entry.values[:, :-1]),
                    dataclasses.replace(ref_entry, keys=ref_entry.keys[:-1]),
                    dataclasses.replace(ref_entry, keys=ref_entry.keys[..., :-1]),
                    dataclasses.replace(ref_entry, values=torch.empty(ref_entry.values.shape, device="meta"))):
        with pytest.raises(ValueError, match=r"reference: its (keys|values) are"):
            engine.generate(reference_ids, reference=swapped, max_new_tokens=2)
    half = ref_entry.keys.half()
    with pytest.raises(ValueError, match=re.escape(f"its keys are torch.float16 {tuple(half.shape)} on cpu; this "
                                                   "engine's are torch.float32 [")):
        engine.generate(reference_ids, reference=dataclasses.replace(ref_entry, keys=half), max_new_tokens=2)
    with pytest.raises(ValueError, match="its token_ids are a list; expected an int64"):
        engine.generate(reference_ids, reference=dataclasses.replace(ref_entry, token_ids=[1, 2]), max_new_tokens=2)
    for field, value, said in (("codes", ref_entry.codes[:, :1], "codes"), ("codes", ref_entry.codes.int(), "codes"),
                               ("token_ids", ref_entry.token_ids.tolist(), "token_ids"),
                               ("exact_prefix", True, "exact_prefix"), ("exact_prefix", None, "exact_prefix"),
                               ("exact_prefix", len(reference_ids) + 1, "exact_prefix")):
        with pytest.raises(ValueError, match=f"reference: its {said} "):
            engine.generate(reference_ids, reference=dataclasses.replace(ref_entry, **{field: value}),
                            max_new_tokens=2)
    assert engine.generate(reference_ids, reference=ref_entry, max_new_tokens=2).stats["mode"] == "reuse"


def test_a_model_cast_after_the_engine_was_made_is_refused(tokenizer):
    """The engine measures the model's rotary frequencies and checks it in the dtype it has when the engine is made:
    cast afterwards (model.to(torch.bfloat16)), its keys rotate by bf16-rounded frequencies the engine does not use
    (reused keys 1e-2 off, growing with the distance moved). Every request is refused by name until another engine is
    made."""
    model = build_model("llama", seed=0)
    engine = engine_for(model, tokenizer)
    prompt = rand_tokens(30, seed=2)
    engine.generate(prompt, max_new_tokens=1)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"model: cast from torch.float32 to torch.bfloat16"):
        engine.generate(prompt, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"model: cast"):
        engine.prefill(prompt)
    assert engine_for(model, tokenizer).generate(prompt, max_new_tokens=1).stats["mode"] == "full"
