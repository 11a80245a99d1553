"""pytest-benchmark suite of time to first token: full prefill vs reuse, through the engine as `semshare bench e2e`.

    pytest benchmarks/suite_ttft.py --benchmark-only                        # tiny random Llama (seconds)
    SEMSHARE_BENCH_REAL=1 pytest benchmarks/suite_ttft.py --benchmark-only  # embedded SmolLM2-135M (minutes)

Each request generates one new token, so its wall time is the TTFT (matching and cache assembly included).
The tiny model is the one the pipeline tests use (tests/engine_testutils.py): it checks that the suite runs
and how the fixed costs of reuse compare, not model speed. With SEMSHARE_BENCH_REAL=1 the embedded SmolLM2 runs
on real text at SEMSHARE_BENCH_E2E_LENGTHS (default 1024). Targets are the reference with about 10% of the
tokens edited (`semshare_ops.bench.e2e.edit_tokens`); `extra_info` carries the engine's own stats of the last request.
"""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("transformers")

from semshare_ops.bench import e2e  # noqa: E402
from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402

REAL = os.environ.get("SEMSHARE_BENCH_REAL") == "1"
LENGTHS = [int(n) for n in os.environ.get("SEMSHARE_BENCH_E2E_LENGTHS", "1024" if REAL else "256 768").split()]
EDITED = 0.1
METHODS = ["full", "prefix", "cacheblend", "semshare"]
ROUNDS = 3 if REAL else 5


@pytest.fixture(scope="module")
def engine_and_prompt():
    """(engine, prompt(n) -> token ids, model name)."""
    if REAL:
        import semshare_ops as ss

        try:
            model, tokenizer = ss.load_model(progress=False)
        except (ImportError, FileNotFoundError) as e:
            pytest.skip(f"the embedded SmolLM2 is not installed ({e})")
        ids = e2e.text_prompt(tokenizer, max(LENGTHS))
        return ReuseEngine(model, tokenizer, ReuseConfig()), lambda n: ids[:n], "smollm2-135m"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from engine_testutils import MAX_POS, FakeTokenizer, build_model, rand_tokens

    if max(LENGTHS) * (1 + EDITED) + 1 > MAX_POS:
        pytest.skip(f"the tiny model holds {MAX_POS} positions; SEMSHARE_BENCH_E2E_LENGTHS asks for more")
    ids = rand_tokens(max(LENGTHS), seed=2)
    return ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig()), lambda n: ids[:n], "tiny-llama"


@pytest.fixture(scope="module")
def entries(engine_and_prompt):
    """Per length: the reference entry (prefilled once, outside the timings) and the edited target."""
    engine, prompt, _ = engine_and_prompt
    engine.generate([1, 2, 3, 4], max_new_tokens=1)  # thread pools and first-call costs stay out of the timings
    return {n: (engine.prefill(prompt(n)), e2e.edit_tokens(prompt(n), EDITED, seed=n)) for n in LENGTHS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("length", LENGTHS)
def test_ttft(benchmark, engine_and_prompt, entries, length, method):
    engine, _, name = engine_and_prompt
    entry, target = entries[length]
    config = e2e.method_configs(engine.config, engine.num_layers)[method]
    last = {}

    def request():
        with engine.using(config):
            last["out"] = engine.generate(target, reference=entry if config is not None else None,
                                          max_new_tokens=1)

    benchmark.group = f"ttft {name} {length} tokens, {EDITED:.0%} edited"
    benchmark.pedantic(request, rounds=ROUNDS, warmup_rounds=1)
    stats = last["out"].stats
    benchmark.extra_info.update(model=name, method=method, edited_share=EDITED,
                                recompute_ratio=None if config is None else config.recompute_ratio,
                                **{k: stats[k] for k in ("mode", "prompt_tokens", "matched_tokens", "reuse_ratio",
                                                          "ttft_ms", "kv_bytes")})
    assert stats["mode"] == ("full" if config is None else "reuse")
