"""`SemShareConnector`: semantic KV reuse as a vLLM V1 KV connector (vLLM 0.32).

vLLM builds one instance per role from `kv_transfer_config` (`engine_args` writes it): the scheduler's, in the
engine-core process (scheduler.py), and the worker's, next to the model and its paged cache (worker.py). They talk
through vLLM's per-step channels only: `StepMeta` (scheduler -> worker: loads to serve, prompts to keep as donors)
and `WorkerReport` (worker -> scheduler: what each load did, donors stored and evicted).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from .options import parse_extra_config
from .scheduler import LoadPlan, SavePlan, SchedulerSide
from .worker import WorkerSide

__all__ = ["SemShareConnector", "StepMeta", "WorkerReport", "LoadPlan", "SavePlan"]


@dataclass
class StepMeta(KVConnectorMetadata):
    loads: List[LoadPlan] = field(default_factory=list)
    saves: List[SavePlan] = field(default_factory=list)


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    data: Dict = field(default_factory=dict)

    def aggregate(self, other: "WorkerReport") -> "WorkerReport":
        # One worker per engine (the model check refuses tensor and pipeline parallelism); merge all the same.
        merged = {"loads": {**self.data.get("loads", {}), **other.data.get("loads", {})},
                  "saved": {**self.data.get("saved", {}), **other.data.get("saved", {})},
                  "evicted": self.data.get("evicted", []) + other.data.get("evicted", [])}
        disabled = self.data.get("disabled") or other.data.get("disabled")
        if disabled:
            merged["disabled"] = disabled
        return WorkerReport(merged)


class SemShareConnector(KVConnectorBase_V1):
    """Serves a prompt's KV cache from an earlier, similar prompt's (see the package docstring)."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        try:
            options = parse_extra_config(transfer.kv_connector_extra_config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"semshare connector: {err}") from None
        if transfer.kv_load_failure_policy != "recompute":
            raise ValueError("semshare connector: kv_transfer_config.kv_load_failure_policy must be 'recompute' "
                             "(a failed load then falls back to vLLM's own prefill instead of failing the request); "
                             f"got {transfer.kv_load_failure_policy!r}. semshare_ops.vllm.engine_args() sets it.")
        self._scheduler: Optional[SchedulerSide] = None
        self._worker: Optional[WorkerSide] = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(vllm_config, options)
        else:
            self._worker = WorkerSide(vllm_config, options)

    # ---- scheduler side ------------------------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler.bind(kv_cache_manager)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        loads, saves = self._scheduler.build_step(scheduler_output)
        return StepMeta(loads, saves)

    def update_connector_output(self, connector_output) -> None:
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, WorkerReport):
            self._scheduler.apply_report(report.data)

    def request_finished(self, request, block_ids):
        return False, self._scheduler.request_finished(request) or None

    # ---- worker side ---------------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches, sys._getframe(1))
        if self._worker.disabled:
            self._worker.report["disabled"] = self._worker.disabled

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous: done in start_load_kv, before the forward

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return None  # donors are copied once per request, after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._get_connector_metadata())

    def get_block_ids_with_load_errors(self) -> set:
        return self._worker.take_failed_blocks()

    def build_connector_worker_meta(self):
        report = self._worker.take_report()
        return WorkerReport(report) if report else None
