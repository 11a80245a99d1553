"""Which rows a reuse request recomputes: the exact common prefix (never), the selection methods and their nesting,
and the teacher-forced `score` the ablation ranks them by. On the tiny random Llama and Qwen2 of conftest.py."""

import dataclasses
from typing import Optional

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from semshare_ops.engine import ReuseConfig  # noqa: E402
from semshare_ops.engine.config import SELECTIONS  # noqa: E402
from semshare_ops.engine.rows import (effective_check_layers, exact_prefix, kept_exact_prefix,  # noqa: E402
                                      mean_relative_deviation, recompute_counts, recompute_rows, selection_scores)
from semshare_ops.engine.hf import SemShareCache  # noqa: E402
from semshare_ops.engine.matching import Match  # noqa: E402

from engine_testutils import LAYERS, NEW, edited, engine_for, generate_with_logits, rand_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = [(selection, progressive) for selection in SELECTIONS for progressive in (False, True)]


def record_rows(monkeypatch, whole: Optional[list] = None) -> list:
    """(layer, positions) whose K/V each recompute step writes, in order. A layer whose next one recomputes fewer rows
    runs twice: a K/V-only pass over all its rows (recorded here), then the whole layer over the rows that go on
    (appended to `whole`, when given, as (layer, positions))."""
    steps, last_kv_only = [], [None]
    original = SemShareCache.set_write_positions

    def spy(self, layer_idx, positions):
        if positions is not None:
            if last_kv_only[0] == layer_idx:  # the whole layer after its K/V-only pass
                if whole is not None:
                    whole.append((layer_idx, positions.clone()))
                last_kv_only[0] = None
            else:
                steps.append((layer_idx, positions.clone()))
                last_kv_only[0] = layer_idx if self.layers[layer_idx].stop_after_write else None
        return original(self, layer_idx, positions)

    monkeypatch.setattr(SemShareCache, "set_write_positions", spy)
    return steps


@pytest.mark.parametrize("method", ["edit", "hybrid"])
def test_identical_prompt_recomputes_only_its_last_token(model, tokenizer, reference_ids, ref_entry, method,
                                                         monkeypatch):
    engine = engine_for(model, tokenizer, matching=method)
    full, full_logits = generate_with_logits(engine, reference_ids, max_new_tokens=NEW)
    steps = record_rows(monkeypatch)
    out, logits = generate_with_logits(engine, reference_ids, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["exact_tokens"] == len(reference_ids) - 1
    assert out.stats["recomputed_tokens"] == [1] * LAYERS  # the last prompt token, which decoding computes
    assert out.stats["reuse_ratio"] == pytest.approx(1 - 1 / len(reference_ids))
    assert steps == []  # no layer ran on any prompt row before decoding
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


def test_extension_recomputes_only_the_new_tokens(model, tokenizer, reference_ids, ref_entry):
    target = reference_ids + rand_tokens(30, seed=11)
    engine = engine_for(model, tokenizer, recompute_ratio=0.0)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.stats["exact_tokens"] == len(reference_ids)
    assert out.stats["recomputed_tokens"] == [30] * LAYERS
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


def test_rows_of_the_exact_prefix_are_never_recomputed(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    target = edited(reference_ids, "replace")  # equal to the reference up to position 120
    engine = engine_for(model, tokenizer, recompute_ratio=0.5)
    steps = record_rows(monkeypatch)  # after the engine's start-up probes
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2)
    assert out.stats["exact_tokens"] == 120
    assert steps and all(int(rows.min()) >= 120 for _, rows in steps)
    assert [len(rows) + 1 for _, rows in steps] == out.stats["recomputed_tokens"]
    assert len(steps[0][1]) == len(target) - 1 - 120  # the check layers: every row past the prefix


def test_entries_carry_their_exact_prefix(model, tokenizer, reference_ids, ref_entry):
    engine = engine_for(model, tokenizer)
    assert ref_entry.exact_prefix == len(reference_ids)
    target = edited(reference_ids, "replace")
    assert engine.generate(target, max_new_tokens=2, return_entry=True).entry.exact_prefix == len(target)
    served = engine.generate(target, reference=ref_entry, max_new_tokens=2, return_entry=True)
    # Past the common prefix (120), the rows before the first one some layer left reused (the edit's own rows, the
    # boundary rows after it) were computed in every layer over exact K/V: a full prefill's (the entry once said
    # 120). The reused K/V past them are approximate.
    n, full = served.entry.exact_prefix, engine.generate(target, max_new_tokens=2, return_entry=True).entry
    assert 120 < n < len(target) - 1
    for got, want in ((served.entry.keys, full.keys), (served.entry.values, full.values)):
        torch.testing.assert_close(got[:, :n], want[:, :n], atol=1e-5, rtol=1e-5)
        assert (got[:, n] - want[:, n]).abs().max() > 1e-3
    same = engine.generate(reference_ids, reference=ref_entry, max_new_tokens=2, return_entry=True)
    assert same.entry.exact_prefix == len(reference_ids)  # every row exact, so the last token too
    # A request served from the served entry: its exact prefix cannot exceed the entry's, however long the common
    # prefix of the two prompts.
    again = engine.generate(target[:300] + rand_tokens(20, seed=12), reference=served.entry, max_new_tokens=2)
    assert again.stats["exact_tokens"] == n
    # No row left reused in any layer: the whole entry is exact. An extension of its reference (edit alignment: the
    # new tokens have no match, so every layer computes them), and the same target at ratio 1.0.
    edit = engine_for(model, tokenizer, matching="edit")
    longer = reference_ids + rand_tokens(30, seed=13)
    grown = edit.generate(longer, reference=ref_entry, max_new_tokens=2, return_entry=True)
    assert grown.stats["exact_tokens"] == len(reference_ids) and grown.entry.exact_prefix == len(longer)
    # ... so the next turn is served from it as a prefix, as from a prefill: only its own new rows are computed.
    turn = edit.generate(longer + rand_tokens(20, seed=14), reference=grown.entry, max_new_tokens=2)
    assert turn.stats["exact_tokens"] == len(longer) and turn.stats["recomputed_tokens"] == [20] * edit.num_layers
    full = engine_for(model, tokenizer, recompute_ratio=1.0)
    assert full.generate(target, reference=ref_entry, max_new_tokens=2,
                         return_entry=True).entry.exact_prefix == len(target)


def test_reference_without_exact_prefix_is_recomputed(model, tokenizer, reference_ids, ref_entry):
    entry = dataclasses.replace(ref_entry, exact_prefix=0)  # what a version-2 store file loads as
    out = engine_for(model, tokenizer).generate(reference_ids, reference=entry, max_new_tokens=2)
    assert out.stats["exact_tokens"] == 0
    assert out.stats["recomputed_tokens"][0] == len(reference_ids)  # the first check layer: every row


def test_exact_prefix_stops_at_the_first_row_not_taken_in_place():
    n = 10
    dst = torch.arange(n)

    def match(src, exact=None):
        return Match(dst, src, torch.ones(n, dtype=torch.bool) if exact is None else exact, n)

    assert exact_prefix(match(torch.arange(n)), reference_exact=n, limit=n) == n
    assert exact_prefix(match(torch.arange(n)), reference_exact=4, limit=n) == 4
    assert exact_prefix(match(torch.arange(n)), reference_exact=n, limit=7) == 7
    shifted = torch.arange(n)
    shifted[6:] += 1  # a deletion in the reference before position 6
    assert exact_prefix(match(shifted), n, n) == 6
    fuzzy = torch.ones(n, dtype=torch.bool)
    fuzzy[3] = False  # an LSH pair of different tokens
    assert exact_prefix(match(torch.arange(n), fuzzy), n, n) == 3
    gap = Match(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 3]), torch.ones(3, dtype=torch.bool), n)
    assert exact_prefix(gap, n, n) == 2  # position 2 unmatched
    # No room at all (a window covering the whole prompt leaves a negative limit): nothing is exact, and a negative
    # bound must not slice the match from its end.
    assert exact_prefix(match(torch.arange(n)), n, -3) == 0
    assert exact_prefix(match(torch.arange(n)), 0, n) == 0
    assert exact_prefix(match(torch.arange(n)), n, 1) == 1  # one row is a prefix too


def test_scores_need_attention_and_the_deviation_needs_a_matched_row():
    """The scores, worked out in numpy: "deviation" ||dK|| + ||dV|| per row, "attention" the attention, "blend" and
    "lookahead" their product. A ranking by attention without recorded attention is refused by name (not an
    AttributeError on None), and the check deviation over no matched row is None (a mean over nothing is no figure:
    not NaN). With one matched row it is that row's (||dK|| + ||dV||) / (||K|| + ||V||) of the fresh K/V."""
    g = torch.Generator().manual_seed(7)
    reused, fresh = [tuple(torch.randn(5, 2, 4, generator=g) for _ in range(2)) for _ in range(2)]
    attention = torch.rand(5, generator=g) + 0.1
    dk, dv = ((f.numpy() - r.numpy()).reshape(5, -1).astype(np.float64) for r, f in zip(reused, fresh))
    deviation = np.linalg.norm(dk, axis=1) + np.linalg.norm(dv, axis=1)
    np.testing.assert_allclose(selection_scores("deviation", reused, fresh, None).numpy(), deviation, rtol=1e-5)
    for selection in ("blend", "lookahead"):
        np.testing.assert_allclose(selection_scores(selection, reused, fresh, attention).numpy(),
                                   deviation * attention.numpy(), rtol=1e-5)
    for selection in ("attention", "blend", "lookahead"):
        with pytest.raises(RuntimeError, match=f"selection '{selection}': no attention scores"):
            selection_scores(selection, reused, fresh, None)
    assert torch.equal(selection_scores("attention", reused, fresh, attention), attention)
    assert mean_relative_deviation(reused, fresh, torch.ones(5, dtype=torch.bool)) is None
    only = torch.ones(5, dtype=torch.bool)
    only[3] = False
    (k0, v0), (k1, v1) = ((t[3].numpy().ravel().astype(np.float64) for t in pair) for pair in (reused, fresh))
    want = (np.linalg.norm(k1 - k0) + np.linalg.norm(v1 - v0)) / (np.linalg.norm(k1) + np.linalg.norm(v1))
    assert mean_relative_deviation(reused, fresh, only) == pytest.approx(want, rel=1e-5)
    # A ratio of norms: K/V a thousand times smaller (a model with tiny activations) read the same.
    small = [tuple(t * 1e-3 for t in pair) for pair in (reused, fresh)]
    assert mean_relative_deviation(*small, only) == pytest.approx(want, rel=1e-5)


def test_with_nothing_exact_the_check_layers_take_every_row():
    """`recompute_counts` with its defaults (no exact prefix, no lookahead), worked by hand: the budget is a mean of
    0.3 x 41 - 1 = 11.3 rows over 30 layers (the last token, always computed, counted in it); the two check layers
    take all 40, so the 28 others need 28 c >= 339 - 80, c = 10. An exact prefix of 10 takes its rows out of the
    check layers and leaves the budget the whole prompt's (28 c >= 339 - 60: 10 again)."""
    config = ReuseConfig(recompute_ratio=0.3, budget="fixed", check_layers=2, recompute_decay=1.0)
    assert recompute_counts(40, 30, 0, config) == [40, 40] + [10] * 28
    assert recompute_counts(40, 30, 0, config, exact=10) == [30, 30] + [10] * 28
    # The lookahead's 4 rows run through every layer: 4 off the mean, 28 c >= 30 x 7.3 - 80, c = 5.
    assert recompute_counts(40, 30, 0, config, lookahead=4) == [40, 40] + [5] * 28
    # A budget of exactly every row past the prefix (0.5 x 10 - 1 = 4 = 9 - 5) leaves none to rank: no pass to pay.
    half = ReuseConfig(recompute_ratio=0.5, budget="fixed", recompute_decay=1.0)
    assert recompute_counts(9, 6, 0, half, exact=5, lookahead=2) == [4] * 6
    # The last token's share: 0.5 x (11 + 1) - 1 = 5 rows a layer, met exactly by 11 + 3 x 3 = 20 over 4 layers.
    quarter = ReuseConfig(recompute_ratio=0.5, budget="fixed", check_layers=1, recompute_decay=1.0)
    assert recompute_counts(11, 4, 0, quarter) == [11, 3, 3, 3]
    # No budget at all (a prefix hit at ratio 0: no check layer, 0 x 21 - 1 < 0): no row in any layer.
    assert recompute_counts(20, 4, 0, ReuseConfig(matching="prefix", recompute_ratio=0.0)) == [0] * 4
    # recompute_rows with its defaults: nothing exact, every row in the check layers.
    positions = torch.arange(40)
    shifted = Match(positions, positions + 3, torch.ones(40, dtype=torch.bool), 41)
    assert recompute_rows(shifted, 40, 30, config).counts == [40, 40] + [10] * 28
    assert effective_check_layers(config) == 2
    assert effective_check_layers(dataclasses.replace(config, matching="prefix")) == 0  # a prefix hit is exact
    # A window (or tail) longer than the prompt makes every row mandatory, the first included.
    assert bool(recompute_rows(shifted, 40, 30, config, window=45).mandatory.all())
    # The served prompt's own exact prefix: all of it once every row before the last was exact, else what was.
    assert [kept_exact_prefix(exact, 10) for exact in (0, 8, 9, 10)] == [0, 8, 10, 10]


@pytest.mark.parametrize("selection,progressive", VARIANTS)
def test_selection_sets_are_nested_and_keep_the_mandatory_rows(model, tokenizer, reference_ids, ref_entry,
                                                               selection, progressive, monkeypatch):
    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "few")[1:]
    engine = engine_for(model, tokenizer, matching="edit", recompute_ratio=0.5, check_layers=1, selection=selection,
                        progressive=progressive, query_window=8, recompute_decay=0.8)  # sets that shrink
    whole = []
    steps = record_rows(monkeypatch, whole)
    out = engine.generate(target, reference=ref_entry, max_new_tokens=2)
    prefill = len(target) - 1
    queries = torch.arange(prefill - 8, prefill)
    looked = 8 if selection == "lookahead" else 0
    if looked:  # first the lookahead: the last query_window rows through every layer
        assert [layer for layer, _ in steps[:LAYERS]] == list(range(LAYERS))
        assert all(torch.equal(rows, queries) for _, rows in steps[:LAYERS])
        steps = steps[LAYERS:]
    assert [layer for layer, _ in steps] == list(range(LAYERS))
    # Where the next layer drops rows, this one computed only K/V for them and ran whole on the next set; not where it
    # ranks by the attention its own last queries pay every row (that attention is the ranking).
    shrinking = [i for i in range(LAYERS - 1) if len(steps[i + 1][1]) < len(steps[i][1])]
    by_attention = selection in ("attention", "blend")
    ranks_by_attention = [i for i in shrinking if by_attention and (i == 0 or progressive)]
    assert [layer for layer, _ in whole] == [i for i in shrinking if i not in ranks_by_attention]
    assert all(torch.equal(rows, steps[layer + 1][1]) for layer, rows in whole)
    assert whole or by_attention
    assert [len(rows) + 1 + looked for _, rows in steps] == out.stats["recomputed_tokens"]
    unmatched = engine.match(ref_entry, target).unmatched_mask()[:prefill].nonzero()[:, 0]
    tail = queries if by_attention else torch.empty(0, dtype=torch.long)
    for (_, outer), (_, inner) in zip(steps, steps[1:]):
        assert bool(torch.isin(inner, outer).all())  # every recomputed row had a fresh input
    for _, rows in steps:
        assert bool(torch.isin(unmatched, rows).all()) and bool(torch.isin(tail, rows).all())
    assert len(steps[-1][1]) < len(steps[0][1])  # it did choose


def test_selection_methods_choose_differently(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """The knob is live: on the same request, ranking by deviation, by attention and progressively pick different
    rows somewhere."""
    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "few")[1:]
    chosen = {}
    for selection, progressive in VARIANTS:
        engine = engine_for(model, tokenizer, recompute_ratio=0.5, check_layers=1, selection=selection,
                            progressive=progressive, recompute_decay=0.8)  # progressive ranks where sets shrink
        steps = record_rows(monkeypatch)
        engine.generate(target, reference=ref_entry, max_new_tokens=2)
        if selection == "lookahead":  # its first pass (the query rows in every layer) is not a choice
            steps = steps[LAYERS:]
        chosen[selection, progressive] = tuple(tuple(rows.tolist()) for _, rows in steps)
        monkeypatch.undo()
    assert len(set(chosen.values())) == len(VARIANTS)


@pytest.mark.parametrize("edit", ["insert", "insert_start"])  # exact prefixes of 60 and of 4 (< query_window)
@pytest.mark.parametrize("selection,progressive", VARIANTS)
def test_every_selection_at_ratio_one_is_full_prefill(model, tokenizer, reference_ids, ref_entry, selection,
                                                      progressive, edit):
    """Every row past the exact prefix recomputed in every layer, whatever the ranking: the lookahead's rows,
    which come out of a budget that leaves rows reused, do not come out of one that covers them all."""
    target = edited(reference_ids, edit)
    engine = engine_for(model, tokenizer, recompute_ratio=1.0, selection=selection, progressive=progressive)
    full, full_logits = generate_with_logits(engine, target, max_new_tokens=NEW)
    out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=NEW)
    assert out.token_ids == full.token_ids
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    assert out.stats["recomputed_tokens"] == [len(target) - out.stats["exact_tokens"]] * LAYERS


def test_selection_config_is_checked():
    with pytest.raises(ValueError, match="selection"):
        ReuseConfig(selection="entropy")
    with pytest.raises(ValueError, match="selection"):
        ReuseConfig(selection=1)
    with pytest.raises(ValueError, match="query_window"):
        ReuseConfig(query_window=0)
    with pytest.raises(TypeError, match="progressive"):
        ReuseConfig(progressive=1)


@pytest.mark.parametrize("served", ["full", "reuse", "retained"])
def test_score_is_the_logits_generate_decodes_with(model, tokenizer, reference_ids, ref_entry, served):
    """"retained": deeper layers keep fewer entries (retain_ratio), one check layer, so layer 1 holds fewer slots
    than the prompt; what the continuation starts after is the prompt's length, not a deep layer's slot count."""
    target = edited(reference_ids, "few")
    engine = engine_for(model, tokenizer, **(dict(retain_ratio=0.5, check_layers=1) if served == "retained" else {}))
    reference = None if served == "full" else ref_entry
    out = engine.generate(target, reference=reference, max_new_tokens=NEW, output_logits=True,
                          return_dict_in_generate=True)
    logits, stats = engine.score(target, out.token_ids, reference=reference)
    assert stats["mode"] == ("full" if served == "full" else "reuse") and logits.shape == (NEW, model.config.vocab_size)
    torch.testing.assert_close(logits, torch.cat(out.logits).float(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="continuation"):
        engine.score(target, [])


def test_adaptive_budget_adds_the_rows_that_must_be_recomputed(model, tokenizer, reference_ids, ref_entry):
    """"fixed" counts the unmatched rows inside recompute_ratio; "adaptive" puts them on top of the ratio of the
    other rows, so a worse match recomputes more."""
    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "replace")[1:]  # no exact prefix
    ratio = 0.6  # above what the two check layers of four take on their own, so the budget decides
    runs = {budget: engine_for(model, tokenizer, matching="edit", recompute_ratio=ratio, budget=budget).generate(
        target, reference=ref_entry, max_new_tokens=2) for budget in ("fixed", "adaptive")}
    prefill = len(target) - 1
    unmatched = int(engine_for(model, tokenizer, matching="edit").match(ref_entry, target)
                    .unmatched_mask()[:prefill].sum())
    assert unmatched >= 25  # the replaced span
    extra = sum(runs["adaptive"].stats["recomputed_tokens"]) - sum(runs["fixed"].stats["recomputed_tokens"])
    assert extra == pytest.approx(LAYERS * (1 - ratio) * unmatched, abs=LAYERS)
    assert runs["adaptive"].stats["reuse_ratio"] < runs["fixed"].stats["reuse_ratio"]
    with pytest.raises(ValueError, match="budget"):
        ReuseConfig(budget="greedy")


def test_budget_cap_bounds_the_adaptive_extra_never_the_mandatory_rows():
    """`budget_cap`: the adaptive budget recomputes at most that multiple of the fixed target (mean over layers),
    never less than "fixed", and never fewer rows in a layer than the unmatched ones, which have no K/V to reuse."""
    prefill, layers, ratio = 999, 30, 0.2

    def mean_share(config, unmatched):
        counts = recompute_counts(prefill, layers, unmatched, config)
        assert min(counts) >= unmatched
        return sum(count + 1 for count in counts) / layers / (prefill + 1)

    for unmatched in (0, 30, 100, 150):
        fixed, adaptive = (mean_share(ReuseConfig(recompute_ratio=ratio, budget=b), unmatched)
                           for b in ("fixed", "adaptive"))
        for cap in (1.0, 1.25, 1.5):
            capped = mean_share(ReuseConfig(recompute_ratio=ratio, budget_cap=cap), unmatched)
            assert fixed - 1e-3 <= capped <= adaptive + 1e-3
            assert capped == pytest.approx(min(adaptive, max(fixed, cap * ratio)), abs=2e-3)
    assert mean_share(ReuseConfig(recompute_ratio=ratio, budget_cap=1.25), 100) < mean_share(ReuseConfig(), 100)
    assert mean_share(ReuseConfig(recompute_ratio=ratio, budget_cap=1.25), 400) >= 0.4  # the unmatched rows, all
    assert (recompute_counts(prefill, layers, 100, ReuseConfig(budget="fixed", budget_cap=1.25))
            == recompute_counts(prefill, layers, 100, ReuseConfig(budget="fixed")))  # a ceiling of "adaptive" only
    # Worked by hand, 9 rows, 4 layers, 5 unmatched at ratio 0.5: the fixed target 0.5 x 10 - 1 = 4 rows a layer, the
    # adaptive extra 0.5 x 5 = 2.5 capped at (cap - 1) x 0.5 x 10. Cap 1.4: 2 more, a mean of 6 = (9 + 3 x 5) / 4;
    # cap 1.44: 2.2 more, 6.2, which 5 rows a layer miss by 0.2 and 6 meet.
    for cap, deep in ((1.4, 5), (1.44, 6)):
        capped = ReuseConfig(recompute_ratio=0.5, budget_cap=cap, check_layers=1, recompute_decay=1.0)
        assert recompute_counts(9, 4, 5, capped) == [9, deep, deep, deep], cap
    for bad in (0.5, -1.0):
        with pytest.raises(ValueError, match="budget_cap"):
            ReuseConfig(budget_cap=bad)
    with pytest.raises(TypeError, match="budget_cap"):
        ReuseConfig(budget_cap="1.25")


def test_boundary_rows_are_the_first_the_budget_takes(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """`recompute_boundary`: the matched tokens right after each alignment break are the first rows the budget takes
    in every layer past the check layer, and the budget is the same as without them."""
    target = list(reference_ids)
    for at in (100, 200):  # one token replaced at each: the exact prefix ends at 100, a break after each
        target[at] = (target[at] + 1) % 512
    boundary = torch.tensor([101, 102, 103, 104, 201, 202, 203, 204])
    runs = {}
    for k in (0, 4):
        engine = engine_for(model, tokenizer, matching="edit", recompute_ratio=0.2, recompute_boundary=k,
                            check_layers=1)
        steps = record_rows(monkeypatch)
        out = engine.generate(target, reference=ref_entry, max_new_tokens=2)
        assert out.stats["exact_tokens"] == 100
        runs[k] = [rows for _, rows in steps[1:]], out.stats["recomputed_tokens"]
        monkeypatch.undo()
    assert runs[4][1] == runs[0][1] and len(runs[0][0][0]) < len(target) - 100  # the same budget, a real one
    assert all(bool(torch.isin(boundary, rows).all()) for rows in runs[4][0])
    assert not all(bool(torch.isin(boundary, rows).all()) for rows in runs[0][0])  # not what the ranking takes
    with pytest.raises(ValueError, match="recompute_boundary"):
        ReuseConfig(recompute_boundary=-1)


def test_first_rows_rank_above_the_others_and_below_the_mandatory():
    from semshare_ops.engine.rows import RowSchedule

    n, layers = 30, 3
    mandatory, first = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    mandatory[[2, 9]] = True
    first[[5, 9, 17, 25]] = True  # 9 is mandatory too
    config = ReuseConfig(recompute_ratio=0.3, check_layers=1, budget="fixed")
    schedule = RowSchedule([n, 8, 8], mandatory, config, layers, first)
    gen = torch.Generator().manual_seed(3)
    reused = (torch.randn(n, 2, 4, generator=gen), torch.randn(n, 2, 4, generator=gen))
    fresh = tuple(t.clone() for t in reused)
    fresh[0][[0, 1, 3, 4, 6, 7, 8, 10]] += 5.0  # the most stale rows: none of them first
    schedule.rank(0, reused, fresh)
    schedule.advance(0)
    top = schedule.order[:5].tolist()
    assert set(top[:2]) == {2, 9}  # the mandatory rows (9 is first too) above everything
    assert set(top[2:]) == {5, 17, 25}  # then the first rows, however little they deviate
    assert set(schedule.order[5:8].tolist()) <= {0, 1, 3, 4, 6, 7, 8, 10}  # then by deviation
    assert schedule.rows.tolist() == sorted(schedule.order[:8].tolist())
    # What decode_recompute takes: every row not in the last layer's set, in position order.
    schedule.advance(1)
    assert schedule.stale().tolist() == sorted(set(range(n)) - set(schedule.rows.tolist()))


def test_a_schedule_without_check_layers_starts_from_its_first_tiers():
    """No check layer (prefix matching): the first layer already takes only `counts[0]` rows, the mandatory then the
    first ones, before anything is ranked."""
    from semshare_ops.engine.rows import RowSchedule

    def tiers(mandatory: str, first: str, counts: list) -> list:
        must, first_rows = (torch.tensor([c == "1" for c in bits]) for bits in (mandatory, first))
        return RowSchedule(counts, must, ReuseConfig(matching="prefix"), len(counts), first_rows).rows.tolist()

    assert tiers("100100", "001000", [3, 2]) == [0, 2, 3]
    assert tiers("000100", "110000", [2, 2]) == [0, 3]  # a mandatory row above first rows before it
    # Every layer recomputing every row: nothing to rank, so no check layer reads a deviation either.
    every = RowSchedule([6, 6, 6], torch.zeros(6, dtype=torch.bool), ReuseConfig(check_layers=1), 3)
    assert not any(every.ranks(idx) for idx in range(3))


def test_each_ranking_layer_weighs_the_same_and_only_shrinking_layers_rank():
    """Progressive ranking sums each ranking layer's scores over their mean, so a layer whose K/V deviate on a
    hundred times the scale does not outvote the next; and a layer ranks again only where the next takes fewer rows.
    Deviations worked by hand: layer 0 scores rows 0-3 100, 90, 80, 10 (over their mean 70: 1.43, 1.29, 1.14, 0.14)
    and keeps 0-2; layer 1 scores them 0.001, 0.005, 0.03 (over 0.012: 0.08, 0.42, 2.5), so rows 2 and 1 lead, where
    raw sums would keep 0 and 1."""
    from semshare_ops.engine.rows import RowSchedule

    config = ReuseConfig(recompute_ratio=0.3, check_layers=1, budget="fixed", progressive=True)
    schedule = RowSchedule([4, 3, 3, 2], torch.zeros(4, dtype=torch.bool), config, 4)
    gen = torch.Generator().manual_seed(11)

    def kv_deviating_by(amounts):
        reused = tuple(torch.randn(len(amounts), 2, 4, generator=gen) for _ in range(2))
        unit = torch.zeros(len(amounts), 2, 4)
        unit[:, 0, 0] = torch.tensor(amounts)  # ||dK|| = amount, dV = 0
        return reused, (reused[0] + unit, reused[1].clone())

    assert schedule.ranks(0)
    schedule.rank(0, *kv_deviating_by([100.0, 90.0, 80.0, 10.0]))
    schedule.advance(0)
    assert schedule.rows.tolist() == [0, 1, 2]
    assert not schedule.shrinks(1) and not schedule.ranks(1) and schedule.advance(1) is None  # 3 -> 3 rows
    assert schedule.shrinks(2) and schedule.ranks(2)
    schedule.rank(2, *kv_deviating_by([0.001, 0.005, 0.03]))
    schedule.advance(2)
    assert schedule.rows.tolist() == [1, 2]


def test_the_check_deviation_is_the_check_layers_alone():
    """`deviation` (stats["check_deviation"]) is read at the last check layer; a later layer that ranks again
    (`progressive`, where the set shrinks) changes the order, not that figure."""
    from semshare_ops.engine.rows import RowSchedule

    n = 12
    config = ReuseConfig(recompute_ratio=0.3, check_layers=1, budget="fixed", progressive=True)
    schedule = RowSchedule([n, 8, 4], torch.zeros(n, dtype=torch.bool), config, 3)
    gen = torch.Generator().manual_seed(5)
    reused = (torch.randn(n, 2, 4, generator=gen), torch.randn(n, 2, 4, generator=gen))
    fresh = tuple(t + 0.1 * torch.randn(t.shape, generator=gen) for t in reused)
    schedule.rank(0, reused, fresh)
    check = schedule.deviation
    assert check == pytest.approx(mean_relative_deviation(reused, fresh, torch.zeros(n, dtype=torch.bool)))
    schedule.advance(0)
    assert schedule.ranks(1)
    rows = schedule.rows
    schedule.rank(1, tuple(t[rows] for t in reused), tuple(3.0 * t[rows] for t in fresh))
    assert schedule.deviation == check


def test_the_tails_rows_come_out_of_the_adaptive_share(model, tokenizer, reference_ids, ref_entry):
    """`recompute_tail` makes matched rows mandatory: under "adaptive" they are the first of the matched rows' share,
    not rows on top of it, while they fit in it; past it the count never falls below them."""
    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "replace")[1:]  # no exact prefix
    prefill = len(target) - 1
    runs = {tail: engine_for(model, tokenizer, matching="edit", recompute_ratio=0.6, check_layers=1,
                             recompute_tail=tail).generate(target, reference=ref_entry, max_new_tokens=2)
            for tail in (0, 8)}
    with_tail, without = (runs[tail].stats["recomputed_tokens"] for tail in (8, 0))
    assert with_tail == without and max(without[1:]) < prefill  # a real budget, and the same one
    config = ReuseConfig(recompute_ratio=0.2, check_layers=1)
    assert min(recompute_counts(prefill, LAYERS, 10, config, 0, int(0.9 * prefill))) == int(0.9 * prefill)
    assert recompute_counts(prefill, LAYERS, 10, config, 0, 10) == recompute_counts(prefill, LAYERS, 10, config)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_ranking_reads_no_reused_kv_of_mandatory_rows(selection):
    """A mandatory row is recomputed anyway, and an unmatched one has no reused K/V: the vLLM connector's slot holds
    whatever an earlier request left there. Whatever it holds (NaN here), the order of the competing rows over the
    progressive rankings is the same."""
    from semshare_ops.engine.rows import RowSchedule

    n, layers = 40, 6
    mandatory = torch.zeros(n, dtype=torch.bool)
    mandatory[[3, 4, 5, 20, 39]] = True
    config = ReuseConfig(selection=selection, recompute_ratio=0.3, recompute_decay=0.8, progressive=True,
                         budget="fixed", check_layers=1)
    counts = [n, 30, 24, 18, 14, 12]
    gen = torch.Generator().manual_seed(7)
    inputs = [[torch.randn(n, 2, 8, generator=gen) for _ in range(4)] + [torch.rand(n, generator=gen)]
              for _ in range(layers)]
    orders = []
    for fill in (0.0, float("nan")):
        schedule = RowSchedule(counts, mandatory, config, layers)
        seen = []
        for idx in range(layers):
            rows = schedule.rows
            if schedule.ranks(idx):
                rk, rv, fk, fv, att = (t[rows] for t in inputs[idx])
                rk, rv = rk.clone(), rv.clone()
                rk[mandatory[rows]], rv[mandatory[rows]] = fill, fill
                schedule.rank(idx, (rk, rv), (fk, fv), att)
                seen.append(schedule.order.tolist())
            schedule.advance(idx)
        assert len(seen) >= 2  # ranked at the check layer and again as the set shrank
        orders.append(seen)
    assert orders[0] == orders[1]


def test_kv_only_pass_writes_what_the_whole_layer_writes(model, tokenizer, reference_ids, ref_entry, monkeypatch):
    """The rows a layer computes only for the next one to drop: their K/V-only pass (the model's layer stopped once
    its K/V are written) leaves the cache the whole layer would, bit for bit, and their MLP is never run."""
    from engine_testutils import capture_assembled_cache
    from semshare_ops.engine.engine import ReuseEngine

    target = [(reference_ids[0] + 1) % 512] + edited(reference_ids, "few")[1:]
    results = []
    for stop in (True, False):
        engine = engine_for(model, tokenizer, recompute_ratio=0.4, recompute_decay=0.8)  # sets that shrink
        if not stop:  # the whole layer on every row, its output dropped
            monkeypatch.setattr(ReuseEngine, "_write_kv",
                                lambda self, idx, hidden, rows, cache: self._run_layer(idx, hidden, rows, cache))
        seen = capture_assembled_cache(engine, monkeypatch)
        mlp_rows = [0] * LAYERS
        hooks = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: mlp_rows.__setitem__(
            i, mlp_rows[i] + args[0].shape[1])) for i, layer in enumerate(model.model.layers)]
        try:
            out, logits = generate_with_logits(engine, target, reference=ref_entry, max_new_tokens=2)
        finally:
            for hook in hooks:
                hook.remove()
        results.append((seen, logits, out.stats["recomputed_tokens"], mlp_rows))
        monkeypatch.undo()
    (split, split_logits, counts, split_mlp), (whole, whole_logits, _, whole_mlp) = results
    for name in ("keys", "values", "kv_pos"):
        assert all(torch.equal(a, b) for a, b in zip(split[name], whole[name])), name
    assert torch.equal(split_logits, whole_logits)
    # MLP rows per layer: the next layer's set where the set shrinks, + 2 for the last prompt token and the new token.
    rows = [c - 1 for c in counts]
    assert split_mlp == [(rows[i + 1] if i + 1 < LAYERS else rows[i]) + 1 + 1 for i in range(LAYERS)]
    assert sum(whole_mlp) > sum(split_mlp)


def _cache_of(engine, keys: torch.Tensor, values: torch.Tensor) -> SemShareCache:
    """A request cache whose positions 0..len-1 hold these K/V [layers, len, H, D] in every layer."""
    cache = engine._new_cache(capacity=keys.shape[1] + 1, used=keys.shape[1])
    cache.keys[:, : keys.shape[1]], cache.values[:, : keys.shape[1]] = keys, values
    return cache


@pytest.mark.parametrize("exact", [0, 50])
def test_lookahead_reads_the_attention_a_full_prefill_pays(tokenizer, arch, exact):
    """Over a cache that holds the prompt's own K/V, the lookahead's queries are the full prefill's: their attention
    (per layer past the check layer, over [exact, prefill), normalised, summed) is what the model's own eager
    attention gives them, read from output_attentions of an independent copy of the model."""
    from engine_testutils import build_model

    def sharp_model():  # queries and keys scaled up: attention far from uniform, and different in every layer
        model = build_model(arch, seed=1)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(4.0)
                layer.self_attn.k_proj.weight.mul_(4.0)
        return model

    ids = rand_tokens(200, seed=5)
    prefill, q, check = len(ids) - 1, 8, 1
    engine = engine_for(sharp_model(), tokenizer, selection="lookahead", query_window=q, check_layers=check)
    entry = engine.prefill(ids)
    cache = _cache_of(engine, entry.keys[:, :prefill], entry.values[:, :prefill])
    with torch.no_grad(), cache.active():
        fused = engine._lookahead(cache, torch.tensor(ids[:prefill]), exact, torch.zeros(prefill, dtype=torch.bool), q)

    eager = sharp_model()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(torch.tensor([ids[:prefill]]), output_attentions=True).attentions
    per_layer = []
    for layer in range(LAYERS):
        paid = attentions[layer][0, :, -q:, exact:].double().sum((0, 1))
        per_layer.append(paid / paid.sum())
    expected = sum(per_layer[check:])
    assert fused.shape == (prefill - exact,)
    torch.testing.assert_close(fused.double(), expected, atol=2e-5, rtol=1e-4)
    # The comparison tells the layers apart: with the check layer counted too, or the queries' first layer instead
    # of their last, it would fail.
    assert float((sum(per_layer) - expected).abs().max()) > 1e-3
    assert float((sum(per_layer[:-1]) - expected).abs().max()) > 1e-3


def test_lookahead_hides_rows_without_kv_and_leaves_the_cache_as_it_was(model, tokenizer):
    """Rows with no reusable K/V (unmatched: their slots hold anything, NaN here) get no attention and change nothing;
    afterwards every slot's K/V, position and score are what they were, the query rows' included (random K/V here,
    which the lookahead's own would not reproduce)."""
    ids = rand_tokens(120, seed=6)
    prefill = len(ids) - 1
    engine = engine_for(model, tokenizer, selection="lookahead", query_window=8)
    gen = torch.Generator().manual_seed(3)
    shape = (LAYERS, prefill) + tuple(engine._new_cache(1).keys.shape[2:])
    cache = _cache_of(engine, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    unmatched = torch.zeros(prefill, dtype=torch.bool)
    unmatched[30:45] = True
    cache.keys[:, 30:45], cache.values[:, 30:45] = float("nan"), float("nan")
    before = (cache.keys.clone(), cache.values.clone(), [layer.kv_pos.clone() for layer in cache.layers])
    with torch.no_grad(), cache.active():
        fused = engine._lookahead(cache, torch.tensor(ids[:prefill]), 0, unmatched, 8)
    assert bool(torch.isfinite(fused).all()) and bool((fused[30:45] == 0).all()) and bool((fused[:30] > 0).all())
    torch.testing.assert_close(cache.keys, before[0], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(cache.values, before[1], atol=0, rtol=0, equal_nan=True)
    assert all(torch.equal(layer.kv_pos, kv_pos) for layer, kv_pos in zip(cache.layers, before[2]))
    assert all(layer.scores is None and cache.observe == 0 for layer in cache.layers)
    # Unmatched rows among the queries: each query writes its own K/V before its layer's attention reads them, so
    # the result is the same as with those rows matched, and their slots are put back as they were (NaN).
    unmatched[-3:] = True
    cache.keys[:, -3:], cache.values[:, -3:] = float("nan"), float("nan")
    before = (cache.keys.clone(), cache.values.clone(), [layer.kv_pos.clone() for layer in cache.layers])
    with torch.no_grad(), cache.active():
        again = engine._lookahead(cache, torch.tensor(ids[:prefill]), 0, unmatched, 8)
    torch.testing.assert_close(again, fused, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cache.keys, before[0], atol=0, rtol=0, equal_nan=True)
    assert all(torch.equal(layer.kv_pos, kv_pos) for layer, kv_pos in zip(cache.layers, before[2]))


def test_lookahead_runs_only_with_rows_to_choose(model, tokenizer, reference_ids, ref_entry):
    """When paying for its pass would leave no layer a row to choose (every count the mandatory rows or all of them),
    the lookahead does not run: the request costs and computes what "deviation" does. It once ran (and billed) its
    pass anyway, and on a weak match recomputed more rows than a full prefill (reuse_ratio < 0)."""
    target = edited(reference_ids, "few")
    for kwargs in ({}, {"recompute_ratio": 0.05}, {"recompute_ratio": 0.5, "check_layers": LAYERS}):
        dev = engine_for(model, tokenizer, **kwargs).generate(target, reference=ref_entry, max_new_tokens=4)
        look = engine_for(model, tokenizer, selection="lookahead", **kwargs).generate(target, reference=ref_entry,
                                                                                      max_new_tokens=4)
        assert look.stats["recomputed_tokens"] == dev.stats["recomputed_tokens"], kwargs
        assert look.token_ids == dev.token_ids
    short = engine_for(model, tokenizer).prefill(list(reference_ids[:3]))
    weak = engine_for(model, tokenizer, selection="lookahead").generate(
        [7] + list(reference_ids), reference=short, max_new_tokens=2, min_similarity=0.0)
    assert weak.stats["mode"] == "reuse" and 0.0 <= weak.stats["reuse_ratio"] < 0.05
    # With rows to choose it runs: its rows in every layer, out of the budget.
    wide = engine_for(model, tokenizer, selection="lookahead", recompute_ratio=0.5).generate(
        target, reference=ref_entry, max_new_tokens=4)
    plain = engine_for(model, tokenizer, recompute_ratio=0.5).generate(target, reference=ref_entry, max_new_tokens=4)
    assert wide.stats["recomputed_tokens"] != plain.stats["recomputed_tokens"]


def test_lookahead_rows_come_out_of_the_budget():
    """The lookahead's rows run in every layer, so the recompute counts give up as many: the same work per request
    at the same recompute_ratio (down to the mandatory floor)."""
    from semshare_ops.engine.rows import lookahead_rows

    config = ReuseConfig(selection="lookahead", query_window=16, recompute_ratio=0.3)
    assert lookahead_rows(config, 500) == 16 and lookahead_rows(config, 10) == 10
    assert lookahead_rows(dataclasses.replace(config, selection="blend"), 500) == 0
    prefill, layers = 500, 12
    plain = recompute_counts(prefill, layers, 20, config)
    looked = recompute_counts(prefill, layers, 20, config, lookahead=16)
    assert abs((sum(plain) - sum(looked)) - 16 * layers) <= layers  # rounding of the per-layer counts
    assert looked[:2] == [prefill] * 2 and min(looked) >= 20


@pytest.mark.parametrize("selection", SELECTIONS)
def test_attention_is_read_only_where_a_ranking_uses_it(model, tokenizer, reference_ids, ref_entry, selection,
                                                        monkeypatch):
    """Reading the attention a query window pays is one more pass over Q x K in every layer it is read in: the
    selections that rank by it read it, the deviation alone reads none (retention, which reads it too, is off)."""
    import semshare_ops.engine.hf as hf

    reads, received = [], hf._attention_received

    def counted(*args, **kwargs):
        reads.append(1)
        return received(*args, **kwargs)

    monkeypatch.setattr(hf, "_attention_received", counted)
    out = engine_for(model, tokenizer, selection=selection, recompute_ratio=0.5).generate(  # rows to choose
        edited(reference_ids, "few"), reference=ref_entry, max_new_tokens=2)
    assert out.stats["mode"] == "reuse"
    assert (len(reads) > 0) == (selection != "deviation"), (selection, len(reads))
