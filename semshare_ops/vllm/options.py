"""The connector's settings: `kv_connector_extra_config` (per engine) and `kv_transfer_params["semshare"]` (per
request), parsed and checked here without importing vLLM, so that `engine_args` refuses a bad value in the caller's
process instead of at engine start-up.

Engine settings are the `ReuseConfig` fields that apply to vLLM (`ReuseConfig` checks their values) plus the
connector's own:
- `donor_bytes` (default 1 GiB): the worker's budget for donors' K/V, least recently used evicted first;
- `max_depth` (default 4): a request served by reuse from a donor of depth d is kept as a donor of depth d + 1, and
  not kept past `max_depth` (reuse hops compound their approximation; a full prefill is depth 0, and so is a reuse
  that left no row reused);
- `candidates` (default 4): donors of the request's namespace aligned token by token, after a cheap pre-ranking.
Request settings: `reuse` and `save` (booleans, default True: take a donor's K/V / keep this prompt as a donor)
and per-request values of the per-request `ReuseConfig` fields (`recompute_ratio`, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

from ..engine.config import ReuseConfig
from ..engine.engine import check_count

# ReuseConfig fields the connector honours. retain_ratio/retain_decay are not among them: vLLM's paged cache holds
# every position of every layer and its attention reads them all. Nor are selection/query_window: the connector
# ranks by deviation only (the attention of the prompt's tail would need vLLM's queries, which its layers keep).
# Nor are guard_margin/decode_recompute: they act between decode steps, and vLLM's scheduler runs decoding.
REUSE_FIELDS = ("matching", "recompute_ratio", "min_similarity", "rope_correction", "check_layers", "recompute_decay",
                "recompute_tail", "recompute_boundary", "progressive", "budget", "budget_cap", "lsh_bits",
                "lsh_max_distance", "lsh_seed", "embedding_rope_base")
# The other ReuseConfig fields: accepted only at the value that means "off" (OFF_FIELDS, with why), or, where they
# only tune a setting that is off here, at any value ReuseConfig accepts (MOOT_FIELDS); either way checked as
# ReuseConfig checks them, so a mistyped value is named and not passed over.
_BETWEEN_STEPS = "it acts between decode steps, and vLLM's scheduler runs decoding"
OFF_FIELDS = {"retain_ratio": (None, "vLLM's paged cache keeps every position of every layer"),
              "guard_margin": (0.0, _BETWEEN_STEPS), "decode_recompute": (0, _BETWEEN_STEPS),
              "selection": ("deviation", "it ranks rows by deviation only: the attention of the prompt's last "
                                         "tokens would need the queries vLLM's layers keep")}
MOOT_FIELDS = ("retain_decay", "query_window")  # read only with retain_ratio / a selection other than deviation
# Those a request may set for itself; the LSH planes (bits, seed) are the worker's, fixed per engine.
REQUEST_FIELDS = ("recompute_ratio", "min_similarity", "rope_correction", "check_layers", "recompute_decay",
                  "recompute_tail", "recompute_boundary", "progressive", "budget", "budget_cap", "lsh_max_distance")
# "prefix" and "chunk" are the HF benchmarks' baselines: vLLM's own prefix cache is the first, and the second has no
# use once edit alignment runs.
MATCHING = ("edit", "lsh", "hybrid")
CONNECTOR_FIELDS = {"donor_bytes": 1 << 30, "max_depth": 4, "candidates": 4}
# The connector's ReuseConfig before kv_connector_extra_config: edit alignment, rows ranked by deviation (whatever
# the HF engine's default selection: the connector runs no lookahead pass and reads no attention).
CONNECTOR_BASE = {"matching": "edit", "selection": "deviation"}
# A request-level switch for the fallback path's test: the worker fails this request's load on purpose.
FAIL_LOAD_FOR_TESTING = "fail_load_for_testing"


@dataclass(frozen=True)
class ConnectorOptions:
    """Everything `kv_connector_extra_config` sets, checked."""

    reuse: ReuseConfig = field(default_factory=lambda: ReuseConfig(**CONNECTOR_BASE))
    donor_bytes: int = CONNECTOR_FIELDS["donor_bytes"]
    max_depth: int = CONNECTOR_FIELDS["max_depth"]
    candidates: int = CONNECTOR_FIELDS["candidates"]

    def to_extra_config(self) -> Dict[str, Any]:
        """The JSON-able dict for `kv_connector_extra_config` (every field, so that the engine's log shows them)."""
        out = {name: getattr(self.reuse, name) for name in REUSE_FIELDS}
        out.update(donor_bytes=self.donor_bytes, max_depth=self.max_depth, candidates=self.candidates)
        return out


@dataclass(frozen=True)
class RequestOptions:
    reuse: bool = True
    save: bool = True
    config: ReuseConfig = field(default_factory=lambda: ReuseConfig(**CONNECTOR_BASE))
    fail_load: bool = False


def _where(key: str, where: str) -> str:
    return f"{where}[{key!r}]"


def _reuse_config(values: Mapping[str, Any], base: ReuseConfig, where: str) -> ReuseConfig:
    """`base` with `values` applied, checked by ReuseConfig itself; errors name the key and where it was set."""
    if "matching" in values and values["matching"] not in MATCHING:
        raise ValueError(f"{_where('matching', where)}: the vLLM connector matches with one of "
                         f"{', '.join(map(repr, MATCHING))}, got {values['matching']!r}")
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as err:  # ReuseConfig names the field; say where it came from
        raise type(err)(f"{where}: {err}") from None


def parse_extra_config(extra: Mapping[str, Any] | None) -> ConnectorOptions:
    """`kv_connector_extra_config` -> ConnectorOptions. TypeError or ValueError naming the key on anything unknown,
    mistyped or out of range: a misspelt knob would otherwise be ignored, and the engine would serve with a default
    nobody chose."""
    where = "kv_connector_extra_config"
    extra = dict(extra or {})
    if not all(isinstance(k, str) for k in extra):
        raise ValueError(f"{where}: keys must be strings")
    for key in [k for k in extra if k in OFF_FIELDS or k in MOOT_FIELDS]:
        value = extra.pop(key)
        _reuse_config({key: value}, ReuseConfig(**CONNECTOR_BASE), where)  # its type and range, as ReuseConfig's
        if key in OFF_FIELDS and value != OFF_FIELDS[key][0]:
            raise ValueError(f"{_where(key, where)}: not supported by the vLLM connector ({OFF_FIELDS[key][1]}); "
                             f"leave it unset or {OFF_FIELDS[key][0]!r}, got {value!r}")
    unknown = sorted(set(extra) - set(REUSE_FIELDS) - set(CONNECTOR_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of "
                         f"{sorted(REUSE_FIELDS + tuple(CONNECTOR_FIELDS))}")
    reuse = _reuse_config({k: v for k, v in extra.items() if k in REUSE_FIELDS}, ReuseConfig(**CONNECTOR_BASE),
                          where)
    own = {}
    for key, default in CONNECTOR_FIELDS.items():
        own[key] = check_count(_where(key, where), extra.get(key, default), 1 if key != "max_depth" else 0)
    return ConnectorOptions(reuse=reuse, **own)


def parse_request(params: Mapping[str, Any] | None, options: ConnectorOptions) -> RequestOptions:
    """`kv_transfer_params["semshare"]` of one request -> RequestOptions (TypeError or ValueError naming the key)."""
    where = 'kv_transfer_params["semshare"]'
    if params is None:
        return RequestOptions(config=options.reuse)
    if not isinstance(params, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(params).__name__}")
    params = dict(params)
    flags = {}
    for key in ("reuse", "save", FAIL_LOAD_FOR_TESTING):
        if key in params:
            value = params.pop(key)
            if not isinstance(value, bool):
                raise TypeError(f"{_where(key, where)}: expected a bool, got {type(value).__name__} {value!r}")
            flags[key] = value
    unknown = sorted(set(params) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of "
                         f"{sorted(('reuse', 'save') + REQUEST_FIELDS)}")
    config = _reuse_config(params, options.reuse, where) if params else options.reuse
    return RequestOptions(reuse=flags.get("reuse", True), save=flags.get("save", True), config=config,
                          fail_load=flags.get(FAIL_LOAD_FOR_TESTING, False))


def options_from_kwargs(kwargs: Mapping[str, Any]) -> ConnectorOptions:
    """engine_args' keyword arguments -> ConnectorOptions; the same checks as the extra config, named as arguments."""
    try:
        return parse_extra_config(kwargs)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("kv_connector_extra_config", "engine_args")) from None
