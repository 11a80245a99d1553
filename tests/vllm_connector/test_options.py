"""The connector's settings (semshare_ops.vllm.options): checked in the caller's process, without vLLM, every bad
value a TypeError or ValueError naming the key and where it was set. These run in `make test` too."""
import json

import pytest

import semshare_ops.vllm as ssv
from semshare_ops.vllm.options import ConnectorOptions, parse_extra_config, parse_request


def test_kv_transfer_config_round_trips_through_json():
    config = ssv.kv_transfer_config(recompute_ratio=0.3, donor_bytes=1 << 20, matching="hybrid")
    assert config["kv_connector"] == ssv.CONNECTOR and config["kv_connector_module_path"] == ssv.CONNECTOR_MODULE
    assert config["kv_load_failure_policy"] == "recompute" and config["kv_role"] == "kv_both"
    options = parse_extra_config(json.loads(ssv.serve_flag(recompute_ratio=0.3, donor_bytes=1 << 20,
                                                           matching="hybrid"))["kv_connector_extra_config"])
    assert options.reuse.recompute_ratio == 0.3 and options.reuse.matching == "hybrid"
    assert options.donor_bytes == 1 << 20 and options == parse_extra_config(config["kv_connector_extra_config"])


def test_defaults_match_edit_alignment():
    options = parse_extra_config(None)
    assert options == ConnectorOptions() and options.reuse.matching == "edit"
    # Ranked by deviation whatever the HF engine's default selection: the connector runs no lookahead pass.
    assert options.reuse.selection == "deviation" and parse_request({}, options).config.selection == "deviation"
    assert parse_request(None, options).config.selection == "deviation"


@pytest.mark.parametrize("kwargs, error, name", [
    ({"recompute_ratio": 1.5}, ValueError, "recompute_ratio"),
    ({"recompute_ratio": "0.2"}, TypeError, "recompute_ratio"),
    ({"recompute_ration": 0.2}, ValueError, "recompute_ration"),  # a misspelt knob is refused, not ignored
    ({"matching": "prefix"}, ValueError, "matching"),
    ({"retain_ratio": 0.5}, ValueError, "retain_ratio"),
    ({"decode_recompute": 64}, ValueError, "decode_recompute.*decode steps"),  # HF engine only
    ({"guard_margin": 0.5}, ValueError, "guard_margin.*decode steps"),
    ({"selection": "lookahead"}, ValueError, "selection.*deviation only"),
    # Off or moot here, yet checked as ReuseConfig checks them: a mistyped value is named, not passed over.
    ({"retain_decay": "junk"}, TypeError, "retain_decay"),
    ({"retain_decay": -5}, ValueError, "retain_decay"),
    ({"guard_margin": None}, TypeError, "guard_margin"),
    ({"decode_recompute": 0.0}, TypeError, "decode_recompute"),
    ({"query_window": 0}, ValueError, "query_window"),
    ({"donor_bytes": 0}, ValueError, "donor_bytes"),
    ({"donor_bytes": 1.5}, TypeError, "donor_bytes"),
    ({"max_depth": -1}, ValueError, "max_depth"),
    ({"candidates": True}, TypeError, "candidates"),
])
def test_engine_args_name_the_bad_argument(kwargs, error, name):
    with pytest.raises(error, match=name) as info:
        ssv.kv_transfer_config(**kwargs)
    assert "engine_args" in str(info.value)
    with pytest.raises(error, match="kv_connector_extra_config"):
        parse_extra_config(kwargs)


@pytest.mark.parametrize("params, error, name", [
    ({"reuse": "yes"}, TypeError, "reuse"),
    ({"save": 1}, TypeError, "save"),
    ({"recompute_ratio": -0.1}, ValueError, "recompute_ratio"),
    ({"lsh_bits": 64}, ValueError, "lsh_bits"),  # the worker's LSH planes are fixed per engine
    ({"matching": "lsh"}, ValueError, "matching"),
    ([("reuse", False)], TypeError, "semshare"),
])
def test_request_options_name_the_bad_key(params, error, name):
    with pytest.raises(error, match=name):
        parse_request(params, parse_extra_config(None))


def test_every_reuse_config_field_is_taken_or_named_off():
    """A ReuseConfig field the connector neither honours nor lists as off (or moot) would be refused as unknown:
    each new field needs a decision here. The off ones are accepted at their off value, the moot ones at any valid
    value, and change nothing."""
    import dataclasses

    from semshare_ops.engine.config import ReuseConfig
    from semshare_ops.vllm.options import MOOT_FIELDS, OFF_FIELDS, REUSE_FIELDS

    names = {f.name for f in dataclasses.fields(ReuseConfig)}
    assert names == set(REUSE_FIELDS) | set(OFF_FIELDS) | set(MOOT_FIELDS)
    off = {name: value for name, (value, _) in OFF_FIELDS.items()}
    assert parse_extra_config({**off, "retain_decay": 0.8, "query_window": 32}) == parse_extra_config(None)
    assert ssv.kv_transfer_config(selection="deviation", guard_margin=0.0, decode_recompute=0) == \
        ssv.kv_transfer_config()


def test_request_options_override_per_request_only():
    engine = parse_extra_config({"recompute_ratio": 0.2, "min_similarity": 0.6})
    request = parse_request({"recompute_ratio": 1.0, "save": False}, engine)
    assert request.config.recompute_ratio == 1.0 and request.config.min_similarity == 0.6
    assert request.reuse and not request.save and not request.fail_load
    assert engine.reuse.recompute_ratio == 0.2  # the engine's settings are untouched
    assert parse_request(None, engine).config == engine.reuse
