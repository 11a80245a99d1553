"""The connector's scheduler-side bookkeeping (semshare_ops.vllm.scheduler) against stand-ins of vLLM's request,
KV-cache manager and scheduler output: what it plans for a request admitted beside the one that computes its prefix,
for a request resumed after preemption, for options that are not a dict, and for saves the worker skips; and the
donors' index and byte-bounded store (semshare_ops.vllm.donors). No vLLM needed: these run in `make test` too;
test_connector.py serves the same cases through a real engine."""
from types import SimpleNamespace

import pytest
import torch

from semshare_ops.vllm.donors import Donor, DonorIndex, DonorInfo, DonorStore, ngrams
from semshare_ops.vllm.options import ConnectorOptions, parse_extra_config
from semshare_ops.vllm.scheduler import SavePlan, SchedulerSide
from semshare_ops.vllm.worker import WorkerSide

BS = 4  # block size
LAYERS = 3


def _side(options=None, **config_fields):
    config = SimpleNamespace(
        model_config=SimpleNamespace(get_num_layers=lambda parallel: LAYERS, architectures=["LlamaForCausalLM"]),
        parallel_config=None, cache_config=SimpleNamespace(block_size=BS), **{"lora_config": None, **config_fields})
    side = SchedulerSide(config, options or ConnectorOptions())
    side.tables = {}  # req_id -> its block table, as the manager keeps it
    side.bind(SimpleNamespace(block_pool=SimpleNamespace(hash_block_size=BS),
                              get_block_ids=lambda req_id: [side.tables[req_id]]))
    return side


def _request(req_id, ids, params=None):
    blocks = [bytes([i]) * 8 for i in range(len(ids) // BS)]
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(ids), kv_transfer_params=params, cache_salt="s",
                           num_preemptions=0, block_hashes=blocks, _block_hasher=lambda req: [])


def _output(new=(), cached=()):
    """A SchedulerOutput of new requests (req_id, num_computed, num_scheduled, table) and cached ones (the same)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c, block_ids=[t]) for r, c, _, t in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, *_ in cached],
                                              num_computed_tokens=[c for _, c, *_ in cached]),
        num_scheduled_tokens={r: n for r, _, n, _ in list(new) + list(cached)})


DONOR = list(range(100, 140))  # 40 tokens
TARGET = DONOR[:20] + [7, 8] + DONOR[22:]  # an edit at 20-21
# A full prefill's stats of TARGET, vLLM's prefix hit aside (a request that looked for a donor adds match_ms).
FULL = {"mode": "full", "reason": None, "prompt_tokens": len(TARGET), "loaded_tokens": 0, "exact_tokens": 0,
        "matched_tokens": 0, "similarity": None, "donor_id": None, "donor_depth": None, "check_deviation": None,
        "saved": False, "prefix_only": False}


def _admit(side, prefix_hit, table, target=TARGET, donor_depth=0):
    """A reuse request of `target` whose vLLM prefix hit is `prefix_hit` tokens, admitted with block table `table`."""
    side.index.add(DonorInfo("donor", "s", DONOR, depth=donor_depth, exact_prefix=len(DONOR)))
    request = _request("b", target)
    claimed, _ = side.get_num_new_matched_tokens(request, prefix_hit)
    assert claimed == len(target) - 1 - prefix_hit
    side.update_state_after_alloc(request, claimed)
    side.tables["b"] = table
    return request


@pytest.mark.parametrize("prefix_hit, computed, scheduled", [
    (12, 0, 20),  # A computes blocks 0-4, the shared prefix (blocks 0-2) among them
    (16, 12, 1),  # A computes one token, the first of block 3, the last block of B's hit
])
def test_a_prefix_computed_by_another_request_in_the_same_step_is_not_loaded_on(prefix_hit, computed, scheduled):
    side = _side()
    blocks = prefix_hit // BS
    table_b = list(range(blocks)) + list(range(20, 30 - blocks))  # B's first blocks hold its prefix hit
    request = _admit(side, prefix_hit, table_b)
    side.tables["a"] = [0, 1, 2, 3, 4]  # request A computes (part of) the shared prefix in this very step
    loads, _ = side.build_step(_output(new=[("a", computed, scheduled, side.tables["a"]), ("b", 39, 1, table_b)]))
    assert len(loads) == 1 and "same step" in loads[0].refusal, loads[0].refusal
    # Reported back as a failed load: the request's stats say why, and vLLM recomputes it.
    side.apply_report({"loads": {"b": {"error": loads[0].refusal}}})
    s = side.requests["b"].stats
    assert s["mode"] == "fallback" and "same step" in s["reason"], s
    rest = len(TARGET) - prefix_hit
    assert (s["loaded_tokens"], s["recomputed_tokens"], s["reuse_ratio"]) == (0, [rest] * LAYERS, prefix_hit / 40), s
    # Preempted later and resumed past its hit: still the failed load, not a load resumed from.
    request.num_preemptions = 1
    assert side.get_num_new_matched_tokens(request, 24) == (0, False) and "same step" in s["reason"], s


def test_a_load_failed_on_purpose_is_not_refused_again_in_the_same_step():
    """A fail_load_for_testing load keeps its own reason (the fallback test through a real engine reads it)."""
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    request = _request("b", TARGET, {"semshare": {"fail_load_for_testing": True}})
    claimed, _ = side.get_num_new_matched_tokens(request, 12)
    side.update_state_after_alloc(request, claimed)
    side.tables.update(a=[0, 1, 2, 3, 4], b=[0, 1, 2] + list(range(20, 27)))
    loads, _ = side.build_step(_output(new=[("a", 0, 20, side.tables["a"]), ("b", 39, 1, side.tables["b"])]))
    assert len(loads) == 1 and "on purpose" in loads[0].refusal, loads[0].refusal


def test_a_prefix_computed_in_an_earlier_step_is_loaded_on():
    side = _side()
    table_b = [0, 1, 2] + list(range(20, 27))
    _admit(side, 12, table_b)
    side.tables["a"] = [0, 1, 2, 3, 4]
    # A computed blocks 0-2 before; this step it writes only its blocks 3-4 (tokens 12-19).
    loads, _ = side.build_step(_output(new=[("b", 39, 1, table_b)], cached=[("a", 12, 8, None)]))
    assert len(loads) == 1 and loads[0].refusal is None


def _preempted(side, prefix_hit_on_resume):
    table = list(range(10))
    request = _admit(side, 0, table)
    side.build_step(_output(new=[("b", 39, 1, table)]))  # the load step; the prompt completes: a save is planned
    side.apply_report({"loads": {"b": {"recomputed": [39, 10, 10], "matched_tokens": 38, "covered_tokens": 38,
                                       "load_ms": 1.0, "assemble_ms": 1.0, "recompute_ms": 1.0, "match_ms": 1.0,
                                       "runs": [], "check_deviation": None, "exact_until": 24}},
                       "saved": {"b": 1}})
    request.num_preemptions = 1
    salted = list(request.block_hashes)
    assert side.get_num_new_matched_tokens(request, prefix_hit_on_resume) == (0, False)
    side.update_state_after_alloc(request, 0)  # vLLM allocates the resumed request: no external token
    assert request.block_hashes == salted  # cached under them, the loaded (approximate) blocks stay salted
    side.tables["b"] = table
    loads, _ = side.build_step(_output(new=[("b", prefix_hit_on_resume, len(TARGET) - prefix_hit_on_resume, table)]))
    assert loads == []  # loaded once
    return side.requests["b"].stats, side.pending_saves["b"][0]


def test_a_request_resumed_from_its_loaded_blocks_stays_a_reuse_and_is_no_exact_donor():
    stats, info = _preempted(_side(), 24)  # vLLM still holds the salted (approximate) blocks 0-5
    assert stats["mode"] == "reuse" and "resumed from 24" in stats["reason"] and "[0, 24)" in stats["reason"], stats
    assert stats["resumed_tokens"] == 24
    assert info.depth == 1 and info.exact_prefix == 24  # what its load left exact (report), not the whole prompt


def test_a_request_preempted_and_recomputed_is_an_exact_donor():
    stats, info = _preempted(_side(), 0)  # vLLM freed and evicted every loaded block: it computes the prompt
    assert stats["mode"] == "fallback" and "recomputed the prompt" in stats["reason"], stats
    assert info.depth == 0 and info.exact_prefix == len(TARGET)


def test_transfer_params_that_are_not_a_dict_are_a_fallback_not_a_crash():
    side = _side()
    for params in (["semshare"], "semshare", 3):
        request = _request(f"r{params!r}", TARGET, params)
        assert side.get_num_new_matched_tokens(request, 0) == (0, False)
        stats = side.requests[request.request_id].stats
        assert stats["mode"] == "fallback" and "kv_transfer_params" in stats["reason"], stats
        assert stats == {**FULL, "mode": "fallback", "reason": stats["reason"], "prefix_hit_tokens": 0,
                         "recomputed_tokens": [len(TARGET)] * LAYERS, "reuse_ratio": 0.0}


def test_an_engine_with_lora_is_refused_by_name(caplog):
    side = _side(lora_config=SimpleNamespace(max_loras=1))
    assert "LoRA" in side.disabled
    assert [r.name for r in caplog.records if "LoRA" in r.getMessage()] == ["semshare_ops.vllm"]
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    request = _request("b", TARGET)  # a donor that matches: without LoRA this would be a reuse
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)
    stats = side.requests["b"].stats
    assert stats["mode"] == "fallback" and "LoRA" in stats["reason"], stats
    assert _side().disabled is None


def test_a_save_the_worker_skips_is_forgotten_and_its_reason_given():
    side = _side()
    stats = {"saved": False}
    side.pending_saves["r"] = (DonorInfo("r", "s", TARGET, depth=0), stats)
    worker = WorkerSide(SimpleNamespace(), ConnectorOptions())  # no model registered: it cannot save
    worker.disabled = "unsupported model: sliding window"
    worker.wait_for_save(SimpleNamespace(saves=[SavePlan("r", "r", torch.tensor(TARGET), torch.arange(10))]))
    side.apply_report(worker.take_report())
    assert side.pending_saves == {} and "r" not in side.index
    assert stats == {"saved": False, "saved_reason": "reuse is off in this engine: unsupported model: sliding window"}


def test_each_save_the_worker_skips_says_why():
    """A failed load's leftovers, a save past max_depth whose load left rows reused (the scheduler's own reason
    stays), K/V larger than the donor store, an error while reading them: each skipped, each reason in the stats."""
    layers, heads, dim = 2, 1, 4
    model = SimpleNamespace(read_all=lambda block_ids, start, stop: (torch.ones(layers, stop, heads, dim),) * 2)
    worker = WorkerSide(SimpleNamespace(), ConnectorOptions())
    worker.model, worker.store = model, DonorStore(capacity_bytes=2 * layers * 20 * heads * dim * 4)
    worker.failed_requests.add("failed")
    worker.report["loads"]["deep"] = {"exact_until": 3}
    plans = [SavePlan("failed", "failed", torch.arange(10), torch.arange(1)),
             SavePlan("deep", "deep", torch.arange(10), torch.arange(1), exact_needed=8),
             SavePlan("large", "large", torch.arange(21), torch.arange(1)),
             SavePlan("kept", "kept", torch.arange(20), torch.arange(1))]
    worker.wait_for_save(SimpleNamespace(saves=plans))
    model.read_all = lambda block_ids, start, stop: 1 / 0
    worker.wait_for_save(SimpleNamespace(saves=[SavePlan("error", "error", torch.arange(10), torch.arange(1))]))
    side = _side()
    stats = {name: {"saved": False} for name in ("failed", "deep", "large", "kept", "error")}
    stats["deep"]["saved_reason"] = "depth 2 exceeds max_depth 1"
    for name, s in stats.items():
        side.pending_saves[name] = (DonorInfo(name, "s", TARGET, depth=0), s)
    side.apply_report(worker.take_report())
    assert side.pending_saves == {} and "kept" in side.index and stats["kept"] == {"saved": True}
    assert stats["failed"]["saved_reason"] == "its load failed: its cache holds the failed load's rows"
    assert stats["deep"]["saved_reason"] == "depth 2 exceeds max_depth 1"
    assert stats["large"]["saved_reason"] == "its K/V (1344 bytes) exceed the donor store (1280 bytes)"
    assert stats["error"]["saved_reason"] == "saving failed (ZeroDivisionError: division by zero)"
    assert not any(s["saved"] for name, s in stats.items() if name != "kept")


def test_the_worker_hands_each_report_and_failed_block_once():
    """take_report: None while nothing happened, else the report, then a fresh empty one; take_failed_blocks: the
    blocks of failed loads, once."""
    worker = WorkerSide(SimpleNamespace(), ConnectorOptions())
    assert worker.take_report() is None and worker.take_failed_blocks() == set()
    worker.report["evicted"].extend(["d1", "d2"])  # as a save that evicted two donors reports them
    worker.failed_blocks.update({3, 5})
    assert worker.take_report() == {"loads": {}, "saved": {}, "evicted": ["d1", "d2"], "unsaved": {}}
    assert worker.take_report() is None
    assert worker.take_failed_blocks() == {3, 5} and worker.take_failed_blocks() == set()


EXTENSION = DONOR + list(range(200, 212))  # the donor and 12 new tokens: a growing chat's next turn


def _report(recomputed, exact_until, saved=True):
    """The worker's report of the load of request b (and its save): `exact_until`, its first row left reused."""
    load = {"recomputed": recomputed, "matched_tokens": len(DONOR), "covered_tokens": len(DONOR), "load_ms": 1.0,
            "assemble_ms": 1.0, "recompute_ms": 1.0, "match_ms": 1.0, "runs": [], "check_deviation": None,
            "exact_until": exact_until}
    return {"loads": {"b": load}, **({"saved": {"b": 1}} if saved else {})}


def test_an_extension_of_its_donor_is_an_exact_donor_of_depth_0():
    """Every row past the donor's exact rows is new, so recomputed in every layer: the prompt's K/V are a full
    prefill's. As a donor it is exact throughout and no hop deeper (it was kept as depth + 1 with the donor's
    length as its exact prefix: a growing chat stopped being kept after max_depth turns, and every turn recomputed
    the earlier turns' exact rows as approximate)."""
    side = _side()
    _admit(side, 0, list(range(13)), EXTENSION, donor_depth=3)
    assert side.requests["b"].plan.exact == len(DONOR)
    _, saves = side.build_step(_output(new=[("b", len(EXTENSION) - 1, 1, list(range(13)))]))
    info = side.pending_saves["b"][0]
    assert len(saves) == 1 and (info.depth, info.exact_prefix) == (0, len(EXTENSION))
    side.apply_report(_report([len(EXTENSION) - 1 - len(DONOR)] * LAYERS, len(EXTENSION) - 1))
    assert side.requests["b"].stats["mode"] == "reuse"
    added = side.index.get("b")
    assert (added.depth, added.exact_prefix) == (0, len(EXTENSION))


def test_a_donor_at_max_depth_still_keeps_an_extension():
    side = _side(parse_extra_config({"max_depth": 1}))
    _admit(side, 0, list(range(13)), EXTENSION, donor_depth=1)
    _, saves = side.build_step(_output(new=[("b", len(EXTENSION) - 1, 1, list(range(13)))]))
    assert len(saves) == 1 and "saved_reason" not in side.requests["b"].stats


def test_an_edit_is_one_hop_deeper_and_exact_up_to_its_first_row_left_reused():
    """Exact: the common prefix (20) and the rows after it every layer recomputed (the edit's own, 20-21, and two
    boundary rows), as the worker's ranking kept them; the donor once recorded the common prefix only."""
    side = _side()
    _admit(side, 0, list(range(10)), donor_depth=2)
    side.build_step(_output(new=[("b", 39, 1, list(range(10)))]))
    assert side.pending_saves["b"][0].exact_prefix == 20  # before the report: what the plan knows
    side.apply_report(_report([39 - 20, 10, 10], 24))
    info = side.index.get("b")
    assert (info.depth, info.exact_prefix) == (3, 24)


def test_the_workers_report_decides_under_lsh_matching():
    """Under LSH matching the worker aligns again and may recompute other rows than the scheduler counted: the
    donor saved in the load step takes what the worker's report says it did, before it joins the index."""
    stop = len(EXTENSION) - 1
    for recomputed, exact_until, want in (([stop - len(DONOR)] * LAYERS, stop, (0, len(EXTENSION))),
                                          ([stop - len(DONOR), 5, 5], 45, (0, 45))):  # the donor's depth
        side = _side(parse_extra_config({"matching": "lsh"}))
        _admit(side, 0, list(range(13)), EXTENSION)
        assert side.requests["b"].exact_until == len(DONOR)  # not from the plan's counts: the worker matches again
        side.build_step(_output(new=[("b", len(EXTENSION) - 1, 1, list(range(13)))]))
        info = side.pending_saves["b"][0]
        side.apply_report(_report(recomputed, exact_until))  # the load and the save in one report: load first
        assert "b" not in side.pending_saves and (info.depth, info.exact_prefix) == want


def test_a_reuse_past_max_depth_is_kept_only_if_its_load_leaves_no_row_reused():
    """A donor at max_depth and an edit of it (no extension), under LSH matching: one hop past max_depth, unless the
    worker's load recomputes every row past the exact prefix in every layer (ratio 1.0, a budget that covers them):
    its K/V are then a full prefill's, an exact donor of depth 0. Only the worker knows, in the step that loads and
    saves it; the save was once refused when the step was built, so such a prompt was never kept."""
    stop = len(TARGET) - 1
    for exact_until, kept in ((stop, True), (24, False)):
        side = _side(parse_extra_config({"matching": "lsh", "max_depth": 1}))
        _admit(side, 0, list(range(10)), donor_depth=1)
        _, saves = side.build_step(_output(new=[("b", stop, 1, list(range(10)))]))
        assert len(saves) == 1 and saves[0].exact_needed == stop, saves
        assert side.requests["b"].stats["saved_reason"] == "depth 2 exceeds max_depth 1"
        # The worker, with this step's load reported: it keeps the donor only if the load left every row exact.
        worker = WorkerSide(SimpleNamespace(), parse_extra_config({"matching": "lsh"}))
        worker.model = SimpleNamespace(read_all=lambda blocks, start, stop: (torch.randn(LAYERS, len(TARGET), 1, 4),
                                                                           torch.randn(LAYERS, len(TARGET), 1, 4)))
        worker._codes = lambda ids: torch.zeros(len(ids), 2, dtype=torch.long)
        worker.report["loads"]["b"] = _report([stop - 20] * LAYERS, exact_until)["loads"]["b"]
        worker.wait_for_save(SimpleNamespace(saves=saves))
        assert (worker.store.get("b") is not None) == kept
        side.apply_report(worker.take_report())
        stats = side.requests["b"].stats
        assert side.pending_saves == {} and stats["saved"] == kept and ("saved_reason" in stats) != kept, stats
        if kept:
            info = side.index.get("b")
            assert (info.depth, info.exact_prefix) == (0, len(TARGET))
        else:
            assert "b" not in side.index
    # A save built after its load's report came back (a later step; vLLM completes a reused prompt in its load
    # step, so only the scheduler's side is exercised here): that report decides, as it did.
    side = _side(parse_extra_config({"matching": "lsh", "max_depth": 1}))
    _admit(side, 0, list(range(10)), donor_depth=1)
    side.build_step(_output(new=[("b", 0, 16, list(range(10)))]))
    side.apply_report(_report([stop - 20] * LAYERS, 24, saved=False))
    _, saves = side.build_step(_output(cached=[("b", 16, stop - 15, None)]))
    assert saves == [] and side.requests["b"].stats["saved_reason"] == "depth 2 exceeds max_depth 1"


def test_an_extension_of_an_approximate_donor_keeps_its_depth():
    """The HF store's rule (store.tree.depth_after): the donor's rows keep their own context, no hop of drift. Its
    exact prefix stays the donor's; the connector once counted a hop, so a growing chat whose first turn was an edit
    stopped being kept max_depth turns later, where the HF store kept every turn."""
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=2, exact_prefix=20))
    request = _request("b", EXTENSION)
    claimed, _ = side.get_num_new_matched_tokens(request, 0)
    side.update_state_after_alloc(request, claimed)
    side.tables["b"] = list(range(13))
    side.build_step(_output(new=[("b", len(EXTENSION) - 1, 1, side.tables["b"])]))
    side.apply_report(_report([len(EXTENSION) - 1 - 20, 20, 20], 20))  # rows 20-39 left reused in layers 1-2
    info = side.index.get("b")
    assert (info.depth, info.exact_prefix) == (2, 20)


def test_a_request_decided_again_without_a_donor_is_no_reuse():
    """vLLM asks again about a request it could not admit, with another prefix hit, and its donor was evicted
    meanwhile: the new decision (no donor) replaces the old one. The stats once kept "reuse" (donor, loaded tokens)
    without a plan, and the step that completed the prompt read the missing plan to save it: an AttributeError in
    vLLM's engine core."""
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    request = _request("b", TARGET)
    assert side.get_num_new_matched_tokens(request, 0) == (len(TARGET) - 1, False)
    side.apply_report({"evicted": ["donor"]})
    assert side.get_num_new_matched_tokens(request, 4) == (0, False)
    stats = side.requests["b"].stats
    assert stats["mode"] == "full" and stats["reason"] == "no donor in this namespace yet", stats
    assert stats["donor_id"] is None and stats["loaded_tokens"] == 0 and stats["exact_tokens"] == 0, stats
    side.update_state_after_alloc(request, 0)
    side.tables["b"] = list(range(10))
    _, saves = side.build_step(_output(new=[("b", 4, len(TARGET) - 4, side.tables["b"])]))
    info = side.pending_saves["b"][0]
    assert len(saves) == 1 and (info.depth, info.exact_prefix) == (0, len(TARGET))


LONG_TURN = DONOR + list(range(300, 360))  # an exact donor and 60 new tokens: similarity 0.4, under the gate


def test_under_the_gate_only_the_exact_common_prefix_is_loaded():
    """The HF store's prefix_only: the donor's exact rows shared with the prompt are taken as they are and vLLM
    computes the rest, so the result is vLLM's own; no block is tainted (every row is exact) and the request is an
    exact donor of depth 0. The connector once fell back to vLLM's prefill of everything past its prefix-cache hit,
    which does not hold rows the donor got by reuse (their blocks are salted)."""
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=2, exact_prefix=len(DONOR)))
    request = _request("b", LONG_TURN)
    hasher = request._block_hasher
    claimed, _ = side.get_num_new_matched_tokens(request, 8)
    state = side.requests["b"]
    s = state.stats
    assert claimed == len(DONOR) - 8 and state.plan.prefix_only and state.plan.stop == state.plan.exact == len(DONOR)
    assert s["mode"] == "reuse" and s["prefix_only"] and "only its exact common prefix" in s["reason"], s
    assert s["recomputed_tokens"] == [len(LONG_TURN) - len(DONOR)] * LAYERS and s["exact_tokens"] == len(DONOR)
    assert state.taint is None and request._block_hasher is hasher
    assert (state.plan.req_id, state.plan.donor_id, state.plan.refusal, s["loaded_tokens"]) == ("b", "donor", None, 32)
    assert state.plan.match.dst.tolist() == list(range(len(DONOR))) and side.index.get("donor").used == 2  # touched
    side.update_state_after_alloc(request, claimed)
    side.tables["b"] = list(range(25))
    loads, saves = side.build_step(_output(new=[("b", len(DONOR), len(LONG_TURN) - len(DONOR), side.tables["b"])]))
    assert len(loads) == 1 and loads[0].refusal is None and len(saves) == 1
    side.apply_report(_report([0] * LAYERS, len(DONOR)))
    assert s["recomputed_tokens"] == [len(LONG_TURN) - len(DONOR)] * LAYERS  # vLLM's share, once
    info = side.index.get("b")
    assert (info.depth, info.exact_prefix) == (0, len(LONG_TURN))


def test_under_the_gate_a_short_or_approximate_prefix_is_a_fallback():
    """Fewer than MIN_PREFIX_TOKENS (16) exact rows past vLLM's own hit: 12 past a 28-token hit of an exact donor;
    12 past an 8-token hit where the donor holds only 20 exact rows (past them its K/V are approximate)."""
    for exact_rows, prefix_hit in ((len(DONOR), 28), (20, 8)):
        side = _side()
        side.index.add(DonorInfo("donor", "s", DONOR, depth=1, exact_prefix=exact_rows))
        request = _request("b", LONG_TURN)
        assert side.get_num_new_matched_tokens(request, prefix_hit) == (0, False)
        s = side.requests["b"].stats
        assert s["mode"] == "fallback" and "min_similarity" in s["reason"] and not s["prefix_only"], s


def test_ngrams_are_the_prompts_token_4_grams():
    assert ngrams(DONOR) == frozenset(hash(tuple(DONOR[i:i + 4])) for i in range(len(DONOR) - 3))
    assert ngrams(DONOR[:3]) == frozenset()  # too short for one: nothing shared with any donor


def test_a_donor_is_pre_ranked_by_shared_4_grams_and_chosen_by_alignment():
    """One candidate: the donor sharing the prompt's 4-grams, though neither the first nor the last added. Every
    donor aligned: the one covering the most tokens, though it shares no 4-gram (every fourth token edited)."""
    index = DonorIndex()
    scattered = [t + 1000 if i % 4 == 3 else t for i, t in enumerate(TARGET)]
    for donor_id, ids in (("first", list(range(500, 540))), ("scattered", scattered),
                          ("head", TARGET[:12] + list(range(600, 628))), ("last", list(range(700, 740)))):
        index.add(DonorInfo(donor_id, "s", ids, depth=0))
    assert index.choose("s", TARGET, 0, 1).donor.donor_id == "head"
    choice = index.choose("s", TARGET, 0, 4)
    assert choice.donor.donor_id == "scattered" and choice.covered == 30, (choice.donor.donor_id, choice.covered)


def test_equal_donors_go_to_the_most_recently_used():
    """Two copies of the prompt at the same depth: the one added, then the one touched, last wins, whether the
    pre-ranking (one candidate) or the alignment (two) decides; the prefix hit counts as covered."""
    index = DonorIndex()
    for donor_id in ("older", "newer"):
        index.add(DonorInfo(donor_id, "s", list(TARGET), depth=1))
    assert len(index) == 2 and "older" in index and "b" not in index
    for want in ("newer", "older"):
        for candidates in (1, 2):
            choice = index.choose("s", TARGET, 8, candidates)
            assert choice.donor.donor_id == want and choice.covered == len(TARGET), (candidates, choice.covered)
        index.touch("older")


def _donor(donor_id, tokens):
    """A worker-side donor: one layer, one head of 2 dims, fp32, so 16 bytes a token."""
    keys = torch.arange(1, 1 + 2 * tokens, dtype=torch.float32).view(1, tokens, 1, 2)
    return Donor(donor_id, torch.arange(100, 100 + tokens), keys, -keys, None)


def test_the_donor_store_keeps_its_byte_budget_least_recently_used_first():
    store = DonorStore(64)
    a = _donor("a", 2)
    assert a.nbytes == 32
    assert store.put(a) == (True, []) and store.put(_donor("b", 2)) == (True, []) and store.nbytes == 64
    assert store.get("a") is a and len(store) == 2  # a is now more recent than b
    assert store.put(_donor("c", 2)) == (True, ["b"]) and (len(store), store.nbytes) == (2, 64)
    assert store.put(_donor("a", 2)) == (True, []) and store.nbytes == 64  # a replaced: counted once
    assert store.put(_donor("big", 4)) == (True, ["c", "a"]) and store.nbytes == 64  # the whole budget: kept
    # Larger than the budget: not stored, and the one it would replace is gone.
    assert store.put(_donor("big", 5)) == (False, ["big"]) and (len(store), store.nbytes) == (0, 0)


@pytest.mark.parametrize("params, prefix_hit, namespace, reason", [
    ({"semshare": {"reuse": False}}, 4, "s", "reuse is off for this request"),
    (None, 39, "s", "vLLM's prefix cache holds the whole prompt"),  # all but the last token, which vLLM computes
    (None, 8, "other", "no donor in this namespace yet"),
])
def test_a_request_not_served_by_reuse_reports_a_full_prefill(params, prefix_hit, namespace, reason):
    side = _side()
    side.index.add(DonorInfo("donor", namespace, DONOR, depth=0, exact_prefix=len(DONOR)))
    request = _request("b", TARGET, params)
    assert side.get_num_new_matched_tokens(request, prefix_hit) == (0, False)
    stats = side.request_finished(request)["semshare"]
    assert side.finished == {}  # no load report to wait for
    assert stats.pop("match_ms", 0.0) >= 0.0
    assert stats == {**FULL, "reason": reason, "prefix_hit_tokens": prefix_hit,
                     "recomputed_tokens": [len(TARGET) - prefix_hit] * LAYERS, "reuse_ratio": prefix_hit / len(TARGET)}


def test_a_request_without_prompt_token_ids_is_a_full_prefill():
    side = _side()  # (vLLM's prompt embeddings)
    request = _request("e", TARGET)
    request.prompt_token_ids = None
    assert side.get_num_new_matched_tokens(request, 0) == (0, False)
    stats = side.requests["e"].stats
    assert (stats["mode"], stats["prompt_tokens"], stats["reuse_ratio"]) == ("full", 0, 0.0), stats


def test_a_reuse_plans_its_load_and_salts_the_blocks_past_the_prefix_hit():
    """Prefix hit 12 (blocks 0-2), the donor's exact common prefix 20 tokens: rows [12, 39) loaded, the edit and its
    boundary rows recomputed. The request's hashes from block 3 on, and those its hasher makes from there, are salted
    (approximate K/V never an exact prefix hit); vLLM's own blocks 0-2 keep theirs."""
    side = _side()
    request = _request("b", TARGET)
    hashes = list(request.block_hashes)
    request._block_hasher = lambda req: [b"\x0b" * 8, b"\x0c" * 8]  # the hashes of its next two full blocks
    side.index.add(DonorInfo("donor", "s", DONOR, depth=2, exact_prefix=len(DONOR)))
    used = side.index.get("donor").used
    assert side.get_num_new_matched_tokens(request, 12) == (27, False)
    state = side.requests["b"]
    assert 0.0 < state.stats.pop("match_ms") < 10_000.0
    assert state.stats == {**FULL, "mode": "reuse", "prefix_hit_tokens": 12, "loaded_tokens": 27, "exact_tokens": 20,
                           "matched_tokens": 38, "similarity": 0.95, "donor_id": "donor", "donor_depth": 2,
                           "recomputed_tokens": [20, 20, 3], "reuse_ratio": 1.0 - 43 / (LAYERS * len(TARGET))}
    plan = state.plan
    assert (plan.req_id, plan.donor_id, plan.start, plan.stop, plan.exact) == ("b", "donor", 12, 39, 20)
    assert plan.token_ids.tolist() == TARGET and plan.match.matched == 38 and plan.config == side.options.reuse
    assert plan.refusal is None and not plan.prefix_only and (state.donor_depth, state.exact_until) == (2, 20)
    assert side.index.get("donor").used > used  # the chosen donor is now the most recently used
    assert request.block_hashes[:3] == hashes[:3]
    assert all(len(a) == len(b) and a != b for a, b in zip(request.block_hashes[3:], hashes[3:], strict=True))
    block_2, block_3 = request._block_hasher(SimpleNamespace(block_hashes=hashes[:2]))
    assert block_2 == b"\x0b" * 8 and len(block_3) == 8 and block_3 != b"\x0c" * 8  # vLLM's, then salted
    assert all(h not in (b"\x0b" * 8, b"\x0c" * 8) for h in request._block_hasher(SimpleNamespace(block_hashes=hashes)))


@pytest.mark.parametrize("target, hits, claims", [
    (TARGET, (12,), (27,)),
    (TARGET, (12, 12, 8), (27, 27, 31)),  # asked again: the same claim, then another hit's, decided afresh
    (LONG_TURN, (8,), (32,)),  # under the gate: its exact prefix only
])
def test_a_plan_vllm_does_not_take_is_undone(target, hits, claims):
    """vLLM allocated no external token (it kept a longer hit of its own): the plan, its stats and its salted hashes
    are undone, and the request, allocated, is not planned again."""
    side = _side()
    request = _request("b", target)
    hashes, hasher = list(request.block_hashes), request._block_hasher
    side.index.add(DonorInfo("donor", "s", DONOR, depth=1, exact_prefix=len(DONOR)))
    assert tuple(side.get_num_new_matched_tokens(request, hit)[0] for hit in hits) == claims
    side.update_state_after_alloc(request, 0)
    state = side.requests["b"]
    assert {k: state.stats[k] for k in FULL} == {**FULL, "reason": "vLLM's own prefix-cache hit was preferred",
                                                 "prompt_tokens": len(target)}
    # a full prefill's figures over the last hit asked about, not the cancelled plan's
    hit = hits[-1]
    assert state.stats["recomputed_tokens"] == [len(target) - hit] * LAYERS
    assert state.stats["reuse_ratio"] == hit / len(target)
    assert state.plan is None and state.taint is None
    assert request.block_hashes == hashes and request._block_hasher is hasher
    assert side.get_num_new_matched_tokens(request, 12) == (0, False) and state.plan is None


def test_the_workers_report_completes_the_stats_of_a_finished_request():
    """A request that finishes in its load step (max_tokens=1): `request_finished` hands vLLM its stats dict, and
    the worker's report of that step, which arrives after it, completes that same dict."""
    side = _side()
    request = _admit(side, 12, list(range(10)))
    assert side.build_step(_output()) == ([], [])  # admitted, but not scheduled in this step
    loads, _ = side.build_step(_output(new=[("b", 12, 28, list(range(10)))]))
    assert len(loads) == 1
    stats = side.request_finished(request)["semshare"]
    assert stats["mode"] == "reuse" and "b" not in side.requests and side.request_finished(request) == {}
    side.apply_report({"loads": {"b": {"recomputed": [27, 9, 5], "matched_tokens": 37, "covered_tokens": 36,
                                       "load_ms": 1.0, "assemble_ms": 2.0, "recompute_ms": 3.0, "match_ms": 4.0,
                                       "runs": [[0, 5]], "check_deviation": 0.25, "exact_until": 24}}})
    assert side.finished == {}
    side.apply_report({"loads": {"b": {"error": "a late report"}}})  # no request left: nothing to complete
    # The worker's rows and the last token, which vLLM computes.
    assert stats["recomputed_tokens"] == [28, 10, 6] and stats["reuse_ratio"] == 1.0 - 44 / (LAYERS * len(TARGET))
    assert {k: stats[k] for k in ("matched_tokens", "similarity", "load_ms", "assemble_ms", "recompute_ms",
                                  "worker_match_ms", "attention_runs", "check_deviation")} == {
        "matched_tokens": 37, "similarity": 0.9, "load_ms": 1.0, "assemble_ms": 2.0, "recompute_ms": 3.0,
        "worker_match_ms": 4.0, "attention_runs": [[0, 5]], "check_deviation": 0.25}


@pytest.mark.parametrize("target, prefix_hit, claimed", [
    (TARGET, 38, 1),  # one token to load, the last one vLLM's
    (DONOR + list(range(300, 340)), 0, 79),  # similarity 0.5, exactly min_similarity: not gated
    (LONG_TURN, 24, 16),  # under the gate, MIN_PREFIX_TOKENS exact rows past vLLM's hit: loaded
    (LONG_TURN, 25, 0),  # one fewer: not
])
def test_the_claim_at_its_bounds(target, prefix_hit, claimed):
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    assert side.get_num_new_matched_tokens(_request("b", target), prefix_hit) == (claimed, False)


@pytest.mark.parametrize("target", [TARGET, LONG_TURN])  # a reuse, and a load of the exact prefix under the gate
def test_a_load_failed_on_purpose_is_planned_as_refused(target):
    side = _side()
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    request = _request("b", target, {"semshare": {"fail_load_for_testing": True}})
    assert side.get_num_new_matched_tokens(request, 0)[0] > 0
    assert "on purpose" in side.requests["b"].plan.refusal


@pytest.mark.parametrize("params, computed, scheduled", [
    ({"semshare": {"save": False}}, 0, 40),
    (["not a dict"], 0, 40),  # bad options: a fallback, never saved
    (None, 0, 39),  # the prompt's last token is computed in a later step
    (None, 40, 1),  # a decode step
])
def test_a_prompt_is_saved_only_in_the_step_that_completes_it_and_only_if_asked(params, computed, scheduled):
    side = _side()
    side.get_num_new_matched_tokens(_request("b", TARGET, params), 0)
    side.tables["b"] = list(range(11))
    if computed == 0:
        output = _output(new=[("b", computed, scheduled, side.tables["b"])])
    else:
        output = _output(cached=[("b", computed, scheduled, None)])
    assert side.build_step(output) == ([], []) and side.pending_saves == {}


def test_a_reuse_at_max_depth_is_kept():
    side = _side(parse_extra_config({"max_depth": 1}))
    _admit(side, 0, list(range(10)))  # an edit of a donor of depth 0: depth 1
    _, saves = side.build_step(_output(new=[("b", 39, 1, list(range(10)))]))
    assert len(saves) == 1 and saves[0].exact_needed is None and "saved_reason" not in side.requests["b"].stats
    assert saves[0].token_ids.tolist() == TARGET and saves[0].block_ids.tolist() == list(range(10))
    info = side.pending_saves["b"][0]
    assert (info.namespace, info.token_ids, info.depth, info.exact_prefix) == ("s", TARGET, 1, 20)


def test_a_worker_without_a_model_disables_reuse_once():
    side = _side()
    side.apply_report({"disabled": "no model registered"})
    side.apply_report({"disabled": "another reason"})  # the first one stands
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    assert side.get_num_new_matched_tokens(_request("b", TARGET), 0) == (0, False)
    stats = side.requests["b"].stats
    assert side.disabled == "no model registered" and stats["reason"] == side.disabled and stats["mode"] == "fallback"


def test_a_reuse_without_a_kv_cache_manager_is_refused():
    side = _side()
    side.bind(None)
    side.index.add(DonorInfo("donor", "s", DONOR, depth=0, exact_prefix=len(DONOR)))
    with pytest.raises(RuntimeError, match="no KV cache manager bound"):
        side.get_num_new_matched_tokens(_request("b", TARGET), 0)
