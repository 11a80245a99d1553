"""semshare_ops.bench.e2e (`semshare bench e2e`): the edited targets, the methods' configs and one tiny run.

Speed itself is never asserted here (a timed test claims nothing); these check that every method runs the way
its name says and that the records carry the `vllm bench serve` keys.
"""
import pytest
import torch

pytest.importorskip("transformers")

from semshare_ops.bench import e2e  # noqa: E402
from semshare_ops.bench.timing import percentile  # noqa: E402
from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402

from engine_testutils import FakeTokenizer, build_model, rand_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("share", [0.02, 0.1, 0.3])
def test_edit_tokens_touches_about_the_share(share):
    import difflib

    ids = rand_tokens(1000, seed=1)
    out = e2e.edit_tokens(ids, share, seed=3)
    assert out != ids
    assert e2e.edit_tokens(ids, share, seed=3) == out  # deterministic
    kept = sum(b.size for b in difflib.SequenceMatcher(None, ids, out, autojunk=False).get_matching_blocks())
    assert 1 - share * 1.3 - 0.01 <= kept / len(ids) <= 1 - share * 0.4


class BosTokenizer(FakeTokenizer):
    """A tokenizer that adds a BOS to every text it tokenizes (Llama 3, Gemma, Mistral do)."""

    bos_token_id = 10**6  # no text character maps to it

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.mark.parametrize("with_sharegpt", [True, False])
def test_text_prompt_has_one_bos_at_the_start(monkeypatch, with_sharegpt):
    from semshare_ops.eval import sharegpt

    answers = [{"conversations": [{"from": "gpt", "value": f"answer {i} " + "x" * 2100}]} for i in range(3)]
    if with_sharegpt:
        monkeypatch.setattr(sharegpt, "iter_sharegpt", lambda: iter(answers))
    else:  # the demo text, repeated, when ShareGPT is not installed
        monkeypatch.setattr(sharegpt, "iter_sharegpt", lambda: (_ for _ in ()).throw(ImportError("no sharegpt")))
    tok = BosTokenizer()
    ids = e2e.text_prompt(tok, 5000)
    assert len(ids) == 5000
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    plain = e2e.text_prompt(FakeTokenizer(), 5000)  # a tokenizer adding none: the same text, no BOS
    assert plain == ids[1:] + plain[4999:]


def test_method_configs():
    configs = e2e.method_configs(ReuseConfig(recompute_ratio=0.3), num_layers=30)
    assert configs["full"] is None and configs["hf"] is None
    assert configs["prefix"].matching == "prefix" and configs["prefix"].recompute_ratio == 0.0
    assert configs["cacheblend"].matching == "chunk" and configs["cacheblend"].budget == "fixed"
    assert configs["semshare"].recompute_ratio == 0.3 and configs["semshare"].matching == "hybrid"
    assert e2e.method_configs(ReuseConfig(), 1)["cacheblend"].recompute_ratio == 1.0  # the one layer is layer 0
    with pytest.raises(ValueError, match="num_layers"):
        e2e.method_configs(ReuseConfig(), 0)
    with pytest.raises(TypeError, match="num_layers"):
        e2e.method_configs(ReuseConfig(), 8.0)


@pytest.mark.parametrize("base", [ReuseConfig(), ReuseConfig(selection="lookahead"), ReuseConfig(recompute_tail=200)],
                         ids=["defaults", "lookahead", "tail"])
@pytest.mark.parametrize("unmatched", [0, 50])
@pytest.mark.parametrize("num_layers", [4, 8, 30])
def test_cacheblend_recomputes_15_percent_in_every_layer_past_the_first(num_layers, unmatched, base):
    """What the docs say of the baseline: every token in layer 0, then a fixed 15% of the prompt's tokens in each
    later layer, whatever the depth, the engine's own config and (below 15%) the tokens found in no chunk. The rows
    come from the engine's own count (`recompute_rows`), for a prompt whose tokens are matched, none at its own
    position (no exact prefix), but `unmatched` of them. The old config (recompute_ratio 0.15 as the mean over all
    layers, layer 0 included) gave 0%, 2.8% and 12% here with every token matched."""
    from semshare_ops.engine.matching import Match
    from semshare_ops.engine.rows import recompute_rows

    config = e2e.method_configs(base, num_layers)["cacheblend"]
    tokens = 1001  # the prompt; the engine counts rows among the first tokens - 1, the last always computed
    prefill = tokens - 1
    positions = torch.cat([torch.arange(100), torch.arange(100 + unmatched, tokens)])
    match = Match(positions, positions + 16, torch.ones(len(positions), dtype=torch.bool), tokens)
    counts = recompute_rows(match, prefill, num_layers, config).counts
    assert len(counts) == num_layers and counts[0] == prefill
    for layer, count in enumerate(counts[1:], start=1):
        # count + 1: the last prompt token is recomputed in every layer besides the counted rows
        assert abs((count + 1) - 0.15 * tokens) <= 1, (layer, count, counts)


def test_percentile():
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 3.0], 50) == 2.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_cuda_timing_and_provenance_name_the_device_given(monkeypatch):
    """cuda:1 is synchronised, timed, measured and named as cuda:1, not as the current device (cuda:0): every CUDA
    call names it (torch.cuda stubbed: this runs without a GPU)."""
    from semshare_ops.bench import provenance, timing

    calls = []

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            calls.append(("record", stream))

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 0.25

    def named(name, value=None):
        return lambda device=None: calls.append((name, device)) or value

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 1000),
                        ("max_memory_allocated", 5000), ("get_device_name", "GPU 1")]:
        monkeypatch.setattr(torch.cuda, name, named(name, value))
    assert timing.median_us(lambda: None, "cuda:1", warmup=1, repeat=2) == pytest.approx(250.0)
    stats = timing.interleaved_ttft_stats({"": lambda: 12.5}, 2, "cuda:1", warmup=0)[""]
    assert stats["peak_memory_bytes"] == 4000 and stats["median_ttft_ms"] == 12.5
    assert provenance.environment("cuda:1")["device_name"] == "GPU 1"
    assert calls and all(arg in ("cuda:1", "stream of cuda:1") for _, arg in calls), calls


def test_cuda_peak_memory_counts_the_storage_the_engine_keeps_between_requests(monkeypatch):
    """The engine keeps a finished request's cache storage for the next request: read into the baseline, it left
    that request's own K/V out of its peak (every run but the first). `release` drops it before the baseline. An
    allocator stubbed on torch.cuda: a request takes 3000 bytes of cache storage, from the spare when there is one,
    and hands it back as the spare."""
    from semshare_ops.bench import timing

    state = {"live": 0, "peak": 0, "spare": 0}

    def request():
        if not state["spare"]:
            state["live"] += 3000
        state["spare"] = 0
        state["peak"] = max(state["peak"], state["live"])
        state["spare"] = 3000  # given back, still allocated
        return 10.0

    def release():
        state["live"] -= state["spare"]
        state["spare"] = 0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["live"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["live"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    stats = timing.interleaved_ttft_stats({"": request}, 3, "cuda", warmup=0)[""]
    assert stats["peak_memory_bytes"] == 0  # the spare read as the baseline
    stats = timing.interleaved_ttft_stats({"": request}, 3, "cuda", release=release, warmup=0)[""]
    assert stats["peak_memory_bytes"] == 3000
    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    engine.generate(rand_tokens(40, seed=1), max_new_tokens=1)
    assert engine._spare is not None
    engine.release_cache_storage()
    assert engine._spare is None


def test_run_e2e_tiny_model():
    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    reference = rand_tokens(300, seed=2)
    records = e2e.run_e2e(engine, lambda n: reference[:n], [128, 256], [0.05, 0.3], repeat=2)
    assert len(records) == 2 * 2 * len(e2e.METHODS)
    keys = {"mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "kv_bytes", "kv_bytes_full", "method",
            "prompt_tokens", "speedup_vs_full", "reuse_ratio", "runs"}
    for r in records:
        assert keys <= r.keys() and r["runs"] == 2 and r["mean_ttft_ms"] > 0
        assert r["median_ttft_ms"] <= r["p99_ttft_ms"] + 1e-9
    by = {(r["prompt_tokens"], r["edited_share"], r["method"]): r for r in records}
    for (tokens, share, method), r in by.items():
        if method == "full":
            assert r["mode"] == "full" and r["reuse_ratio"] == 0.0 and r["speedup_vs_full"] == pytest.approx(1.0)
        elif method == "hf":
            assert r["mode"] == "full" and r["reuse_ratio"] == 0.0 and r["recompute_ratio"] is None
        elif method == "decode":  # the last prompt token alone: the floor of every reuse
            # (Not timed against "full" here: on this tiny model both take about 3 ms, so their order is noise.)
            assert r["mode"] == "decode" and r["matched_tokens"] == tokens - 1
            assert r["reuse_ratio"] == pytest.approx(1 - 1 / tokens)
        else:
            assert r["mode"] == "reuse"
            assert r["kv_bytes"] == r["kv_bytes_full"]  # no retention in any method
    # semshare matches more than the exact-chunk and prefix baselines on scattered edits
    for tokens in {k[0] for k in by}:
        for share in (0.05, 0.3):
            if (tokens, share, "semshare") in by:
                assert by[(tokens, share, "semshare")]["matched_tokens"] >= by[(tokens, share, "prefix")]["matched_tokens"]
                assert by[(tokens, share, "semshare")]["matched_tokens"] >= by[(tokens, share, "cacheblend")]["matched_tokens"]
    table = e2e.format_e2e(records)
    assert "cacheblend" in table and len(table.splitlines()) == len(records) + 2


def test_hf_method_runs_no_semshare_code(monkeypatch):
    """The stock baseline must not touch partial_attn or the semshare cache: it is what the engine is timed against."""
    from semshare_ops.engine import hf

    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    monkeypatch.setattr(hf.ops, "partial_attn", lambda *a, **k: pytest.fail("hf baseline ran partial_attn"))
    monkeypatch.setattr(hf, "_causal_sdpa", lambda *a, **k: pytest.fail("hf baseline used the semshare cache"))
    run = e2e._stock_run(engine, rand_tokens(200, seed=5))
    assert run.request() > 0 and run.request() > 0
    facts = run.facts()
    assert facts["mode"] == "full" and facts["kv_bytes"] == engine.num_layers * 200 * engine.token_bytes


def test_run_e2e_sweeps_semshare_recompute_ratios():
    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    reference = rand_tokens(300, seed=2)
    records = e2e.run_e2e(engine, lambda n: reference[:n], [256], [0.1], methods=["full", "prefix", "semshare"],
                          repeat=1, recompute_ratios=[0.1, 0.8])
    assert [(r["method"], r["recompute_ratio"]) for r in records] == [
        ("full", None), ("prefix", 0.0), ("semshare", 0.1), ("semshare", 0.8)]
    low, high = records[2], records[3]
    assert high["reuse_ratio"] < low["reuse_ratio"]  # the ratio really reached the engine
    assert "0.80" in e2e.format_e2e(records)


def test_requests_are_timed_in_rounds_after_an_untimed_one():
    """Each request runs once per round, in order, after a warm-up round whose (slow, cold) time counts nowhere."""
    from semshare_ops.bench import timing

    calls = []

    def request(name, times):
        return lambda: calls.append(name) or times.pop(0)

    stats = timing.interleaved_ttft_stats({"a": request("a", [900.0, 10.0, 12.0]),
                                           "b": request("b", [800.0, 20.0, 26.0])}, 2, "cpu")
    assert calls == ["a", "b"] * 3
    assert stats["a"]["mean_ttft_ms"] == 11.0 and stats["b"]["mean_ttft_ms"] == 23.0
    assert stats["a"]["runs"] == 2 and stats["b"]["p99_ttft_ms"] == pytest.approx(25.94)
    calls.clear()
    no_warmup = timing.interleaved_ttft_stats({"c": request("c", [5.0, 7.0])}, 2, "cpu", warmup=0)
    assert no_warmup["c"]["mean_ttft_ms"] == 6.0
    assert calls == ["c", "c"]


def test_run_e2e_interleaves_the_methods_of_a_target(monkeypatch):
    """Every method of a target serves it once per round, after one untimed round; `full` is timed even when not
    recorded (the speedups are against it)."""
    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    reference = rand_tokens(200, seed=2)
    served, generate = [], engine.generate

    def logged(ids, reference=None, **kwargs):
        if len(ids) > 4:  # not the engine's first warm-up call
            served.append("full" if reference is None else f"{engine.config.matching}@{engine.config.recompute_ratio}")
        return generate(ids, reference=reference, **kwargs)

    monkeypatch.setattr(engine, "generate", logged)
    records = e2e.run_e2e(engine, lambda n: reference[:n], [128], [0.1], methods=["prefix", "semshare"], repeat=2,
                          recompute_ratios=[0.1, 0.8])
    assert [r["method"] for r in records] == ["prefix", "semshare", "semshare"]
    one_round = ["full", "prefix@0.0", f"{engine.config.matching}@0.1", f"{engine.config.matching}@0.8"]
    assert served == one_round * 3
    assert all(r["runs"] == 2 for r in records)


def test_run_e2e_rejects_unknown_method():
    engine = ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())
    with pytest.raises(ValueError, match="methods"):
        e2e.run_e2e(engine, lambda n: rand_tokens(n, 0), [64], methods=["full", "magic"])


@pytest.mark.slow  # initialising 1B random parameters (embeddings and head of the 128k vocabulary) takes ~25 s
def test_random_model_has_the_real_shape_and_dtype():
    model, tok = e2e.random_model("llama3-8b", layers=1, dtype=torch.bfloat16)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (4096, 32, 8, 1)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert len(tok) == cfg.vocab_size
    with pytest.raises(ValueError, match="shape"):
        e2e.random_model("gpt-9")
