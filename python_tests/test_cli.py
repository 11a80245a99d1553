"""The `semshare` CLI (SPEC.md section 5): --json output, exit code 2 and one stderr line on bad input."""
import json

import pytest

from semshare_ops import cli, models


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
    reference.write_text(cli.DEMO_REFERENCE)
    target.write_text(cli.DEMO_TARGET)
    assert cli.main(["run", "--reference", str(reference), "--target", str(target), "--json",
                     "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"full", "reuse", "speedup"}
    for side in ("full", "reuse"):
        assert set(result[side]) == {"text", "token_ids", "stats"}
        assert len(result[side]["token_ids"]) >= 1
    assert result["full"]["stats"]["mode"] == "full" and result["reuse"]["stats"]["mode"] == "reuse"
    assert result["speedup"] > 0
