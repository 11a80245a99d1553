"""Decode-time recompute (ReuseConfig.decode_recompute): between decode steps, the prompt rows the prefill left
reused run through every layer, in position order, their K/V overwritten. On the tiny random Llama and Qwen2 of
conftest.py."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from semshare_ops.engine import ReuseConfig
from engine_testutils import NEW, edited, engine_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# An insertion after an exact prefix, nothing recomputed past the check layers but the inserted (unmatched) rows:
# those see only the exact prefix and themselves, so they are exact, and every other row past the prefix is stale.
STALE_ONLY = dict(matching="edit", recompute_ratio=0.0, budget="fixed", recompute_boundary=0)


def generate(engine, prompt, **kwargs):
    return engine.generate(prompt, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("rows", [None, 50, 37], ids=["one_step", "50_per_step", "37_per_step"])
def test_every_stale_row_recomputed_gives_the_full_prefill_cache(model, tokenizer, reference_ids, ref_entry, rows):
    """In one step or several: in position order, each step's rows run over the rows before them already fresh (in
    the budget's order, most stale first, a row done early kept K/V computed from rows a later step fixed)."""
    target = edited(reference_ids, "insert")  # ref[:60] + 15 new tokens + ref[60:]
    full = engine_for(model, tokenizer).prefill(target)
    prompt = len(target) - 1  # the last prompt token is computed by decoding, over the stale rows: not compared
    plain = generate(engine_for(model, tokenizer, **STALE_ONLY), target, reference=ref_entry, return_entry=True)
    stale = prompt - 75  # positions 75..T-2: matched, shifted by 15, reused
    rows = rows or len(target)
    steps = -(-stale // rows) + 2  # not before the first token, not after the last
    assert steps > 3 or rows == len(target)
    healed = engine_for(model, tokenizer, decode_recompute=rows, **STALE_ONLY).generate(
        target, reference=ref_entry, return_entry=True, max_new_tokens=max(NEW, steps), output_logits=True,
        return_dict_in_generate=True)
    assert plain.stats["decode_recomputed_tokens"] == 0
    assert healed.stats["decode_recomputed_tokens"] == stale
    assert healed.stats["reuse_ratio"] == plain.stats["reuse_ratio"] > 0.5  # the prefill's work is the same
    deep = slice(2, None)  # past the check layers
    gap = (plain.entry.keys[deep, 75:prompt] - full.keys[deep, 75:prompt]).abs().max()
    assert gap > 1e-3  # the test can fail: without it those rows are stale
    for name in ("keys", "values"):
        torch.testing.assert_close(getattr(healed.entry, name)[:, :prompt], getattr(full, name)[:, :prompt],
                                   rtol=1e-4, atol=1e-4)
    # The first token comes from the prefill's cache in both; nothing is recomputed before it.
    torch.testing.assert_close(healed.logits[0], plain.logits[0])


def test_rows_per_step_until_none_is_stale(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "few")
    engine = engine_for(model, tokenizer, recompute_ratio=0.1, decode_recompute=3)
    out = generate(engine, target, reference=ref_entry)
    assert out.stats["decode_recomputed_tokens"] == 3 * (NEW - 2)  # between steps: not before the first, not after the last
    # Fewer steps than stale rows take what the steps allow; more than enough stop at the stale rows.
    many = generate(engine_for(model, tokenizer, recompute_ratio=0.1, decode_recompute=10_000), target,
                    reference=ref_entry)
    stale = many.stats["decode_recomputed_tokens"]
    assert 3 * (NEW - 2) < stale < len(target)
    # Nothing stale: an identical prompt, every row recomputed, a full prefill.
    for prompt, kwargs in ((list(reference_ids), {"reference": ref_entry}), (target, {})):
        assert generate(engine, prompt, **kwargs).stats["decode_recomputed_tokens"] == 0
    every = engine_for(model, tokenizer, recompute_ratio=1.0, decode_recompute=3)
    assert generate(every, target, reference=ref_entry).stats["decode_recomputed_tokens"] == 0


class Calls(StoppingCriteria):
    def __init__(self):
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_a_generation_ended_by_eos_recomputes_nothing_after_its_last_token(model, tokenizer, reference_ids, ref_entry,
                                                                            monkeypatch):
    """The step whose token ends the generation is the last, as the max_new_tokens-th is: no later step reads its
    rows. score() over the same tokens recomputes the same rows."""
    target = edited(reference_ids, "few")
    engine = engine_for(model, tokenizer, recompute_ratio=0.1, decode_recompute=3)
    tokens = generate(engine, target, reference=ref_entry).token_ids
    # An end of sequence at step `end` (< NEW - 1): a token first met there, so greedy decoding stops at it (the
    # tiny Qwen2 alternates two tokens: step 1).
    end = max(i for i in range(1, NEW - 1) if tokens[i] not in tokens[:i])
    calls = Calls()  # a criterion of the caller's: still called at every step beside the engine's own
    out = generate(engine, target, reference=ref_entry, eos_token_id=tokens[end],
                   stopping_criteria=StoppingCriteriaList([calls]))
    assert out.token_ids == tokens[:end + 1] and calls.steps == end + 1
    assert out.stats["decode_recomputed_tokens"] == 3 * (end + 1 - 2)  # between the end + 1 steps' forwards
    _, stats = engine.score(target, out.token_ids, reference=ref_entry)
    assert stats["decode_recomputed_tokens"] == out.stats["decode_recomputed_tokens"]
    # The end of sequence as a tensor of several ids (HF generate takes it too), or in a generation config: the
    # call's, else the model's
    def ends_where_it_did(**kwargs):
        again = generate(engine, target, reference=ref_entry, **kwargs)
        assert again.token_ids == out.token_ids
        assert again.stats["decode_recomputed_tokens"] == out.stats["decode_recomputed_tokens"]

    never = next(t for t in range(model.config.vocab_size) if t not in tokens)
    ends_where_it_did(eos_token_id=torch.tensor([never, tokens[end]]))
    ends_where_it_did(generation_config=GenerationConfig(eos_token_id=tokens[end]))
    monkeypatch.setattr(model.generation_config, "eos_token_id", tokens[end])
    ends_where_it_did()


def test_score_recomputes_where_generate_does(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "replace")
    engine = engine_for(model, tokenizer, recompute_ratio=0.1, decode_recompute=8)
    out = generate(engine, target, reference=ref_entry)
    logits, stats = engine.score(target, out.token_ids, reference=ref_entry)
    assert stats["decode_recomputed_tokens"] == out.stats["decode_recomputed_tokens"]  # the same steps
    torch.testing.assert_close(logits, torch.cat(out.logits).float(), rtol=1e-4, atol=1e-4)
    one, _ = engine.score(target, out.token_ids[:1], reference=ref_entry)  # nothing to recompute before a step
    torch.testing.assert_close(one, logits[:1], rtol=1e-4, atol=1e-4)
    # and it changes the logits: without it, from the second step on, they differ
    plain, plain_stats = engine_for(model, tokenizer, recompute_ratio=0.1).score(target, out.token_ids,
                                                                                  reference=ref_entry)
    assert plain_stats["decode_recomputed_tokens"] == 0
    torch.testing.assert_close(plain[:2], logits[:2], rtol=1e-4, atol=1e-4)
    assert (plain[2:] - logits[2:]).abs().max() > 1e-3


def test_refused_settings():
    with pytest.raises(ValueError, match="decode_recompute"):
        ReuseConfig(decode_recompute=-1)
    with pytest.raises(ValueError, match="decode_recompute.*retain_ratio"):
        ReuseConfig(decode_recompute=4, retain_ratio=0.5)
    with pytest.raises(TypeError, match="decode_recompute"):
        ReuseConfig(decode_recompute=2.5)


def test_the_query_window_is_read_in_the_prefill_only(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """selection="attention" reads what the query window pays each row in the prefill's recompute; the decode's
    recompute steps read nothing (each reading is one more pass over Q x K, and nothing ranks after the prefill)."""
    import semshare_ops.engine.engine as engine_module
    import semshare_ops.engine.hf as hf

    phase, reads = ["prefill"], {"prefill": 0, "decode": 0}
    received, recompute_stale = hf._attention_received, engine_module.ReuseEngine._recompute_stale

    def counted(*args, **kwargs):
        reads[phase[0]] += 1
        return received(*args, **kwargs)

    def in_decode(self, *args, **kwargs):
        phase[0] = "decode"
        return recompute_stale(self, *args, **kwargs)

    monkeypatch.setattr(hf, "_attention_received", counted)
    monkeypatch.setattr(engine_module.ReuseEngine, "_recompute_stale", in_decode)
    engine = engine_for(model, tokenizer, selection="attention", recompute_ratio=0.1, decode_recompute=3)
    out = generate(engine, edited(reference_ids, "few"), reference=ref_entry)
    assert out.stats["decode_recomputed_tokens"] == 3 * (NEW - 2)  # the decode's recompute ran
    assert reads["prefill"] > 0 and reads["decode"] == 0
