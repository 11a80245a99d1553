"""The connector inside vLLM and `ReuseEngine` on the same model (the converted SmolLM2, fp32, transformers) serve six
controlled edits of one real prompt the same way: the same exact common prefix left as it is, the same rows
recomputed per layer, and the same closeness to
their own engine's full prefill (ROUGE-L of 24 greedy tokens, averaged, within 0.05).

Each edit touches the first 64 tokens, so vLLM has no exact prefix-cache hit (its CPU blocks hold 128 tokens) and
both engines align and recompute over the same positions."""
import statistics

import pytest

pytest.importorskip("vllm")
pytest.importorskip("rouge_score")

from vllm_testutils import OFF, serve  # noqa: E402

from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402
from semshare_ops.eval.evaluate import rouge_l  # noqa: E402

NEW = 24
ROUGE_TOLERANCE = 0.05


def _edits(ref):
    """Six targets: a word replaced, a span replaced, tokens inserted, tokens deleted, and two multi-site edits
    (the second: a span moved), every one of them inside the first block."""
    r = list(ref)
    return {
        "replace one": r[:20] + [r[300]] + r[21:],
        "replace span": r[:30] + r[400:406] + r[36:],
        "insert": r[:40] + r[500:504] + r[40:],
        "delete": r[:50] + r[55:],
        "scattered": r[:10] + [r[200]] + r[11:250] + r[260:270] + r[250:260] + r[270:500] + r[502:],
        "moved": r[:60] + r[300:340] + r[60:300] + r[340:],
    }


@pytest.fixture(scope="module")
def hf_engine(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return ReuseEngine(model, tokenizer, ReuseConfig(matching="edit", recompute_ratio=0.2))


def test_vllm_and_hf_engines_reuse_the_same_way(llm, hf_engine, texts):
    reference = texts[0]
    assert serve(llm, reference, "parity").stats["saved"]
    hf_reference = hf_engine.prefill(reference)
    tokenizer = llm.get_tokenizer()
    scores = {"vllm": [], "hf": []}
    for name, target in _edits(reference).items():
        reused = serve(llm, target, "parity", {"save": False}, n=NEW)
        full = serve(llm, target, "parity-full", OFF, n=NEW)
        hf_reused = hf_engine.generate(target, reference=hf_reference, max_new_tokens=NEW)
        hf_full = hf_engine.generate(target, max_new_tokens=NEW)
        assert reused.stats["mode"] == "reuse" and reused.stats["prefix_hit_tokens"] == 0, (name, reused.stats)
        assert hf_reused.stats["mode"] == "reuse", (name, hf_reused.stats)
        assert reused.stats["matched_tokens"] == hf_reused.stats["matched_tokens"], name
        assert reused.stats["exact_tokens"] == hf_reused.stats["exact_tokens"] > 0, name  # the common prefix
        assert reused.stats["recomputed_tokens"] == hf_reused.stats["recomputed_tokens"], name
        assert full.tokens == hf_full.token_ids[:NEW] or rouge_l(tokenizer.decode(full.tokens), hf_full.text) > 0.9
        scores["vllm"].append(rouge_l(tokenizer.decode(reused.tokens), tokenizer.decode(full.tokens)))
        scores["hf"].append(rouge_l(hf_reused.text, hf_full.text))
    vllm_mean, hf_mean = statistics.mean(scores["vllm"]), statistics.mean(scores["hf"])
    assert abs(vllm_mean - hf_mean) <= ROUGE_TOLERANCE, scores
