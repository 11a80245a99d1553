"""The connector's worker side: keeps donors' K/V, and serves a reuse request in `start_load_kv`, before the step's
forward, doing what `ReuseEngine` does between match and decode:

1. match the prompt to the donor with `engine.matching.match_tokens` (the configured method: edit alignment, and
   for "lsh"/"hybrid" the LSH codes of the model's own input embeddings, as the HF engine computes them);
2. assemble positions [p, T-1) from the donor's K/V with `rope_reuse_` (keys re-rotated by the position delta with
   each layer's own inverse frequencies) and write them through each attention layer's cache-update function; p is
   vLLM's own exact prefix-cache hit, left as it is;
3. recompute a nested row set past the exact prefix layer by layer through vLLM's decoder layers
   (`model.VllmModel`): every row in the check layers, then the unmatched rows, the boundary rows and the rows whose
   K/V deviate most at the last check layer (`engine.rows.recompute_rows`, `engine.rows.RowSchedule`: the HF
   engine's own schedule and ranking); where the next layer takes fewer rows, the dropped ones get only their K/V
   in this layer (`VllmModel.write_kv`), as in the HF engine;
4. vLLM then computes the last prompt token in its forward, and decodes.

A failure anywhere (a donor evicted since the scheduler chose it, an exception) reports the request's blocks from p
on as failed loads: vLLM (kv_load_failure_policy "recompute") discards the step's token for it and recomputes them,
i.e. a normal prefill. The reason goes back to the scheduler in the step's `WorkerReport`.

Saving: when a request's prompt is complete (the scheduler says which), its K/V [0, T) are copied out of the paged
cache after the forward (`wait_for_save`) into the `DonorStore`.
"""
from __future__ import annotations

import functools
import logging
import time
import traceback
from typing import Dict, List, Optional, Set

import torch

from .. import ops
from ..engine import matching
from ..engine.rows import RowSchedule, recompute_rows
from . import layout, plugin
from .donors import Donor, DonorStore
from .model import Unsupported, VllmModel
from .options import ConnectorOptions

logger = logging.getLogger("semshare_ops.vllm")


class LoadFailed(Exception):
    pass


class WorkerSide:
    def __init__(self, vllm_config, options: ConnectorOptions):
        self.vllm_config = vllm_config
        self.options = options
        self.store = DonorStore(options.donor_bytes)
        self.model: Optional[VllmModel] = None
        self.disabled: Optional[str] = None  # why this worker cannot serve reuse
        self.planes = None
        self.report: Dict = _empty_report()
        self.failed_blocks: Set[int] = set()
        self.failed_requests: Set[str] = set()

    # ---- set-up ------------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor], caller_frame=None) -> None:
        runner = plugin.current_runner()
        if runner is None and caller_frame is not None:
            # Not installed as a package (the entry point is then unknown to vLLM): the caller is the runner's own
            # initialize_kv_cache, whose `self` is the runner.
            candidate = caller_frame.f_locals.get("self")
            if hasattr(candidate, "attn_groups") and hasattr(candidate, "model"):
                runner = candidate
        if runner is None:
            self.disabled = ("the model is not reachable: the semshare vLLM plugin (entry point "
                             "vllm.general_plugins: semshare) did not run in the worker")
        else:
            try:
                with torch.inference_mode():
                    self.model = VllmModel(runner, self.vllm_config, kv_caches)
                    self.model.self_check()
                    self.model.probe_rope()
                    cfg = self.options.reuse
                    self.planes = matching.lsh_planes(self.model.model.config.hidden_size, cfg.lsh_bits, cfg.lsh_seed)
            except Unsupported as err:
                self.model, self.disabled = None, f"unsupported model: {err}"
            except Exception as err:  # a model the checks did not foresee: refuse it by name, never guess
                self.model, self.disabled = None, f"unsupported model: set-up failed ({type(err).__name__}: {err})"
        if self.disabled:
            logger.error("semshare connector: reuse is off in this engine, every request takes vLLM's own prefill: "
                         "%s", self.disabled)

    # ---- per step ----------------------------------------------------------------------------------------------

    def start_load_kv(self, meta) -> None:
        for plan in meta.loads:
            start = time.perf_counter()
            try:
                if self.disabled:
                    raise LoadFailed(self.disabled)
                if plan.refusal:
                    raise LoadFailed(plan.refusal)
                with torch.inference_mode():
                    result = self._load(plan)
                result["load_ms"] = (time.perf_counter() - start) * 1e3
                self.report["loads"][plan.req_id] = result
            except Exception as err:  # never the engine's crash: the request falls back to vLLM's prefill
                reason = str(err) if isinstance(err, LoadFailed) else f"load failed: {type(err).__name__}: {err}"
                if not isinstance(err, LoadFailed):
                    logger.warning("semshare connector: %s\n%s", reason, traceback.format_exc())
                bs = self.vllm_config.cache_config.block_size
                self.failed_blocks.update(plan.block_ids[plan.start // bs: (plan.stop - 1) // bs + 1].tolist())
                self.failed_requests.add(plan.req_id)
                self.report["loads"][plan.req_id] = {"error": reason}

    def wait_for_save(self, meta) -> None:
        for save in meta.saves:
            if self.model is None:
                self.report["unsaved"][save.donor_id] = f"reuse is off in this engine: {self.disabled or 'no model'}"
                continue
            if save.req_id in self.failed_requests:
                # Its cache holds a failed load's leftovers this step; vLLM recomputes it first.
                self.report["unsaved"][save.donor_id] = "its load failed: its cache holds the failed load's rows"
                continue
            if save.exact_needed is not None and \
                    self.report["loads"].get(save.req_id, {}).get("exact_until", -1) < save.exact_needed:
                # Past max_depth and not exact: not a donor (the scheduler has said why).
                self.report["unsaved"][save.donor_id] = "past max_depth, and its load left rows reused"
                continue
            try:
                with torch.inference_mode():
                    keys, values = self.model.read_all(save.block_ids, 0, len(save.token_ids))
                    codes = None
                    if self.options.reuse.matching != "edit":
                        codes = self._codes(save.token_ids)
                donor = Donor(save.donor_id, save.token_ids, keys, values, codes)
                stored, evicted = self.store.put(donor)
                if stored:
                    self.report["saved"][save.donor_id] = donor.nbytes
                else:
                    self.report["unsaved"][save.donor_id] = (f"its K/V ({donor.nbytes} bytes) exceed the donor "
                                                             f"store ({self.store.capacity_bytes} bytes)")
                self.report["evicted"].extend(evicted)
            except Exception as err:  # a donor less, nothing worse
                logger.warning("semshare connector: saving %s failed: %s: %s", save.req_id, type(err).__name__, err)
                self.report["unsaved"][save.donor_id] = f"saving failed ({type(err).__name__}: {err})"

    def take_report(self) -> Optional[Dict]:
        report, self.report = self.report, _empty_report()
        self.failed_requests = set()
        return report if any(report.values()) else None

    def take_failed_blocks(self) -> Set[int]:
        blocks, self.failed_blocks = self.failed_blocks, set()
        return blocks

    # ---- the reuse path ----------------------------------------------------------------------------------------

    def _codes(self, ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LSH codes of the prompt's tokens at `positions` (default: all of them)."""
        cfg = self.options.reuse
        embeddings = self.model.embed(ids if positions is None else ids[positions]).float()
        return matching.embedding_codes(embeddings, self.planes, cfg.embedding_rope_base, positions)

    def _load(self, plan) -> Dict:
        cfg = plan.config
        donor = self.store.get(plan.donor_id)
        if donor is None:
            raise LoadFailed(f"donor {plan.donor_id} was evicted before the load")
        ids, start, prefill = plan.token_ids, plan.start, plan.stop  # positions [start, prefill) are loaded
        t0 = time.perf_counter()
        if plan.match is not None and plan.match.src.numel() and int(plan.match.src.max()) >= len(donor.token_ids):
            raise LoadFailed(f"donor {plan.donor_id} is not the prompt the scheduler aligned")
        if (cfg.matching == "edit" or plan.prefix_only) and plan.match is not None:
            match = plan.match  # the scheduler's alignment of the same two prompts (or its exact common prefix)
        else:
            codes = functools.partial(self._codes, ids) if cfg.matching != "edit" else None
            match = matching.match_tokens(donor.token_ids, ids, cfg.matching, donor.codes, codes,
                                          cfg.lsh_max_distance)
        # (no lookahead pass: the connector ranks by deviation)
        mandatory, first, counts, _ = recompute_rows(match, prefill, self.model.num_layers, cfg, plan.exact)
        keep = (match.dst >= start) & (match.dst < prefill)
        dst, src = match.dst[keep], match.src[keep]
        t1 = time.perf_counter()
        self._assemble(plan, donor, src, dst, cfg.rope_correction)
        t2 = time.perf_counter()
        runs, deviation, exact_until = self._recompute(plan, mandatory, first, counts,
                                                       match.unmatched_mask()[:prefill])
        t3 = time.perf_counter()
        covered = int((match.dst >= start).sum()) + start
        return {"matched_tokens": match.matched, "covered_tokens": covered, "recomputed": counts, "runs": runs,
                "check_deviation": deviation, "exact_until": exact_until,
                "match_ms": (t1 - t0) * 1e3, "assemble_ms": (t2 - t1) * 1e3, "recompute_ms": (t3 - t2) * 1e3}

    def _assemble(self, plan, donor: Donor, src: torch.Tensor, dst: torch.Tensor, rope_correction: bool) -> None:
        """Positions [start, stop) of every layer from the donor's K/V, keys re-rotated by the position delta, one
        layer at a time through one buffer of the request's rows (a few MB, warm in the CPU's caches, where a buffer of
        every layer, hundreds of MB fresh from the allocator, cost page faults and a second pass over memory). Slots
        no donor token maps to are recomputed in every layer, which writes them before its attention reads them;
        they hold zeros until then, so that the check layer's ranking never reads another request's leftovers."""
        model, start, stop = self.model, plan.start, plan.stop
        n = stop - start
        keys = torch.empty((1, n, model.kv_heads, model.head_dim), dtype=model.dtype)
        values = torch.empty_like(keys)
        unmapped = torch.ones(n, dtype=torch.bool)
        unmapped[dst - start] = False
        keys[:, unmapped] = 0  # never written by rope_reuse_: zero for every layer
        values[:, unmapped] = 0
        delta = dst - src if rope_correction else torch.zeros_like(dst)
        slots = layout.slots_of(plan.block_ids, torch.arange(start, stop), model.block_size)
        for group in model.rope_groups:
            for idx in group.layers:
                ops.rope_reuse_(keys, values, donor.keys[idx: idx + 1], donor.values[idx: idx + 1], src, dst - start,
                                delta, group.inv_freq, group.neox)
                model.write(idx, keys[0], values[0], slots)

    def _recompute(self, plan, mandatory: torch.Tensor, first: torch.Tensor, counts: List[int],
                   unmatched: torch.Tensor):
        """The HF engine's `_recompute` over positions [exact, stop) (engine.ReuseEngine._recompute: the same
        counts, ranking and nesting) through vLLM's layers. Returns the runs per layer, the check layer's
        deviation, and where the prompt's exact rows end: the first row some layer left reused (the rows before it
        were computed in every layer over exact K/V), or stop when none was."""
        model, cfg, exact, stop = self.model, plan.config, plan.exact, plan.stop
        n, num_layers = stop - exact, model.num_layers
        runs = []
        if n == 0:
            return runs, None, stop
        # Ranked by deviation only (the connector does not take `selection`): vLLM's layers keep their queries.
        schedule = RowSchedule(counts, mandatory[exact:stop], cfg, num_layers, first[exact:stop],
                               unmatched[exact:stop])
        hidden, residual = model.embed(plan.token_ids[exact + schedule.rows]), None
        context = None
        for idx in range(num_layers):
            if len(schedule.rows) == 0:  # nested sets: every deeper layer reuses everything too
                break
            positions = exact + schedule.rows
            ranks = schedule.ranks(idx)
            if ranks:
                reused = model.read_rows(idx, plan.block_ids, positions)
            if schedule.shrinks(idx):
                # As the HF engine: the rows the next layer drops need only their K/V here (a K/V-only pass over every
                # row), then the whole layer runs over the rows that go on, their queries seeing every row's fresh K/V.
                model.write_kv(idx, positions, hidden, residual, plan.block_ids)
                if ranks:
                    schedule.rank(idx, reused, model.read_rows(idx, plan.block_ids, positions))
                keep = schedule.advance(idx)
                if len(keep) == 0:  # every deeper layer reuses everything
                    break
                hidden, residual = hidden[keep], None if residual is None else residual[keep]
                positions = exact + schedule.rows
                context = model.metadata(positions, plan.block_ids)
                runs.append(len(next(iter(context[0].values())).seq_lens))
                hidden, residual = model.run_layer(idx, positions, hidden, residual, plan.block_ids, context)
                continue
            if context is None:  # built again only when the row set changes (one metadata serves every layer)
                context = model.metadata(positions, plan.block_ids)
            runs.append(len(next(iter(context[0].values())).seq_lens))
            hidden, residual = model.run_layer(idx, positions, hidden, residual, plan.block_ids, context)
            if ranks:
                schedule.rank(idx, reused, model.read_rows(idx, plan.block_ids, positions))
            keep = schedule.advance(idx)
            if keep is not None:
                hidden, residual, context = hidden[keep], None if residual is None else residual[keep], None
        stale = schedule.stale()  # (a loop stopped early: no deeper layer computed any row, so all are stale)
        return runs, schedule.deviation, exact + int(stale[0]) if len(stale) else stop


def _empty_report() -> Dict:
    return {"loads": {}, "saved": {}, "evicted": [], "unsaved": {}}
