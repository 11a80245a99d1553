"""The connector's scheduler side (vLLM's engine-core process): chooses a donor, tells vLLM how many prompt tokens
it will provide, keeps approximate K/V out of vLLM's exact prefix cache, and assembles each request's stats.

vLLM 0.32 asks a connector only how many tokens *after* its own prefix-cache hit p it can provide, as a prefix, and
at least one prompt token must be left for vLLM to compute. So for a prompt of T tokens the connector claims
positions [p, T-1); the worker fills them (worker.py) before the step's forward, and vLLM computes token T-1 and
decodes. No model weights here: the donor is chosen by token-id edit alignment (engine.matching), and the worker
may match more tokens (LSH) when the configured method asks for it.

Prefix-cache pollution. vLLM hashes a request's full blocks into its exact prefix cache as soon as they are
allocated, before the connector has written anything, and later lookups would serve them as exact. Before vLLM
allocates a reuse request's blocks, the request's block hashes from p on (and every hash its hasher makes later,
decode blocks included: they depend on the approximate K/V) are replaced by hashes salted with a random nonce.
Those blocks are cached under keys no lookup can compute, so approximate K/V is never served as an exact prefix
hit, not even to a request admitted in the same scheduling step. Blocks [0, p) are vLLM's own exact ones, untouched.

Stats. `request_finished` hands vLLM the request's stats dict (it becomes `RequestOutput.kv_transfer_params`
["semshare"]). The worker's report of the same step (what it matched and recomputed, timings) arrives in
`update_connector_output`, later in the same `Scheduler.update_from_output` call, before the outputs are
serialised; it completes that same dict in place. A request that finishes in its load step (max_tokens=1) thus
still reports the worker's figures.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Set

import torch

from ..engine import matching
from ..engine.rows import exact_prefix, kept_exact_prefix, recompute_rows
from .donors import DonorIndex, DonorInfo
from .model import Unsupported, check_config
from .options import ConnectorOptions, RequestOptions, parse_request

logger = logging.getLogger("semshare_ops.vllm")

# Under min_similarity, a donor's exact common prefix is still loaded when it goes this many tokens past vLLM's own
# prefix-cache hit (the HF store's min_reuse_tokens default): fewer do not pay for a load.
MIN_PREFIX_TOKENS = 16


@dataclass
class LoadPlan:
    req_id: str
    donor_id: str
    token_ids: torch.Tensor  # int64 [T], the prompt
    start: int  # vLLM's exact prefix hit p: positions [start, stop) are loaded
    stop: int  # T - 1
    config: object  # ReuseConfig
    exact: int  # positions [start, exact) are the donor's exact K/V (a common prefix): loaded, never recomputed
    # Why the worker must not load (it reports the load as failed, vLLM recomputes): the request's
    # fail_load_for_testing, or a prefix computed in the same step (set when the step is built).
    refusal: Optional[str] = None
    block_ids: Optional[torch.Tensor] = None  # int64, the request's block table (set when the step is built)
    # The alignment the donor was chosen by: the worker takes it as it is for matching "edit" (aligning the same
    # two prompts again there would double the largest overhead of a load), and starts LSH from it otherwise.
    match: Optional[object] = None  # engine.matching.Match
    # Under min_similarity: [start, stop) is the donor's exact common prefix (stop = exact), taken as it is with
    # this identity match whatever the matching, nothing recomputed; vLLM computes [stop, T) over exact K/V.
    prefix_only: bool = False


@dataclass
class SavePlan:
    req_id: str
    donor_id: str
    token_ids: torch.Tensor
    block_ids: torch.Tensor
    # Keep it only if this step's load of the request reports rows [0, exact_needed) exact (`exact_until`), that is a
    # reuse that left no row reused: one hop past max_depth, kept only as the exact donor of depth 0 it then is.
    exact_needed: Optional[int] = None


@dataclass
class RequestState:
    req_id: str
    namespace: Optional[str]
    token_ids: List[int]
    options: Optional[RequestOptions]
    stats: Dict
    plan: Optional[LoadPlan] = None
    confirmed: bool = False
    load_sent: bool = False
    allocated: bool = False
    awaiting_report: bool = False
    donor_depth: int = 0
    # Positions [0, exact_until) hold a full prefill's K/V once loaded: the plan's exact prefix and the rows after
    # it that every layer recomputed, up to the first one some layer left reused; the plan's stop when none was (an
    # extension of an exact donor, ratio 1.0: the whole prompt is then a full prefill's). From the plan (for "edit"
    # matching, stop when its counts cover every row: the worker recomputes the rows the scheduler counts), then
    # from the worker's report, which knows which rows its ranking kept.
    exact_until: int = 0
    # The prompt begins with its whole donor (an identical prompt, a growing chat's next turn): no hop of drift,
    # the donor's rows keep their own context (store.tree.depth_after, the HF store's rule).
    extension: bool = False
    taint: Optional[tuple] = None  # (first hash index, original hashes, original hasher)


class SchedulerSide:
    def __init__(self, vllm_config, options: ConnectorOptions):
        self.options = options
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.index = DonorIndex()
        self.requests: Dict[str, RequestState] = {}
        self.finished: Dict[str, RequestState] = {}  # finished, their load report not yet in
        self.pending_saves: Dict[str, tuple] = {}  # donor id -> (DonorInfo, stats of the request saved)
        self.manager = None
        self.block_size = vllm_config.cache_config.block_size  # the block tables' unit, as the worker reads them
        self.disabled: Optional[str] = None
        try:
            check_config(vllm_config)
        except Unsupported as err:
            self.disabled = f"unsupported model: {err}"
            logger.error("semshare connector: reuse is off in this engine, every request takes vLLM's own "
                         "prefill: %s", self.disabled)

    def bind(self, manager) -> None:
        self.manager = manager

    # ---- admission -----------------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request, prefix_hit: int):
        state = self.requests.get(request.request_id)
        if state is None:
            state = self._new_state(request)
        elif state.allocated or request.num_preemptions > 0:
            # Preempted and now resumed; the connector does not load twice. vLLM resumes from what its prefix cache
            # still holds under the request's hashes, and past the plan's start those are the salted hashes of the
            # loaded (approximate) blocks: a hit beyond it resumes from them, and the request stays a reuse (saved
            # as one, never as an exact donor). Only a hit that ends before them recomputes the prompt in full.
            plan, stats = state.plan, state.stats
            if stats["mode"] == "reuse" and plan is not None and prefix_hit > plan.start:
                stats.update(reason=f"preempted after the load; resumed from {prefix_hit} cached tokens, of which "
                                    f"[{plan.start}, {min(prefix_hit, plan.stop)}) are the loaded ones",
                             resumed_tokens=prefix_hit)
            elif stats["mode"] == "reuse":
                stats.update(mode="fallback", reason="preempted after the load; vLLM recomputed the prompt")
            self._untaint(request, state)
            return 0, False
        if state.plan is not None and state.plan.start == prefix_hit:  # asked again: the last step could not admit it
            return state.plan.stop - state.plan.start, False
        self._cancel(request, state)
        return self._decide(request, state, prefix_hit), False

    def _new_state(self, request) -> RequestState:
        ids = list(request.prompt_token_ids or [])
        stats = {"mode": "full", "reason": None, "prompt_tokens": len(ids), "prefix_hit_tokens": 0,
                 "loaded_tokens": 0, "exact_tokens": 0, "matched_tokens": 0, "similarity": None, "donor_id": None,
                 "donor_depth": None, "recomputed_tokens": [len(ids)] * self.num_layers, "reuse_ratio": 0.0,
                 "check_deviation": None, "saved": False, "prefix_only": False}
        options = None
        try:
            params = request.kv_transfer_params
            if params is not None and not isinstance(params, Mapping):  # never the engine core's crash
                raise TypeError(f"kv_transfer_params: expected a dict, got {type(params).__name__}")
            options = parse_request((params or {}).get("semshare"), self.options)
        except (TypeError, ValueError) as err:
            stats.update(mode="fallback", reason=f"bad request options: {err}")
        state = RequestState(request.request_id, request.cache_salt, ids, options, stats)
        self.requests[request.request_id] = state
        return state

    def _decide(self, request, state: RequestState, prefix_hit: int) -> int:
        stats, opts, total = state.stats, state.options, len(state.token_ids)
        stats["prefix_hit_tokens"] = prefix_hit
        self._set_full_prefill(stats)
        if opts is None:
            return 0  # bad options: the reason is already in the stats
        if not opts.reuse:
            stats["reason"] = "reuse is off for this request"
            return 0
        if self.disabled:
            stats.update(mode="fallback", reason=self.disabled)
            return 0
        if total - 1 - prefix_hit <= 0:
            stats["reason"] = "vLLM's prefix cache holds the whole prompt"
            return 0
        start = time.perf_counter()
        choice = self.index.choose(state.namespace, state.token_ids, prefix_hit, self.options.candidates)
        stats["match_ms"] = (time.perf_counter() - start) * 1e3
        if choice is None:
            stats["reason"] = "no donor in this namespace yet"
            return 0
        cfg = opts.config
        similarity = choice.covered / total
        stats.update(donor_id=choice.donor.donor_id, donor_depth=choice.donor.depth,
                     matched_tokens=choice.match.matched, similarity=similarity)
        stop = total - 1
        exact = max(prefix_hit, exact_prefix(choice.match, choice.donor.exact_prefix, stop))
        refusal = "load failed on purpose (fail_load_for_testing)" if opts.fail_load else None
        if similarity < cfg.min_similarity:
            gated = f"similarity {similarity:.3f} is below min_similarity {cfg.min_similarity} (donor " \
                    f"{choice.donor.donor_id})"
            if exact - prefix_hit < MIN_PREFIX_TOKENS:
                stats.update(mode="fallback", reason=gated)
                return 0
            return self._plan_prefix(request, state, choice, prefix_hit, exact, refusal, gated)
        state.plan = LoadPlan(request.request_id, choice.donor.donor_id, torch.tensor(state.token_ids),
                              prefix_hit, stop, cfg, exact, match=choice.match, refusal=refusal)
        state.donor_depth = choice.donor.depth
        donor_ids = choice.donor.token_ids
        state.extension = state.token_ids[:len(donor_ids)] == list(donor_ids)
        self.index.touch(choice.donor.donor_id)
        # What the worker will recompute if it matches what this alignment matched ("edit"); its report replaces
        # this with what it did.
        counts = recompute_rows(choice.match, stop, self.num_layers, cfg, exact).counts
        whole = cfg.matching == "edit" and all(c >= stop - exact for c in counts)
        state.exact_until = stop if whole else exact
        self._set_recomputed(stats, [c + 1 for c in counts])
        stats.update(mode="reuse", reason=None, loaded_tokens=stop - prefix_hit, exact_tokens=exact)
        self._taint(request, state, prefix_hit)
        return stop - prefix_hit

    def _plan_prefix(self, request, state: RequestState, choice, prefix_hit: int, exact: int, refusal: Optional[str],
                     gated: str) -> int:
        """Under the gate, only the donor's exact common prefix [p, exact), as the HF store's prefix_only: rows a
        full prefill would compute (the same tokens at the same positions, within the donor's exact rows), and vLLM
        computes the rest over them, so the gate's promise, vLLM's own result, holds: nothing is recomputed, no
        block is tainted, and the request is an exact donor of depth 0. It pays where vLLM's prefix cache does not
        hold that prefix: the donor's blocks evicted there, salted (the donor was served by reuse), or a part
        block."""
        total = len(state.token_ids)
        state.plan = LoadPlan(request.request_id, choice.donor.donor_id, torch.tensor(state.token_ids), prefix_hit,
                              exact, state.options.config, exact, match=matching.exact_prefix_match(exact, total),
                              refusal=refusal, prefix_only=True)
        state.donor_depth, state.exact_until, state.extension = choice.donor.depth, exact, False
        self.index.touch(choice.donor.donor_id)
        self._set_recomputed(state.stats, [total - exact] * self.num_layers)
        state.stats.update(mode="reuse", reason=f"{gated}: only its exact common prefix is taken",
                           loaded_tokens=exact - prefix_hit, exact_tokens=exact, prefix_only=True)
        return exact - prefix_hit

    def update_state_after_alloc(self, request, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is None:
            return
        state.allocated = True
        if state.plan is not None and not state.confirmed:
            if num_external_tokens == state.plan.stop - state.plan.start:
                state.confirmed = True
            else:  # vLLM kept a longer local hit of its own instead
                self._cancel(request, state)
                state.stats.update(mode="full", reason="vLLM's own prefix-cache hit was preferred",
                                   loaded_tokens=0)

    def _cancel(self, request, state: RequestState) -> None:
        """Undoes a decision: its plan, taint and stats. A request asked about again (vLLM could not admit it) is
        decided afresh, and one whose new decision ends early (its donor evicted meanwhile) must not keep "reuse"
        without a plan: it was reported as one, and its save read the missing plan (an engine-core crash)."""
        state.plan, state.confirmed, state.exact_until, state.extension, state.donor_depth = None, False, 0, False, 0
        if state.options is not None:  # (without options the stats hold why: a fallback from the start)
            state.stats.update(mode="full", reason=None, loaded_tokens=0, exact_tokens=0, matched_tokens=0,
                               similarity=None, donor_id=None, donor_depth=None, prefix_only=False)
            self._set_full_prefill(state.stats)
        self._untaint(request, state)

    # ---- prefix-cache pollution ----------------------------------------------------------------------------------

    def _taint(self, request, state: RequestState, from_token: int) -> None:
        size = self.manager.block_pool.hash_block_size if self.manager is not None else None
        if not size:
            raise RuntimeError("semshare connector: no KV cache manager bound; cannot keep approximate K/V out of "
                               "the prefix cache")
        first = from_token // size
        nonce = os.urandom(16)

        def salted(h):
            return type(h)(hashlib.sha256(b"semshare-approximate-kv" + nonce + bytes(h)).digest()[:len(h)])

        original = request._block_hasher

        def hasher(req):
            begin = len(req.block_hashes)
            return [salted(h) if begin + i >= first else h for i, h in enumerate(original(req))]

        state.taint = (first, list(request.block_hashes[first:]), original)
        request.block_hashes[first:] = [salted(h) for h in request.block_hashes[first:]]
        request._block_hasher = hasher

    def _untaint(self, request, state: RequestState) -> None:
        """Back to the request's own hashes, when the connector ends up loading nothing for it before anything was
        cached under the salted ones (a cancelled plan): its blocks then hold exact K/V."""
        if state.taint is None or state.allocated and state.confirmed:
            return
        first, hashes, hasher = state.taint
        request.block_hashes[first: first + len(hashes)] = hashes
        request._block_hasher = hasher
        state.taint = None

    # ---- per step ------------------------------------------------------------------------------------------------

    def build_step(self, scheduler_output):
        loads, saves = [], []
        computed: Dict[str, int] = {}
        blocks: Dict[str, list] = {}
        for new in scheduler_output.scheduled_new_reqs:
            computed[new.req_id] = new.num_computed_tokens
            blocks[new.req_id] = new.block_ids[0]
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num in zip(cached.req_ids, cached.num_computed_tokens):
            computed.setdefault(req_id, num)
        for req_id, state in self.requests.items():
            if state.plan is not None and state.confirmed and not state.load_sent and req_id in blocks:
                state.plan.block_ids = torch.tensor(blocks[req_id], dtype=torch.long)
                loads.append(state.plan)
                state.load_sent = state.awaiting_report = True
        self._refuse_unwritten_prefixes(loads, scheduler_output, computed)
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self.requests.get(req_id)
            if state is None or state.options is None or not state.options.save or req_id not in computed:
                continue
            before, total = computed[req_id], len(state.token_ids)
            if not before < total <= before + scheduled:
                continue  # the prompt is not completed in this step
            depth, exact = self._donor_depth_and_exact(state)
            exact_needed = None
            if depth > self.options.max_depth:
                state.stats["saved_reason"] = f"depth {depth} exceeds max_depth {self.options.max_depth}"
                if not state.awaiting_report:
                    continue
                # Its load runs in this step, and under lsh/hybrid matching only the worker knows whether it leaves
                # any row reused: the worker keeps it only if none is (then it is exact, depth 0: apply_report).
                exact_needed = state.plan.stop
            block_ids = torch.tensor(self.manager.get_block_ids(req_id)[0], dtype=torch.long)
            saves.append(SavePlan(req_id, req_id, torch.tensor(state.token_ids), block_ids, exact_needed))
            info = DonorInfo(req_id, state.namespace, state.token_ids, depth, exact)
            self.pending_saves[req_id] = (info, state.stats)
        return loads, saves

    @staticmethod
    def _donor_depth_and_exact(state: RequestState) -> tuple:
        """The depth and exact prefix of a request's K/V as a donor, by the HF store's rules. A full prefill, or a
        reuse that left no row reused past its exact prefix (`exact_until` at the plan's stop), is exact throughout
        and depth 0: otherwise a growing chat served turn after turn from its previous turn would count every turn as
        a hop, stop being kept at max_depth, and have the exact rows of earlier turns recomputed as if approximate.
        An extension of its donor keeps the donor's depth; any other reuse is one hop deeper, exact up to
        `exact_until`."""
        total = len(state.token_ids)
        if state.stats["mode"] != "reuse" or state.exact_until >= state.plan.stop:
            return 0, total
        depth = state.donor_depth if state.extension else state.donor_depth + 1
        return depth, kept_exact_prefix(state.exact_until, total)

    def _refuse_unwritten_prefixes(self, loads: List[LoadPlan], scheduler_output, computed: Dict[str, int]) -> None:
        """A load whose prefix-cache hit [0, p) lies in blocks another request computes in this same step fails.

        vLLM caches a block's hash when it allocates the block, so a request admitted in the step that computes a
        prefix can hit it. vLLM's own prefill of that request is right (each layer writes every request's K/V before
        its attention reads them), but the worker recomputes the loaded rows before the step's forward, when those
        blocks are not written yet. Such a load is reported as failed; vLLM recomputes [p, T) in the next step, by
        which time the prefix exists."""
        pending = [plan for plan in loads if plan.start > 0 and plan.refusal is None]
        if not pending:
            return
        bs = self.block_size
        written: Dict[str, Set[int]] = {}
        for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
            if req_id in computed and scheduled > 0:
                first, end = computed[req_id], computed[req_id] + scheduled
                table = self.manager.get_block_ids(req_id)[0]
                written[req_id] = set(table[first // bs: (end - 1) // bs + 1])
        for plan in pending:
            prefix = set(plan.block_ids[: -(-plan.start // bs)].tolist())
            if any(prefix & blocks for req_id, blocks in written.items() if req_id != plan.req_id):
                plan.refusal = (f"its {plan.start}-token prefix-cache hit is computed by another request in this same "
                                f"step; vLLM computed the prompt")

    def apply_report(self, report: Optional[Dict]) -> None:
        if not report:
            return
        if report.get("disabled") and not self.disabled:
            self.disabled = report["disabled"]
        # Loads first: a load's report can change what the request's donor, saved in the same step, holds exactly.
        for req_id, result in report.get("loads", {}).items():
            state = self.requests.get(req_id) or self.finished.pop(req_id, None)
            if state is None:
                continue
            state.awaiting_report = False
            stats = state.stats
            if "error" in result:
                stats.update(mode="fallback", reason=result["error"], loaded_tokens=0)
                self._set_full_prefill(stats)
                continue
            # (+ the tokens vLLM computes: the last one, or under the gate every one past the exact prefix)
            tail = len(state.token_ids) - state.plan.stop
            self._set_recomputed(stats, [c + tail for c in result["recomputed"]])
            stats.update(matched_tokens=result["matched_tokens"],
                         similarity=result["covered_tokens"] / max(len(state.token_ids), 1),
                         load_ms=result["load_ms"], assemble_ms=result["assemble_ms"],
                         recompute_ms=result["recompute_ms"], worker_match_ms=result["match_ms"],
                         attention_runs=result["runs"], check_deviation=result["check_deviation"])
            state.exact_until = result["exact_until"]
            if req_id in self.pending_saves:  # saved in the step that loaded it
                info = self.pending_saves[req_id][0]
                info.depth, info.exact_prefix = self._donor_depth_and_exact(state)
        for donor_id in report.get("saved", {}):
            info, stats = self.pending_saves.pop(donor_id, (None, None))
            if info is not None:
                self.index.add(info)
                stats["saved"] = True
                stats.pop("saved_reason", None)  # a save past max_depth its load left exact (exact_needed)
        for donor_id, reason in report.get("unsaved", {}).items():  # the worker did not keep it, and says why
            _, stats = self.pending_saves.pop(donor_id, (None, None))
            if stats is not None:
                stats.setdefault("saved_reason", reason)  # the scheduler's own reason (max_depth) comes first
        for donor_id in report.get("evicted", []):
            self.index.remove(donor_id)

    def _set_full_prefill(self, stats: Dict) -> None:
        """Per-layer recomputed tokens of a full prefill over vLLM's own prefix hit, which counts as reused."""
        hit = stats["prefix_hit_tokens"]
        stats["recomputed_tokens"] = [stats["prompt_tokens"] - hit] * self.num_layers
        stats["reuse_ratio"] = hit / max(stats["prompt_tokens"], 1)

    def _set_recomputed(self, stats: Dict, per_layer: List[int]) -> None:
        """Per-layer recomputed tokens of a reuse request, the exact prefix hit counted as reused."""
        stats["recomputed_tokens"] = per_layer
        stats["reuse_ratio"] = 1.0 - sum(per_layer) / (self.num_layers * max(stats["prompt_tokens"], 1))

    def request_finished(self, request) -> Dict:
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return {}
        if state.awaiting_report:
            self.finished[request.request_id] = state
        return {"semshare": state.stats}
