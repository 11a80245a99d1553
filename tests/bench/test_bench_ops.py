"""semshare_ops.bench (`semshare bench ops`): ceilings, percentages, baselines, --dtype.

Speed is never asserted (the 2 cores are shared): only that every number is there, positive, finite and in a
sane range, which catches unit mistakes (a factor of 1e3) and missing fields.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from semshare_ops import cli, ops
from semshare_ops.bench import ops as bench

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")

# One length and ratio throughout: FlexAttention compiles once per shape (seconds), later calls reuse the kernel.
TOKENS, RATIO = 96, 0.25


@pytest.fixture(scope="module")
def ceilings():
    return bench.device_ceilings("cpu", torch.float32)


@pytest.fixture(scope="module")
def records(ceilings):
    return bench.run_ops("cpu", ["smollm2-135m"], [TOKENS], [RATIO, 1.0], dtype=torch.float32, ceilings=ceilings)


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_ceilings_positive_and_finite(ceilings):
    assert ceilings["device"] == "cpu" and ceilings["dtype"] == "float32"
    assert _finite_positive(ceilings["copy_GB/s"]) and _finite_positive(ceilings["matmul_TFLOP/s"])
    assert ceilings["matmul_TFLOP/s_by_dtype"] == {"float32": ceilings["matmul_TFLOP/s"]}
    json.dumps(ceilings)  # goes into the result JSON as is


def test_low_precision_ceiling_is_the_faster_gemm(monkeypatch):
    rates = {torch.bfloat16: (0.002, 256), torch.float32: (0.2, 2048)}
    monkeypatch.setattr(bench, "gemm_tflops", lambda device, dtype: rates[dtype])
    monkeypatch.setattr(bench, "copy_gbps", lambda device: 10.0)
    c = bench.device_ceilings("cpu", torch.bfloat16)
    assert c["matmul_TFLOP/s"] == 0.2 and c["matmul_TFLOP/s_by_dtype"] == {"bfloat16": 0.002, "float32": 0.2}
    assert c["matmul_n"] == {"bfloat16": 256, "float32": 2048} and c["dtype"] == "bfloat16"
    # On a GPU the low-precision GEMM is the faster: partial_attn's ceiling, but simhash's projection is fp32.
    rates[torch.bfloat16] = (2.0, 4096)
    c = bench.device_ceilings("cpu", torch.bfloat16)
    assert c["matmul_TFLOP/s"] == 2.0 and c["matmul_fp32_TFLOP/s"] == 0.2
    record = bench.bench_simhash(bench.SHAPES["smollm2-135m"], TOKENS, "cpu", ceilings=c)
    assert record["ceiling"] == "matmul_fp32_TFLOP/s"
    assert record["pct_of_ceiling"] == pytest.approx(100 * record["TFLOP/s"] / 0.2, rel=1e-2)


def test_records_keep_their_keys_and_carry_percentages(records, ceilings):
    assert [r["op"] for r in records] == ["simhash", "hamming_topk", "rope_reuse_", "partial_attn", "partial_attn"]
    units = {"simhash": "GB/s", "hamming_topk": "Gpairs/s", "rope_reuse_": "GB/s", "partial_attn": "TFLOP/s"}
    for r in records:
        assert {"op", "model", "tokens", "device", "us", "baselines_us", "speedup", units[r["op"]]} <= r.keys()
        assert r["ceiling"] in ("copy_GB/s", "matmul_TFLOP/s", "matmul_fp32_TFLOP/s")
        assert _finite_positive(r["pct_of_ceiling"]) and r["pct_of_ceiling"] <= 1000, r
        if "dtype" in r:
            assert r["dtype"] == "float32"
    by_op = {r["op"]: r for r in records}
    assert by_op["simhash"]["ceiling"] == "matmul_fp32_TFLOP/s" and by_op["partial_attn"]["ceiling"] == "matmul_TFLOP/s"
    assert by_op["rope_reuse_"]["ceiling"] == "copy_GB/s" and by_op["hamming_topk"]["ceiling"] == "copy_GB/s"
    # Each rate from its own count of the work and the recorded time (a unit slip of 1e3 fails here, where the sane
    # ranges above let it through), and each percentage from that rate.
    shape = bench.SHAPES["smollm2-135m"]
    approx = lambda x: pytest.approx(x, rel=1e-2)  # noqa: E731  (rates kept to 4 significant digits, times to 0.1 us)
    simhash, hamming, rope = by_op["simhash"], by_op["hamming_topk"], by_op["rope_reuse_"]
    work = bench.simhash_work(*bench.simhash_inputs(shape, TOKENS, torch.float32))
    assert simhash["GB/s"] == approx(work["bytes"] / simhash["us"] / 1e3)
    assert simhash["TFLOP/s"] == approx(work["flops"] / simhash["us"] / 1e6)
    assert simhash["pct_of_ceiling"] == approx(100 * simhash["TFLOP/s"] / ceilings["matmul_fp32_TFLOP/s"])
    work = bench.hamming_topk_work(*bench.hamming_topk_inputs(shape, TOKENS))
    assert hamming["Gpairs/s"] == approx(work["pairs"] / hamming["us"] / 1e3)
    assert hamming["GB/s"] == approx(work["bytes"] / hamming["us"] / 1e3)
    assert hamming["pct_of_ceiling"] == approx(100 * hamming["GB/s"] / ceilings["copy_GB/s"])
    work = bench.rope_reuse_work(*bench.rope_reuse_inputs(shape, TOKENS, dtype=torch.float32))
    assert rope["GB/s"] == approx(work["bytes"] / rope["us"] / 1e3)
    assert rope["pct_of_ceiling"] == approx(100 * rope["GB/s"] / ceilings["copy_GB/s"])
    for r in (r for r in records if r["op"] == "partial_attn"):
        work = bench.partial_attn_work(*bench.partial_attn_inputs(shape, TOKENS, r["ratio"], torch.float32))
        assert r["TFLOP/s"] == approx(work["flops"] / r["us"] / 1e6)
        assert r["pct_of_ceiling"] == approx(100 * r["TFLOP/s"] / ceilings["matmul_TFLOP/s"])
    for r in records:
        if r["op"] == "partial_attn":
            assert _finite_positive(r["sdpa_causal_TFLOP/s"])
            assert _finite_positive(r["pct_of_sdpa_causal"]) and r["pct_of_sdpa_causal"] < 1e4
    table = bench.format_table(records)
    assert len(table.splitlines()) == len(records) + 1 and "%" in table


def test_flex_attention_baseline_is_present_or_explicitly_absent(records):
    for r in (r for r in records if r["op"] == "partial_attn"):
        assert {"reference", "sdpa_masked"} <= r["baselines_us"].keys()
        present = "flex_attention" in r["baselines_us"]
        absent = r["baselines_absent"].get("flex_attention")
        assert present != bool(absent), r
        if present:
            assert r["speedup"]["flex_attention"] > 0
        else:
            assert isinstance(absent, str) and absent


def test_flex_attention_computes_what_partial_attn_computes():
    q, k, v, q_pos = bench.partial_attn_inputs(bench.SHAPES["smollm2-135m"], TOKENS, RATIO, torch.float32)
    fn, why = bench.flex_attention_fn(q, k, v, q_pos)
    if fn is None:
        assert why
        pytest.skip(f"FlexAttention absent: {why}")
    out = fn()[0].transpose(0, 1)
    torch.testing.assert_close(out, ops.partial_attn(q, k, v, q_pos)[0], atol=1e-4, rtol=1e-4)


def test_a_failing_flex_attention_is_recorded_absent_and_said_once(monkeypatch, capsys, ceilings):
    def broken(*args, **kwargs):
        raise RuntimeError("no fused kernel here\nsecond line")

    monkeypatch.setattr(bench, "_flex_compiled", broken)
    monkeypatch.setattr(bench, "_flex_absent", {})
    monkeypatch.setattr(bench, "_flex_said", set())
    shape = bench.SHAPES["smollm2-135m"]
    first, second = (bench.bench_partial_attn(shape, 48, "cpu", ratio=0.5, dtype=torch.float32, ceilings=ceilings,
                                              sdpa_causal_rate=1.0) for _ in range(2))
    for r in (first, second):
        assert "flex_attention" not in r["baselines_us"] and "flex_attention" not in r["speedup"]
        assert r["baselines_absent"]["flex_attention"] == "RuntimeError: no fused kernel here"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FlexAttention" in err[0] and "no fused kernel here" in err[0]


def test_baselines_too_big_or_out_of_memory_are_recorded_absent(monkeypatch, ceilings):
    """The reference is skipped past its score budget; a baseline that runs out of memory is absent, not fatal."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB\nmore")

    monkeypatch.setattr(bench, "REFERENCE_MAX_SCORES_GIB", 0.0)
    monkeypatch.setattr(bench, "_sdpa_masked", oom)
    r = bench.bench_partial_attn(bench.SHAPES["smollm2-135m"], 48, "cpu", ratio=0.5, dtype=torch.float32,
                                 ceilings=ceilings, sdpa_causal_rate=1.0, flex=False)
    assert r["baselines_absent"]["reference"].startswith("skipped: its fp32 scores would take")
    assert r["baselines_absent"]["sdpa_masked"] == "out of memory (CUDA out of memory. Tried to allocate 34.00 GiB)"
    assert not r["baselines_us"] and not r["speedup"]
    assert r["us"] > 0 and r["TFLOP/s"] > 0


def test_masked_sdpa_baseline_computes_partial_attn_and_builds_its_mask_once(monkeypatch):
    """The SDPA baseline is what partial_attn computes (GQA, a window), and its mask is built when the call is made,
    not inside the timed call (a serving engine builds it once per batch)."""
    built = []
    visible_mask = bench.ref.visible_mask
    monkeypatch.setattr(bench.ref, "visible_mask", lambda *a, **k: built.append(1) or visible_mask(*a, **k))
    q, k, v, q_pos = bench.partial_attn_inputs(bench.SHAPES["smollm2-135m"], 40, 0.5, torch.float64)
    for window in (-1, 7):
        call = bench._sdpa_masked(q, k, v, q_pos, window)
        outs = [call() for _ in range(3)]
        expected = bench.ref.partial_attn(q, k, v, q_pos, window=window)[0]
        for out in outs:
            torch.testing.assert_close(out.transpose(0, 1), expected, rtol=1e-5, atol=1e-5)  # the oracle: fp32
    assert len(built) == 2 + 2  # one per call made, one per reference run; none per timed call


def test_inputs_and_work_counts_match_the_records():
    shape = bench.SHAPES["llama3-8b"]
    q, k, v, q_pos = bench.partial_attn_inputs(shape, 64, 1.0, torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.shape == (64, 32, 128) and k.shape == (64, 8, 128)
    assert bench.partial_attn_work(q, k, v, q_pos)["flops"] == bench.causal_attn_flops(shape, 64)
    args = bench.rope_reuse_inputs(shape, 10, reuse=0.5, dtype=torch.float16)
    assert bench.rope_reuse_work(*args)["bytes"] == 2 * 2 * 32 * 5 * 8 * 128 * 2
    x, planes = bench.simhash_inputs(shape, 7, torch.float32)
    assert bench.simhash_work(x, planes)["flops"] == 2 * 7 * 4096 * 128


# ---- the CLI and the script ---------------------------------------------------------------------------------------

def _one_error_line(capsys, must_contain):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and must_contain in err[0], err


def test_bench_ops_dtype_flag(capsys, tmp_path):
    out = tmp_path / "ops.json"
    assert cli.main(["bench", "ops", "--json", "--lengths", str(TOKENS), "--ratios", str(RATIO), "--dtype", "float32",
                     "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "float32" and result["ceilings"]["dtype"] == "float32"
    assert {r["dtype"] for r in result["records"] if "dtype" in r} == {"float32"}
    assert json.loads(out.read_text())["ceilings"] == result["ceilings"]


def test_bench_ops_dtype_defaults_to_bfloat16(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench, "device_ceilings", lambda device, dtype: seen.setdefault("ceilings", dtype) and {})
    monkeypatch.setattr(bench, "run_ops", lambda *a, dtype, **k: seen.setdefault("run", dtype) and [])
    assert cli.main(["bench", "ops", "--json", "--lengths", "64"]) == 0
    assert seen == {"ceilings": torch.bfloat16, "run": torch.bfloat16}
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"


@pytest.mark.parametrize("argv, name", [(["--dtype", "int8"], "--dtype"), (["--ratios", "0"], "--ratios"),
                                        (["--ratios", "1.5"], "--ratios"), (["--lengths", "1"], "--lengths"),
                                        (["--models", "gpt-9"], "--models")])
def test_bench_ops_bad_arguments_exit_2(capsys, monkeypatch, argv, name):
    monkeypatch.setattr(bench, "run_ops", lambda *a, **k: pytest.fail("must not run"))
    monkeypatch.setattr(bench, "device_ceilings", lambda *a, **k: pytest.fail("must not measure"))
    try:
        code = cli.main(["bench", "ops"] + argv)
    except SystemExit as e:  # argparse's own errors (choices) exit from the parser
        code = e.code
    assert code == 2
    _one_error_line(capsys, name)


def test_bench_ops_passes_the_ceilings_it_writes(monkeypatch, tmp_path, capsys):
    """Ceilings are measured once, handed to every record's percentage and written beside the records."""
    fake = {"device": "cpu", "dtype": "float32", "copy_GB/s": 10.0, "matmul_TFLOP/s": 0.1,
            "matmul_TFLOP/s_by_dtype": {"float32": 0.1}, "matmul_n": {"float32": 2048}}
    seen = {}
    monkeypatch.setattr(bench, "device_ceilings", lambda device, dtype: seen.setdefault("dtype", dtype) and fake)
    monkeypatch.setattr(bench, "run_ops", lambda *a, ceilings, **k: seen.setdefault("ceilings", ceilings) and [])
    out = tmp_path / "ops.json"
    assert cli.main(["bench", "ops", "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["ceilings"] == fake and written["dtype"] == "float32" and written["records"] == []
    assert written["device"] == "cpu" and written["command"]
    assert seen == {"dtype": torch.float32, "ceilings": fake}


def test_provenance_records_a_command_that_reruns(monkeypatch):
    """Under `python -m semshare_ops.cli`, argv[0] is the path of its __main__.py, which does not run as a script
    (relative imports): the record names the module instead."""
    import importlib.machinery
    import sys
    import types

    from semshare_ops.bench.provenance import environment

    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("semshare_ops.cli.__main__", None)
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/site/semshare_ops/cli/__main__.py", "bench", "ops", "--out", "a b.json"])
    assert environment("cpu")["command"] == "python -m semshare_ops.cli bench ops --out 'a b.json'"
    # The console script, a script and an explicit command are recorded as before.
    main.__spec__ = None
    monkeypatch.setattr(sys, "argv", ["/venv/bin/semshare", "bench", "e2e"])
    assert environment("cpu")["command"] == "semshare bench e2e"
    monkeypatch.setattr(sys, "argv", ["tools/run.py", "--x"])
    assert environment("cpu")["command"] == "python tools/run.py --x"
    main.__spec__ = importlib.machinery.ModuleSpec("semshare_ops.cli.__main__", None)
    assert environment("cpu", command=["bench.py", "ops"])["command"] == "python bench.py ops"


# ---- benchmarks/plot_results.py------------------------------------------------------------------------------------

def _plot_script():
    spec = importlib.util.spec_from_file_location("plot_results_script", ROOT / "benchmarks" / "plot_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _e2e_record(method, tokens, share, ratio, speedup):
    return {"method": method, "prompt_tokens": tokens, "edited_share": share, "recompute_ratio": ratio,
            "mean_ttft_ms": 100.0 / speedup, "speedup_vs_full": speedup,
            "reuse_ratio": 0.0 if ratio is None else 1 - ratio}


def test_plot_results_length_groups():
    groups = _plot_script().length_groups([1023, 1065, 1022, 2051, 2012, 4113, 4083])
    assert groups[1022] == groups[1023] == groups[1065] and groups[2012] == groups[2051] != groups[1023]
    assert len(set(groups.values())) == 3


def test_plot_results_missing_folder_exits_2(tmp_path, capsys):
    assert _plot_script().main(["--results", str(tmp_path / "missing")]) == 2
    _one_error_line(capsys, "--results")


@pytest.mark.parametrize("sweep", [True, False], ids=["ratio-sweep", "one-ratio"])
def test_plot_results_writes_pngs(tmp_path, capsys, sweep):
    pytest.importorskip("matplotlib")
    ratios = [0.1, 0.3] if sweep else [0.2]
    records = []
    for tokens in (256, 1030):
        for share in (0.02, 0.1):
            records += [_e2e_record("full", tokens, share, None, 1.0), _e2e_record("prefix", tokens, share, 0.0, 1.1)]
            records += [_e2e_record("semshare", tokens, share, r, 3.0 - r) for r in ratios]
    (tmp_path / "e2e_test.json").write_text(json.dumps({"model": "tiny", "device": "cpu", "records": records}))
    point = lambda r, rouge: {"recompute_ratio": r, "rougeL": rouge, "rougeL_noise_floor": 0.5, "pairs": 3}  # noqa
    (tmp_path / "eval_test.json").write_text(json.dumps({
        "model": "tiny", "sweep": [point(0.35, 0.9), point(0.1, 0.7)],
        "sets": {"near_duplicate": [point(0.1, 0.6), point(0.35, 0.8)], "controlled_edit": [point(0.1, 0.8)]}}))
    (tmp_path / "ops_test.json").write_text("{}")  # not a kind it plots: left alone
    assert _plot_script().main(["--results", str(tmp_path)]) == 0
    for name in ("e2e_test_speedup.png", "eval_test_quality.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["e2e_test_speedup.png", "eval_test_quality.png"]
    assert capsys.readouterr().out.count("wrote") == 2


# ---- benchmarks/ablate_selection.py: the ablation table's paired differences --------------------------------------

def _ablation_script():
    spec = importlib.util.spec_from_file_location("ablate_selection_script",
                                                  ROOT / "benchmarks" / "ablate_selection.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_ablation_summary_pairs_each_pair_against_itself():
    def variant(rouge, kl):
        return {"rougeL": rouge, "kl": kl, "agree": 0.9, "reuse_ratio": 0.8, "score_ms": 1.0, "ttft_ms": 10.0,
                "generate_ms": 20.0, "first_token": True, "first8": rouge == 1.0, "decode_recomputed_tokens": 0}

    # Pair by pair, "b" is "a" + 0.1 and the floor is "a" + 0.2: the paired differences have no spread at all, while
    # the values themselves spread widely (an unpaired standard error would be about 0.2).
    a = [0.2, 0.9, 0.5, 0.6]
    records = [{"set": "s", "kl_floor": 0.001, "agree_floor": 1.0, "rougeL_floor": x + 0.2, "ttft_ms_full": 50.0,
                "variants": {"a @ 0.2": variant(x, 0.01), "b @ 0.2": variant(x + 0.1, 0.02),
                             "a @ 0.3": variant(1.0, 0.03)}} for x in a]
    script = _ablation_script()
    summary = script.summarize(records, ["s"], rouge=True)
    b = summary["b @ 0.2"]["s"]
    assert b["rougeL"] == pytest.approx(0.65) and b["rougeL_se"] == pytest.approx(0.1443, abs=1e-4)
    assert b["rougeL_minus_first"] == pytest.approx(0.1) and b["rougeL_minus_first_se"] == pytest.approx(0, abs=1e-12)
    assert b["rougeL_minus_floor"] == pytest.approx(-0.1) and b["rougeL_minus_floor_se"] == pytest.approx(0, abs=1e-12)
    # The first variant of each ratio is that ratio's reference, not the run's first variant.
    assert summary["a @ 0.3"]["s"]["rougeL_minus_first"] == 0.0
    assert summary["a @ 0.2"]["s"]["first8"] == 0.0 and summary["a @ 0.3"]["s"]["first8"] == 1.0
    table = script.markdown_table(summary)
    assert "| s | b | 0.2 | 0.800 | 0.650 ± 0.144 | -0.100 ± 0.000 | +0.100 ± 0.000 |" in table
    assert "| s | floor (one leading space) | | | 0.750 ± 0.144 |" in table


def test_ablation_summarize_refuses_a_run_without_rouge(tmp_path, monkeypatch, capsys):
    recorded = tmp_path / "run.json"
    recorded.write_text(json.dumps({"records": [{"set": "s", "kl_floor": 0.001, "variants": {}}]}))
    monkeypatch.setattr("sys.argv", ["ablate_selection.py", "--summarize", str(recorded)])
    with pytest.raises(SystemExit) as exit_:
        _ablation_script().main()
    assert exit_.value.code == 2
    assert "--summarize" in capsys.readouterr().err


# ---- benchmarks/selection_bound.py and suite_*.py: they still run against the library ------------------------------

def test_selection_bound_oracle_runs_on_the_engine_it_subclasses(monkeypatch):
    """The oracle overrides ReuseEngine._recompute: a change of that method's arguments broke the script unnoticed
    (TypeError at its first request). On a tiny model: the oracle serves, at the default's counts, with rows that
    leave less staleness than the default's ranking in the layers it reads."""
    from engine_testutils import FakeTokenizer, build_model, rand_tokens

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports ablate_selection from its own folder
    spec = importlib.util.spec_from_file_location("selection_bound_script", ROOT / "benchmarks" / "selection_bound.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Ratio 0.5: the tiny model's 4 layers leave its deep layers rows to choose past the mandatory ones.
    engine = script.OracleEngine(build_model("llama", seed=0), FakeTokenizer(), script.ReuseConfig(recompute_ratio=0.5))
    reference = rand_tokens(200, seed=3)
    target = reference[:40] + rand_tokens(6, seed=4) + reference[40:120] + rand_tokens(5, seed=5) + reference[120:]
    entry = engine.prefill(reference)
    truth = engine.prefill(target)
    engine.truth = (truth.keys.cpu(), truth.values.cpu())
    runs = {}
    for oracle in (None, "deep"):
        engine.oracle = oracle
        runs[oracle] = engine.generate(target, reference=entry, max_new_tokens=2, return_entry=True)
    assert runs["deep"].stats["recomputed_tokens"] == runs[None].stats["recomputed_tokens"]
    deep = slice(2, engine.num_layers)  # past the check layers: what the oracle reads

    def staleness(out):
        return float((out.entry.keys[deep] - truth.keys[deep]).norm() + (out.entry.values[deep] -
                                                                         truth.values[deep]).norm())

    assert staleness(runs["deep"]) < staleness(runs[None])


def test_benchmark_suites_use_only_what_the_library_has():
    """benchmarks/suite_*.py run under pytest-benchmark (`make bench-suite`), which `make test` does not install: a
    name they take from the library that no longer exists fails only there (bench.DTYPES did). Every
    `<module>.<name>` they read from the library modules they import must exist."""
    import ast
    import importlib
    import re

    for path in sorted((ROOT / "benchmarks").glob("suite_*.py")):
        source = path.read_text()
        aliases = {}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("semshare_ops"):
                for alias in node.names:
                    module = f"{node.module}.{alias.name}"
                    try:
                        aliases[alias.asname or alias.name] = importlib.import_module(module)
                    except ImportError:  # a name, not a module: it must exist in the module it comes from
                        assert hasattr(importlib.import_module(node.module), alias.name), f"{path.name}: {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("semshare_ops"):
                        importlib.import_module(alias.name)
        assert aliases, path.name
        for name, module in aliases.items():
            for attribute in set(re.findall(rf"(?<![\w.]){name}\.(\w+)", source)):
                assert hasattr(module, attribute), f"{path.name}: {name}.{attribute} ({module.__name__})"


# ---- benchmarks/similarity_gate.py: the gate replay's arithmetic ---------------------------------------------------

def _gate_script(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # it imports ablate_selection from its own folder
    spec = importlib.util.spec_from_file_location("similarity_gate_script", ROOT / "benchmarks" / "similarity_gate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_similarity_gate_serves_requests_under_the_gate_by_full_prefill(monkeypatch):
    def record(similarity, rouge, mode="reuse"):
        return {"id": f"r{similarity}", "rougeL_floor": 0.9, "ttft_ms_full": 1000.0,
                "variants": {"v @ 0.2": {"similarity": similarity, "rougeL": rouge, "kl": 0.01, "reuse_ratio": 0.8,
                                         "ttft_ms": 200.0, "mode": mode}}}

    # similarities 0.6 / 0.85 / 0.95 / 0.99 with ROUGE-L 0.2 / 0.4 / 0.6 / 0.3; the last took a full prefill in the
    # run (its recorded reuse-ratio, ROUGE-L and TTFT are not what it was served: the replay must not read them).
    records = [record(0.6, 0.2), record(0.85, 0.4), record(0.95, 0.6), record(0.99, 0.3, mode="fallback")]
    rows = {row["gate"]: row for row in _gate_script(monkeypatch).replay(records, "v @ 0.2", [0.9])}
    none, gate = rows[0.0], rows[0.9]
    # No gate: only the run's own fallback is a full prefill (ROUGE-L 1.0, KL 0, reuse 0, the full prefill's TTFT).
    assert none["fallback_share"] == 0.25 and none["rougeL"] == pytest.approx((0.2 + 0.4 + 0.6 + 1.0) / 4)
    assert none["reuse_ratio"] == pytest.approx(0.6) and none["ttft_ms"] == pytest.approx(400.0)
    # Gate 0.9: the two under it go to full prefill too.
    assert gate["fallback_share"] == 0.75 and gate["rougeL"] == pytest.approx((1.0 + 1.0 + 0.6 + 1.0) / 4)
    assert gate["kl"] == pytest.approx(0.0025) and gate["reuse_ratio"] == pytest.approx(0.2)
    assert gate["ttft_ms"] == pytest.approx(800.0)
    # Against the floor (0.9 for every request), pair by pair: +0.1, +0.1, -0.3, +0.1.
    assert gate["rougeL_minus_floor"] == pytest.approx((0.1 + 0.1 - 0.3 + 0.1) / 4)
    assert gate["rougeL_minus_floor_se"] > 0
    # At random: the same share sent to full prefill (the run's own fallback, the rest drawn from those it served by
    # reuse), the others at the mean ROUGE-L of those it served by reuse (0.4).
    assert gate["rougeL_same_share_at_random"] == pytest.approx(0.75 + 0.25 * 0.4)
    assert none["rougeL_same_share_at_random"] == pytest.approx(none["rougeL"])


def test_similarity_gate_refuses_a_run_without_similarity(monkeypatch):
    record = {"id": "old", "rougeL_floor": 0.9, "ttft_ms_full": 1.0,
              "variants": {"v @ 0.2": {"similarity": None, "rougeL": 0.5, "kl": 0.0, "reuse_ratio": 0.8,
                                       "ttft_ms": 1.0, "mode": "full"}}}
    with pytest.raises(SystemExit, match="old: no similarity"):
        _gate_script(monkeypatch).replay([record], "v @ 0.2", [0.5])


# ---- benchmarks/vllm_e2e.py: where a request's CPU time went, by process ------------------------------------------

def test_vllm_benchmark_counts_each_child_process_cpu_seconds_under_its_name(monkeypatch):
    """vLLM's engine core and worker are the benchmark's child processes: `cpu_seconds` must count a child's CPU time
    under the child's name (a child that burns 0.3 CPU s between two readings shows about that), and the caller's
    own apart from it. Runs without vLLM (psutil comes with accelerate)."""
    import os
    import subprocess
    import sys

    import psutil

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the script sets vLLM's variables when it is imported
    spec = importlib.util.spec_from_file_location("vllm_e2e_script", ROOT / "benchmarks" / "vllm_e2e.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    burn = ("import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\nsys.stdin.readline()\n")
    with subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as child:
        try:
            name = psutil.Process(child.pid).name()
            before = script.cpu_seconds()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            after = script.cpu_seconds()
        finally:
            child.kill()
    assert set(after) >= {"caller", name}, after
    assert 0.25 <= after[name] - before.get(name, 0.0) < 1.5, (before, after)
    assert 0.0 <= after["caller"] - before["caller"] < 0.25, (before, after)  # the caller waited on a pipe
