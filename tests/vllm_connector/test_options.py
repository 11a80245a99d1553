"""The connector's settings (semshare_ops.vllm.options): checked in the caller's process, without vLLM, every bad
value a TypeError or ValueError naming the key and where it was set. These run in `make test` too."""
import dataclasses
import json

import pytest

import semshare_ops.vllm as ssv
from semshare_ops.vllm.options import REQUEST_FIELDS, ConnectorOptions, parse_extra_config, parse_request


def test_kv_transfer_config_round_trips_through_json():
    settings = {"recompute_ratio": 0.3, "donor_bytes": 1 << 20, "matching": "hybrid", "max_depth": 2, "candidates": 7}
    config = ssv.kv_transfer_config(**settings)
    assert config["kv_connector"] == ssv.CONNECTOR and config["kv_connector_module_path"] == ssv.CONNECTOR_MODULE
    assert config["kv_load_failure_policy"] == "recompute" and config["kv_role"] == "kv_both"
    options = parse_extra_config(json.loads(ssv.serve_flag(**settings))["kv_connector_extra_config"])
    assert options.reuse.recompute_ratio == 0.3 and options.reuse.matching == "hybrid"
    assert (options.donor_bytes, options.max_depth, options.candidates) == (1 << 20, 2, 7)
    assert options == parse_extra_config(config["kv_connector_extra_config"])


def test_defaults_match_edit_alignment():
    options = parse_extra_config(None)
    assert options == ConnectorOptions() and options.reuse.matching == "edit"
    assert (options.donor_bytes, options.max_depth, options.candidates) == (1 << 30, 4, 4)  # the documented ones
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
    ({"donor_bytes": 0}, ValueError, r"\['donor_bytes'\]"),
    ({"donor_bytes": 1.5}, TypeError, r"\['donor_bytes'\]"),
    ({"max_depth": -1}, ValueError, r"\['max_depth'\]"),
    ({"candidates": True}, TypeError, r"\['candidates'\]"),
])
def test_engine_args_name_the_bad_argument(kwargs, error, name):
    # Where it was set comes first, then the key: "engine_args['max_depth']: ..." or "engine_args: max_depth ...".
    with pytest.raises(error, match=r"^engine_args(?=[\[:]).*" + name):
        ssv.kv_transfer_config(**kwargs)
    with pytest.raises(error, match=r"^kv_connector_extra_config(?=[\[:]).*" + name):
        parse_extra_config(kwargs)


def test_extra_config_keys_must_be_strings():
    with pytest.raises(ValueError, match="keys must be strings"):
        parse_extra_config({"max_depth": 2, 3: 1})


def test_the_lowest_values_are_accepted():
    """max_depth 0 (keep full prefills only, as the LSH test engine runs) and a single candidate or byte; "edit"
    named explicitly, as the default is."""
    options = parse_extra_config({"donor_bytes": 1, "max_depth": 0, "candidates": 1, "matching": "edit"})
    assert (options.donor_bytes, options.max_depth, options.candidates) == (1, 0, 1)
    assert options.reuse == ConnectorOptions().reuse


@pytest.mark.parametrize("params, error, name", [
    ({"reuse": "yes"}, TypeError, "reuse"),
    ({"save": 1}, TypeError, "save"),
    ({"recompute_ratio": -0.1}, ValueError, "recompute_ratio"),
    ({"lsh_bits": 64}, ValueError, "lsh_bits"),  # the worker's LSH planes are fixed per engine
    ({"matching": "lsh"}, ValueError, "matching"),
    ([("reuse", False)], TypeError, "expected a dict"),
])
def test_request_options_name_the_bad_key(params, error, name):
    with pytest.raises(error, match=r'^kv_transfer_params\["semshare"\](?=[\[:]).*' + name):
        parse_request(params, parse_extra_config(None))


def test_every_reuse_config_field_is_taken_or_named_off():
    """A ReuseConfig field the connector neither honours nor lists as off (or moot) would be refused as unknown:
    each new field needs a decision here. The off ones are accepted at their off value, the moot ones at any valid
    value, and change nothing."""
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
    flags = parse_request({"reuse": False, "fail_load_for_testing": True}, engine)
    assert not flags.reuse and flags.save and flags.fail_load


# A value other than ReuseConfig's default for every field a request may set.
REQUEST_VALUES = {"recompute_ratio": 0.5, "min_similarity": 0.3, "rope_correction": False, "check_layers": 1,
                  "recompute_decay": 0.95, "recompute_tail": 3, "recompute_boundary": 2, "progressive": False,
                  "budget": "fixed", "budget_cap": 2.0, "lsh_max_distance": 10}


def test_every_request_field_is_taken_per_request():
    assert set(REQUEST_VALUES) == set(REQUEST_FIELDS)
    config = parse_request(REQUEST_VALUES, parse_extra_config(None)).config
    assert {name: getattr(config, name) for name in REQUEST_VALUES} == REQUEST_VALUES


def test_options_are_frozen():
    """The engine's options are shared by every request (a request without settings of its own takes them as
    they are): neither they nor a request's may change after parsing."""
    options = parse_extra_config(None)
    for obj, name in ((options, "max_depth"), (parse_request(None, options), "reuse")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 0)
