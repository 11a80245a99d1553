"""Semantic KV reuse inside vLLM (0.32, CPU backend): a V1 KV connector, its donor store and its plugin.

    from vllm import LLM, SamplingParams
    import semshare_ops.vllm as ssv
    llm = LLM(model_dir, **ssv.engine_args(recompute_ratio=0.2))
    outs = llm.generate([{"prompt": text, "cache_salt": "alice"}], SamplingParams(temperature=0, max_tokens=64))
    outs[0].kv_transfer_params["semshare"]   # mode, matched_tokens, reuse_ratio, recomputed_tokens, donor_id, ...

Every prompt served with `save` on (the default) is kept (K/V on the worker, within `donor_bytes` and `max_depth`) as a
donor for later prompts of the same `cache_salt` (no salt: one shared default namespace). A later prompt close enough to
a donor has its KV cache assembled from the donor's (keys re-rotated to their new positions with `rope_reuse_`) and
partly recomputed through vLLM's own decoder layers, exactly as `ReuseEngine` does on a Hugging Face model; vLLM then
computes the last prompt token and decodes. Anything that cannot be served that way (low similarity, preemption, a
failed load, an unsupported model) takes vLLM's own prefill, with the reason in the stats (under the similarity gate,
after the donor's exact common prefix with the prompt). Approximate K/V never becomes an exact prefix-cache hit.
docs/contract.md section 6 is the contract; scheduler.py and worker.py say how.

Modules: `options` (settings, no vLLM import), `connector` (the class vLLM loads), `scheduler` and `worker` (its two
sides), `donors`, `model` (vLLM's layers driven row by row), `layout` (the paged cache and its inverse), `plugin`
(the `vllm.general_plugins` entry point), `convert` (GGUF -> HF directory).
"""
from __future__ import annotations

import json
from typing import Any, Dict

from .options import ConnectorOptions, options_from_kwargs, parse_extra_config, parse_request

CONNECTOR = "SemShareConnector"
CONNECTOR_MODULE = "semshare_ops.vllm.connector"

__all__ = ["engine_args", "kv_transfer_config", "serve_flag", "CONNECTOR", "CONNECTOR_MODULE", "ConnectorOptions",
           "parse_extra_config", "parse_request"]


def kv_transfer_config(**reuse_config: Any) -> Dict[str, Any]:
    """The `kv_transfer_config` as a plain dict (`vllm serve --kv-transfer-config "$(...)"` takes it as JSON).
    Keyword arguments: the `ReuseConfig` fields that apply (matching "edit" by default, "lsh" or "hybrid";
    recompute_ratio, min_similarity, ...) and the connector's own (donor_bytes, max_depth, candidates). TypeError
    or ValueError naming the argument when one is unknown or out of range."""
    options = options_from_kwargs(reuse_config)
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": CONNECTOR_MODULE, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": options.to_extra_config()}


def engine_args(**reuse_config: Any) -> Dict[str, Any]:
    """Keyword arguments for `vllm.LLM(model, **engine_args(...))` (or `EngineArgs`): the `kv_transfer_config`
    that loads the connector with these settings (see `kv_transfer_config`). Everything else (enforce_eager,
    dtype, prefix caching, ...) stays the caller's choice."""
    from vllm.config import KVTransferConfig

    return {"kv_transfer_config": KVTransferConfig(**kv_transfer_config(**reuse_config))}


def serve_flag(**reuse_config: Any) -> str:
    """The same settings as the `--kv-transfer-config` value of `vllm serve` (JSON)."""
    return json.dumps(kv_transfer_config(**reuse_config), separators=(",", ":"))
