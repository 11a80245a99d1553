"""The decode guard (ReuseConfig.guard_margin): a greedy step from a stale reused cache whose best token leads by less
than the margin is not taken; the prompt and the tokens so far are prefilled in full and decoding goes on from that
exact cache. On the tiny random Llama and Qwen2 of conftest.py."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from engine_testutils import NEW, edited, engine_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def leads(logits) -> list:
    """The lead of each step's best token over the second, from generate's per-step logits."""
    return [float(v[0] - v[1]) for v in (step[0].float().topk(2).values for step in logits)]


def generate(engine, prompt, **kwargs):
    return engine.generate(prompt, max_new_tokens=NEW, output_logits=True, return_dict_in_generate=True, **kwargs)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_guard_off_by_zero_and_unwatched_without_stale_rows(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "few")
    assert generate(engine_for(model, tokenizer, guard_margin=0.0), target, reference=ref_entry).stats["guard"] is None
    huge = engine_for(model, tokenizer, guard_margin=1e9)
    # Nothing stale: an identical prompt (its rows are exact), every row recomputed, or a full prefill.
    assert generate(huge, reference_ids, reference=ref_entry).stats["guard"] is None
    assert generate(engine_for(model, tokenizer, guard_margin=1e9, recompute_ratio=1.0), target,
                    reference=ref_entry).stats["guard"] is None
    assert generate(huge, target).stats["guard"] is None
    assert generate(huge, target, reference=ref_entry, min_similarity=1.0).stats["guard"] is None  # a fallback
    # A full prefill on the storage a watched request handed on (entries dropped by retain_ratio) is not watched
    retained = engine_for(model, tokenizer, guard_margin=1e9, retain_ratio=0.3)
    assert generate(retained, target, reference=ref_entry).stats["guard"] is not None
    assert generate(retained, target).stats["guard"] is None


def test_one_stale_row_is_watched(model, tokenizer, reference_ids, ref_entry):
    """A token replaced two before the end: the row after it is matched, its context changed, and with no budget
    it is the one row left reused past the check layers (the replaced row is recomputed, the last one decoded)."""
    target = list(reference_ids[:-3]) + [int(reference_ids[-3]) ^ 1] + list(reference_ids[-2:])
    engine = engine_for(model, tokenizer, matching="edit", recompute_ratio=0.0, budget="fixed", recompute_boundary=0,
                        guard_margin=1e9)
    out = generate(engine, target, reference=ref_entry)
    assert out.stats["recomputed_tokens"][-1] == 2  # the replaced row and the last
    assert out.stats["guard"] is not None and out.stats["guard"]["repaired_at"] == 0


def test_retention_that_drops_nothing_is_not_watched(model, tokenizer, reference_ids, ref_entry):
    """retain_ratio makes a cache stale only where it drops entries: not at 1.0, nor on a prompt within the sink
    tokens and observer window that every layer keeps (20 tokens). Such an identical prompt is exact, unwatched and
    not repaired; one whose deep layers do drop entries is watched."""
    for ratio, prompt in ((1.0, reference_ids), (0.3, reference_ids[:18])):
        reference = engine_for(model, tokenizer).prefill(prompt)
        out = generate(engine_for(model, tokenizer, retain_ratio=ratio, guard_margin=1e9), prompt, reference=reference)
        assert out.stats["kv_bytes"] == out.stats["kv_bytes_full"]  # nothing dropped
        assert out.stats["guard"] is None, (ratio, len(prompt))
        assert out.stats["reuse_ratio"] > 0.0  # served by reuse (the short one recomputes its observer window)
    dropped = generate(engine_for(model, tokenizer, retain_ratio=0.3, guard_margin=1e9), reference_ids,
                       reference=ref_entry)
    assert dropped.stats["kv_bytes"] < dropped.stats["kv_bytes_full"]
    assert dropped.stats["guard"]["repaired_at"] == 0


def test_repair_at_the_first_token_is_a_full_prefill(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """The repair decodes what a full prefill does, in a cache laid out for the whole request at once, as the first
    one was: no layer grows."""
    from semshare_ops.engine import hf

    def grow(self, needed):
        raise AssertionError(f"a layer grew to {needed} slots")

    monkeypatch.setattr(hf.TokenMajorLayer, "_grow", grow)
    target = edited(reference_ids, "few")
    full = generate(engine_for(model, tokenizer), target)
    served = generate(engine_for(model, tokenizer, recompute_ratio=0.1), target, reference=ref_entry)
    out = generate(engine_for(model, tokenizer, recompute_ratio=0.1, guard_margin=1e9), target, reference=ref_entry,
                   return_entry=True)
    guard = out.stats["guard"]
    assert guard["repaired_at"] == 0 and guard["margin"] == 1e9
    assert guard["reuse_ratio"] == pytest.approx(served.stats["reuse_ratio"]) and guard["reuse_ratio"] > 0.5
    assert out.stats["reuse_ratio"] == 0.0  # repaired: nothing was saved
    assert out.token_ids == full.token_ids
    assert len(out.logits) == NEW
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(full.logits))
    # The entry it hands back is a full prefill's: exact throughout.
    prefilled = engine_for(model, tokenizer).prefill(target)
    assert out.entry.exact_prefix == len(target)
    torch.testing.assert_close(out.entry.keys, prefilled.keys)


def test_repair_mid_decode_keeps_the_tokens_before_it(model, tokenizer, reference_ids, ref_entry):
    # A margin between the first step whose lead is below every earlier one and those earlier ones trips there
    # (the first of a few edited prompts whose output has such a step past the first token).
    for seed in range(8):
        target = edited(reference_ids, "few", seed=seed)[:200 + 10 * seed]
        served = generate(engine_for(model, tokenizer, recompute_ratio=0.1), target, reference=ref_entry)
        lead = leads(served.logits)
        step = next((k for k in range(1, NEW) if lead[k] < min(lead[:k])), None)
        if step is not None:
            break
    assert step is not None, "no prompt has a step whose lead is below every earlier one"
    margin = (lead[step] + min(lead[:step])) / 2
    streamer = Recorder()
    out = generate(engine_for(model, tokenizer, recompute_ratio=0.1, guard_margin=margin), target,
                   reference=ref_entry, streamer=streamer)
    assert out.stats["guard"]["repaired_at"] == step
    assert out.stats["guard"]["lowest_lead"] == pytest.approx(lead[step])
    assert out.token_ids[:step] == served.token_ids[:step]
    # After the repair: what a full prefill of the prompt and those tokens generates.
    rest = generate(engine_for(model, tokenizer), target + served.token_ids[:step])
    assert out.token_ids[step:] == rest.token_ids[:NEW - step]
    assert len(out.logits) == NEW
    torch.testing.assert_close(torch.stack(out.logits[:step]), torch.stack(served.logits[:step]))
    torch.testing.assert_close(torch.stack(out.logits[step:]), torch.stack(rest.logits[:NEW - step]))
    # The caller's streamer saw the prompt once, then every token once, in order, and one end.
    assert streamer.puts[0] == target and sum(streamer.puts[1:], []) == out.token_ids and streamer.ended == 1


def test_a_margin_no_step_falls_below_changes_nothing(model, tokenizer, reference_ids, ref_entry):
    target = edited(reference_ids, "insert")
    served = generate(engine_for(model, tokenizer, recompute_ratio=0.1), target, reference=ref_entry)
    low = min(leads(served.logits))
    out = generate(engine_for(model, tokenizer, recompute_ratio=0.1, guard_margin=low / 2), target,
                   reference=ref_entry)
    assert out.stats["guard"]["repaired_at"] is None
    assert out.stats["guard"]["lowest_lead"] == pytest.approx(low)
    assert out.token_ids == served.token_ids and out.stats["reuse_ratio"] == served.stats["reuse_ratio"]
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(served.logits))
