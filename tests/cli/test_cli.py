"""The `semshare` CLI (docs/contract.md section 5): --json output, exit code 2 and one stderr line on bad input."""
import json

import pytest

from semshare_ops import cli
from semshare_ops.engine.prompts import DEMO_REFERENCE, DEMO_TARGET
from semshare_ops.engine import models


def _one_error_line(capsys, must_contain):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and must_contain in err[0], err


def test_unknown_command_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2
    _one_error_line(capsys, "frobnicate")


def test_missing_reference_file_exits_2(capsys, tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("some text")
    assert cli.main(["run", "--reference", str(tmp_path / "missing.txt"), "--target", str(target)]) == 2
    _one_error_line(capsys, "--reference")


def test_empty_target_file_exits_2(capsys, tmp_path):
    reference, target = tmp_path / "r.txt", tmp_path / "t.txt"
    reference.write_text("a reference")
    target.write_text("   \n")
    assert cli.main(["run", "--reference", str(reference), "--target", str(target)]) == 2
    _one_error_line(capsys, "--target")


def test_bad_max_new_tokens_exits_2(capsys):
    assert cli.main(["demo", "--max-new-tokens", "0"]) == 2
    _one_error_line(capsys, "--max-new-tokens")


def test_bad_recompute_ratio_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(["demo", "--recompute-ratio", "1.5"]) in (2,)
    _one_error_line(capsys, "recompute")


def test_bench_ops_json(capsys):
    assert cli.main(["bench", "ops", "--json", "--lengths", "128", "--ratios", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    ops = {r["op"] for r in result["records"]}
    assert ops == {"simhash", "hamming_topk", "rope_reuse_", "partial_attn"}
    for record in result["records"]:
        assert record["us"] > 0 and record["speedup"]["reference"] > 0


@pytest.mark.slow
def test_run_json_on_the_embedded_model(capsys, monkeypatch, tmp_path, smollm2):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    reference, target = tmp_path / "r.txt", tmp_path / "t.txt"
    reference.write_text(DEMO_REFERENCE)
    target.write_text(DEMO_TARGET)
    assert cli.main(["run", "--reference", str(reference), "--target", str(target), "--json",
                     "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"full", "reuse", "speedup"}
    for side in ("full", "reuse"):
        assert set(result[side]) == {"text", "token_ids", "stats"}
        assert result[side]["text"].strip()  # a user turn of the chat template: the model answers
    assert result["full"]["stats"]["mode"] == "full" and result["reuse"]["stats"]["mode"] == "reuse"
    assert result["speedup"] > 0
    # --no-chat-template: the files' text as given, the same tokens as the tokenizer makes of it.
    assert cli.main(["run", "--reference", str(reference), "--target", str(target), "--json",
                     "--max-new-tokens", "6", "--no-chat-template"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["full"]["stats"]["prompt_tokens"] == len(smollm2[1](DEMO_TARGET)["input_ids"])
    assert result["full"]["stats"]["prompt_tokens"] > raw["full"]["stats"]["prompt_tokens"]


def test_eval_missing_pairs_file_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(["eval", "--pairs", str(tmp_path / "missing.jsonl")]) == 2
    _one_error_line(capsys, "--pairs")


def test_eval_bad_pairs_line_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"reference": "a b c", "target": "a b d"}\n{"reference": "only"}\n')
    assert cli.main(["eval", "--pairs", str(pairs)]) == 2
    _one_error_line(capsys, "line 2")


def test_eval_bad_ratio_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(["eval", "--recompute-ratio", "0.2", "2.0"]) == 2
    _one_error_line(capsys, "recompute")


@pytest.mark.parametrize("argv, name", [(["--lengths", "8"], "--lengths"), (["--edit-levels", "1.5"], "--edit-levels"),
                                        (["--repeat", "0"], "--repeat"), (["--shape", "gpt-9"], "--shape"),
                                        (["--recompute-ratio", "0.2", "1.5"], "--recompute-ratio")])
def test_bench_e2e_bad_arguments_exit_2(capsys, monkeypatch, argv, name):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(["bench", "e2e"] + argv) == 2
    _one_error_line(capsys, name)


@pytest.mark.slow
def test_eval_json_on_the_embedded_model(capsys, monkeypatch, tmp_path, smollm2):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"reference": DEMO_REFERENCE, "target": DEMO_TARGET}) + "\n")
    out_file = tmp_path / "eval.json"
    assert cli.main(["eval", "--pairs", str(pairs), "--json", "--max-new-tokens", "4", "--out", str(out_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("pairs", "rougeL", "rougeL_noise_floor", "first_token_agreement", "reuse_ratio",
                "mean_ttft_ms_full", "mean_ttft_ms_reuse"):
        assert key in result
    assert result["pairs"] == 1 and 0.5 < result["reuse_ratio"] < 1.0
    assert json.loads(out_file.read_text())["rougeL"] == result["rougeL"]


@pytest.mark.slow
def test_bench_e2e_json_on_the_embedded_model(capsys, monkeypatch, smollm2):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    assert cli.main(["bench", "e2e", "--json", "--lengths", "96", "--edit-levels", "0.1", "--repeat", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in result["records"]} == {"full", "hf", "prefix", "cacheblend", "semshare", "decode"}
    for r in result["records"]:
        assert {"mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "kv_bytes"} <= r.keys()
    assert result["device"] == "cpu" and "torch" in result and "command" in result


# ---- bad input found after parsing: one line on stderr, exit code 2, before any work -----------------------------


def test_non_utf8_reference_exits_2(capsys, tmp_path):
    reference, target = tmp_path / "r.txt", tmp_path / "t.txt"
    reference.write_bytes(b"caf\xe9 au lait")
    target.write_text("some text")
    assert cli.main(["run", "--reference", str(reference), "--target", str(target)]) == 2
    _one_error_line(capsys, "not UTF-8")


def test_model_directory_without_a_model_exits_2(capsys, tmp_path):
    reference = tmp_path / "r.txt"
    reference.write_text("some text")
    (tmp_path / "empty").mkdir()
    assert cli.main(["run", "--reference", str(reference), "--target", str(reference), "--model",
                     str(tmp_path / "empty")]) == 2
    _one_error_line(capsys, "--model")


@pytest.mark.parametrize("device", ["foo", "tpu"])
def test_bench_ops_bad_device_exits_2(capsys, device):
    assert cli.main(["bench", "ops", "--device", device]) == 2
    _one_error_line(capsys, "--device")


def test_eval_out_directory_exits_2_before_evaluating(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before --out was checked"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"reference": "a b c", "target": "a b d"}) + "\n")
    assert cli.main(["eval", "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    _one_error_line(capsys, "--out")


@pytest.mark.parametrize("case", ["long_pair", "many_new_tokens"])
def test_eval_requests_that_do_not_fit_exit_2_before_serving(capsys, monkeypatch, tmp_path, smollm2, case):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    from semshare_ops.eval import evaluate

    monkeypatch.setattr(evaluate, "evaluate_pair", lambda *a, **k: pytest.fail("a pair was served"))
    long_text = DEMO_REFERENCE * (40 if case == "long_pair" else 1)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"reference": DEMO_REFERENCE, "target": DEMO_TARGET}) + "\n"
                     + json.dumps({"reference": long_text, "target": DEMO_TARGET}) + "\n")
    new = "100000" if case == "many_new_tokens" else "8"
    assert cli.main(["eval", "--pairs", str(pairs), "--max-new-tokens", new, "--no-baselines"]) == 2
    _one_error_line(capsys, "--pairs" if case == "long_pair" else "--max-new-tokens")
