"""The HF reuse pipeline (SPEC.md sections 4 and 5) on small randomly initialised Llama and Qwen2 models.

The invariants of section 4 are checked against a full prefill of the same engine (same decode path):
identical target => identical output; recompute ratio 1.0 => identical cache and logits; quality grows with the
recompute ratio; reference entries are never written; plus the stats contract of section 5, the similarity
fallback, layer-wise retention, bad input, and RoPE correction of reused keys.

First-token logits are read with a forward hook on `model.lm_head` (GenerationOutput carries no scores): the reuse
path recomputes through the decoder layers only, so the first lm_head call of a `generate` is the first new token.
"""

import dataclasses
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import semshare_ops.ops as ss_ops  # noqa: E402
from semshare_ops.pipeline import GenerationOutput, ReferenceEntry, ReuseConfig, ReuseEngine  # noqa: E402

VOCAB = 512
MAX_POS = 1024
LAYERS = 4
KV_HEADS = 2
HEAD_DIM = 64 // 4
NEW = 12  # max_new_tokens of the generate calls that compare outputs
REF_LEN = 320
STATS_KEYS = {"mode", "prompt_tokens", "matched_tokens", "recomputed_tokens", "reuse_ratio", "kv_bytes",
              "kv_bytes_full", "ttft_ms", "similarity"}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- tiny model, tokenizer and prompts --------------------------------------------------------------------------


class FakeTokenizer:
    """Enough of a tokenizer for the engine: call -> {"input_ids"}, decode, pad/eos ids, len."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text):
        return {"input_ids": [2 + (ord(c) * 7) % (VOCAB - 2) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids)

    def __len__(self):
        return VOCAB


def build_model(arch: str, seed: int):
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=KV_HEADS, intermediate_size=128, max_position_embeddings=MAX_POS)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    model.generation_config.eos_token_id = None  # always NEW tokens: outputs compare over their full length
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return build_model(arch, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return FakeTokenizer()


def engine_for(model, tokenizer, **config):
    return ReuseEngine(model, tokenizer, ReuseConfig(**config))


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def reference_ids():
    ids = rand_tokens(REF_LEN, seed=100)
    assert len(set(ids)) > 100  # not constant data
    return ids


def edited(ref: list[int], kind: str, seed: int = 0) -> list[int]:
    new = rand_tokens(40, seed=200 + seed)
    if kind == "identical":
        return list(ref)
    if kind == "replace":
        return ref[:120] + new[:25] + ref[145:]
    if kind == "insert":
        return ref[:60] + new[:15] + ref[60:]
    if kind == "insert_start":
        return ref[:4] + new[:9] + ref[4:]
    if kind == "delete":
        return ref[:200] + ref[230:]
    if kind == "few":
        out = list(ref)
        for p in torch.randperm(len(ref) - 1, generator=torch.Generator().manual_seed(300 + seed))[:6].tolist():
            out[p] = 2 + (out[p] + 37) % (VOCAB - 2)
        return out
    raise ValueError(kind)


EDITS = ["replace", "insert", "delete", "few"]


@pytest.fixture(scope="module")
def ref_entry(model, tokenizer, reference_ids):
    """The reference entry; it only depends on the model, not on the engine's config."""
    return engine_for(model, tokenizer).prefill(reference_ids)


def generate_with_logits(engine, prompt, **kwargs):
    """(GenerationOutput, first-token logits [V] fp32) through a forward hook on lm_head."""
    captured = []

    def hook(module, inputs, output):
        captured.append(output[0, -1].detach().float().clone())

    handle = engine.model.lm_head.register_forward_hook(hook)
    try:
        out = engine.generate(prompt, **kwargs)
    finally:
        handle.remove()
    assert captured, "lm_head was never called"
    return out, captured[0]


def kl(p_logits, q_logits) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def clone_entry(entry: ReferenceEntry) -> dict:
    return {f.name: (getattr(entry, f.name).clone() if torch.is_tensor(getattr(entry, f.name))
                     else getattr(entry, f.name)) for f in dataclasses.fields(entry)}


def capture_assembled_cache(engine, monkeypatch) -> dict:
    """Wrap engine._decode to snapshot the prompt cache (positions 0..T-2) it receives before decoding."""
    seen = {}
    original = engine._decode

    def spy(ids, cache, *args, **kwargs):
        seen["keys"] = [layer.keys[: layer.used].clone() for layer in cache.layers]
        seen["values"] = [layer.values[: layer.used].clone() for layer in cache.layers]
        seen["kv_pos"] = [layer.kv_pos[: layer.used].clone() for layer in cache.layers]
        return original(ids, cache, *args, **kwargs)

    monkeypatch.setattr(engine, "_decode", spy)
    return seen


# ---- the full-prefill path itself ------------------------------------------------------------------------------


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


# ---- invariant 1: identical target => full prefill output --------------------------------------------------------


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


# ---- invariant 2: recompute ratio 1.0 => full prefill ------------------------------------------------------------


@pytest.mark.parametrize("kind", EDITS + ["insert_start"])
def test_recompute_all_equals_full_prefill(model, tokenizer, reference_ids, ref_entry, kind, monkeypatch):
    target = edited(reference_ids, kind)
    engine = engine_for(model, tokenizer, recompute_ratio=1.0)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    seen = capture_assembled_cache(engine, monkeypatch)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse"
    assert out.stats["recomputed_tokens"] == [len(target)] * LAYERS
    assert out.stats["reuse_ratio"] == pytest.approx(0.0, abs=1e-12)
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


# ---- invariant 3: quality grows with the recompute ratio ---------------------------------------------------------


RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]


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
    """recompute_ratio is the share recomputed averaged over layers when above the mandatory floor."""
    target = edited(reference_ids, "replace")
    for r in (0.5, 0.75, 0.9):
        out = engine_for(model, tokenizer, recompute_ratio=r, check_layers=1).generate(
            target, reference=ref_entry, max_new_tokens=2)
        share = sum(out.stats["recomputed_tokens"]) / (LAYERS * len(target))
        assert share == pytest.approx(r, abs=2 / len(target))


# ---- invariant 4: serving never changes the reference entry ------------------------------------------------------


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


# ---- invariant 5: stats ------------------------------------------------------------------------------------------


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


def test_stats_fallback(model, tokenizer, reference_ids, ref_entry):
    target = rand_tokens(250, seed=999)
    out, ms = timed(engine_for(model, tokenizer), target, reference=ref_entry, max_new_tokens=4)
    check_stats(out.stats, len(target), ms)
    assert out.stats["mode"] == "fallback"
    assert out.stats["reuse_ratio"] == 0.0 and out.stats["kv_bytes"] == out.stats["kv_bytes_full"]


# ---- invariant 6: min_similarity ---------------------------------------------------------------------------------


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


# ---- invariant 7: retention --------------------------------------------------------------------------------------


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


# ---- invariant 8: bad input --------------------------------------------------------------------------------------


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
                                          ("check_layers", 0)])
def test_bad_config_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        ReuseConfig(**{field: value})


def test_config_defaults():
    cfg = ReuseConfig()
    assert cfg.matching == "hybrid" and cfg.rope_correction is True and cfg.retain_ratio is None
    assert 0.0 <= cfg.recompute_ratio <= 1.0 and 0.0 <= cfg.min_similarity <= 1.0


# ---- invariant 9: RoPE correction of reused keys -----------------------------------------------------------------


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
    assert k_err[~shifted].max() <= 1e-5  # unshifted tokens need no correction
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


# ---- what benchmarks and the store use: baselines, match(), logits, entries --------------------------------------


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
    engine = engine_for(model, tokenizer, recompute_ratio=0.0, recompute_tail=24, check_layers=1)
    out = engine.generate(reference_ids, reference=ref_entry, max_new_tokens=2)
    assert out.stats["recomputed_tokens"] == [len(reference_ids)] + [24 + 1] * (LAYERS - 1)
    with pytest.raises(ValueError, match="recompute_tail"):
        ReuseConfig(recompute_tail=-1)


# ---- the causal fast path: whole-cache steps go to SDPA (CUDA by default; forced on here) ------------------------


def count_attention_paths(monkeypatch) -> dict:
    """Count the steps semshare_attention sends to SDPA's causal kernel and to partial_attn (fast path on CPU too)."""
    from semshare_ops import hf

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
    from semshare_ops import hf

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
    """Check layers recompute every position (fast path); deeper layers recompute a subset (partial_attn). With
    retention the observer's scores come out the same either way."""
    target = edited(reference_ids, "replace")
    engine = engine_for(model, tokenizer, check_layers=2, recompute_ratio=0.6, retain_ratio=retain)
    calls = count_attention_paths(monkeypatch)
    fast, fast_logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=2)
    counts = fast.stats["recomputed_tokens"]
    full_layers = sum(c == len(target) for c in counts)
    assert fast.stats["mode"] == "reuse" and full_layers == 2 and min(counts) < len(target)
    assert calls["sdpa"] == full_layers
    monkeypatch.undo()
    force_general_path(monkeypatch)
    general, general_logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=2)
    assert general.stats == {**fast.stats, "ttft_ms": general.stats["ttft_ms"]}
    torch.testing.assert_close(fast_logits, general_logits, atol=1e-4, rtol=1e-4)


def test_compacted_layers_leave_the_fast_path():
    from semshare_ops.hf import TokenMajorLayer

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
