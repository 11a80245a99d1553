"""The connector on each architecture it serves besides Llama (Apertus with its per-head q/k norms, Cohere with
attention and MLP side by side, ERNIE-4.5-MoE, GLM-4-MoE, Ernie 4.5 with interleaved rotary pairs, GLM-4 and Nemotron
with RoPE on half of each head, Gemma with its scaled embeddings, Gemma-2 with logit soft-capping and Gemma-3 with two
rotary bases (both with their windows disabled), Granite and its MoE versions with their multipliers and the residual
added inside the layer, Mistral, Mixtral, OLMoE with q/k norms over the whole projections, Phi-3 with and without
longrope, Qwen2 with its QKV biases, Qwen3 with its per-head key norms, Qwen2-MoE, Qwen3-MoE, StableLM with RoPE on a
quarter of each head), and one it must refuse (a sliding window): tiny random-weight models made from transformers
configs, the embedded model's tokenizer, one engine of their own each (in one process), real ShareGPT text.

What is checked, per architecture: the connector serves it (the start-up probe passes); recomputing every row
through vLLM's own layers gives vLLM's own prefill; the default settings reuse most rows; the K/V-only pass writes
what the whole layer writes, bit for bit. A model it does not serve takes vLLM's own prefill, with the reason named.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vllm_testutils import LOGPROB_ATOL  # noqa: E402

# Small enough to start in seconds; head_dim 64 (one of the CPU backend's sizes), one KV head for two query heads
# (GQA), 4 layers.
COMMON = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=64, max_position_embeddings=2048, initializer_range=0.1,
              tie_word_embeddings=False)
# name: (transformers config, its settings, the decoder layer class vLLM runs it with; or for a model the connector
# must refuse, None and the reason it names).
# Granite 3's multipliers: each one left out (or applied twice) changes vLLM's own prefill.
GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0)
FAMILIES = {
    "apertus": ("ApertusConfig", {}, "ApertusDecoderLayer"),
    "cohere": ("CohereConfig", {"eos_token_id": 0, "bos_token_id": 1}, "CohereDecoderLayer"),
    "ernie4_5": ("Ernie4_5Config", {}, "LlamaDecoderLayer"),
    "ernie4_5-moe": ("Ernie4_5_MoeConfig", {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 64,
                                            "moe_num_shared_experts": 1}, "Ernie4_5_MoeDecoderLayer"),
    "gemma": ("GemmaConfig", {}, "GemmaDecoderLayer"),
    # Windows as long as the engine's context, run without them (disable_sliding_window, ENGINE_ARGS): Gemma-2's
    # soft-capping, Gemma-3's two rotary bases and q/k norms.
    "gemma2": ("Gemma2Config", {"sliding_window": 1024, "attn_logit_softcapping": 5.0, "tie_word_embeddings": True},
               "Gemma2DecoderLayer"),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 1024}, "Gemma3DecoderLayer"),
    # RoPE on half of each head (interleaved pairs for GLM-4, neox for Nemotron)
    "glm4": ("Glm4Config", {"pad_token_id": 0, "eos_token_id": 0}, "Glm4DecoderLayer"),
    "glm4-moe": ("Glm4MoeConfig", {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                    "pad_token_id": 0, "eos_token_id": 0}, "Glm4MoeDecoderLayer"),
    "nemotron": ("NemotronConfig", {}, "NemotronDecoderLayer"),
    "granite": ("GraniteConfig", GRANITE, "GraniteDecoderLayer"),
    "granite-moe": ("GraniteMoeConfig", {**GRANITE, "num_local_experts": 4, "num_experts_per_tok": 2},
                    "GraniteMoeDecoderLayer"),
    "granite-moe-shared": ("GraniteMoeSharedConfig", {**GRANITE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                      "shared_intermediate_size": 64}, "GraniteMoeSharedDecoderLayer"),
    # transformers' Mistral default is a 4096-token window
    "mistral": ("MistralConfig", {"sliding_window": None}, "MistralDecoderLayer"),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
                "MixtralDecoderLayer"),
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": 0},
              "OlmoeDecoderLayer"),
    "phi3": ("Phi3Config", {"sliding_window": None}, "LlamaDecoderLayer"),
    # vLLM applies one set of longrope factors to the whole engine, the long ones here (max_model_len 1024 > 512).
    "phi3-longrope": ("Phi3Config", {"sliding_window": None, "original_max_position_embeddings": 512,
                                     "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 32,
                                                      "long_factor": [float(1 + i) for i in range(32)]}},
                      "LlamaDecoderLayer"),
    "qwen2": ("Qwen2Config", {}, "Qwen2DecoderLayer"),
    "qwen3": ("Qwen3Config", {}, "Qwen3DecoderLayer"),
    "qwen2-moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 64}, "Qwen2MoeDecoderLayer"),
    "qwen3-moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
                  "Qwen3MoeDecoderLayer"),
    "stablelm": ("StableLmConfig", {}, "StablelmDecoderLayer"),  # RoPE on a quarter of each head, LayerNorms
    "mistral-sliding-window": ("MistralConfig", {"sliding_window": 64}, None, "sliding window"),
    # The same, with a window as long as the context and vLLM told to run it as causal attention (Mistral 7B v0.1's
    # 4096-token window, up to 4096 tokens): the refusal's remedy.
    "mistral-window-disabled": ("MistralConfig", {"sliding_window": 1024}, "MistralDecoderLayer"),
}
# Engine arguments beside the common ones, per family.
ENGINE_ARGS = {name: {"disable_sliding_window": True} for name in ("gemma2", "gemma3", "mistral-window-disabled")}

SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from vllm_testutils import OFF, serve
if __name__ == "__main__":
    import torch
    from vllm import LLM
    import semshare_ops.vllm as ssv
    from semshare_ops.bench.e2e import edit_tokens, text_prompt
    llm = LLM({model!r}, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              **ssv.engine_args(recompute_ratio=0.2), **{engine_args!r})
    reference = text_prompt(llm.get_tokenizer(), 400)
    target = edit_tokens(reference, 0.1, seed=7)
    diff = lambda a, b: (a.tokens == b.tokens, max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
    donor = serve(llm, reference, "s")
    full = serve(llm, target, "full", OFF)
    whole = serve(llm, target, "s", {{"save": False, "recompute_ratio": 1.0, "min_similarity": 0.0}})
    part = serve(llm, target, "s", {{"save": False}})

    def kv_only_against_whole_layer(worker):
        from vllm.distributed.kv_transfer import get_kv_transfer_group
        model = get_kv_transfer_group()._worker.model
        if model is None:
            return None
        rows = torch.cat([torch.arange(3, 45), torch.arange(70, 131)])
        block_ids = model._scratch_blocks(int(rows[-1]) + 1)
        hidden = model.embed(torch.randint(0, model.model.config.vocab_size, (rows.numel(),),
                                           generator=torch.Generator().manual_seed(1)))
        residual, equal = None, []
        try:
            with torch.inference_mode():
                for idx in range(model.num_layers):
                    out = model.run_layer(idx, rows, hidden.clone(), None if residual is None else residual.clone(),
                                          block_ids)
                    whole = model.read_rows(idx, block_ids, rows)
                    model._clear_scratch(block_ids, [idx])
                    model.write_kv(idx, rows, hidden, residual, block_ids)
                    kv_only = model.read_rows(idx, block_ids, rows)
                    equal.append(torch.equal(whole[0], kv_only[0]) and torch.equal(whole[1], kv_only[1])
                                 and bool((kv_only[0].abs().amax(dim=(1, 2)) > 0).all()))
                    hidden, residual = out
        finally:
            model._clear_scratch(block_ids)
        return {{"layer": type(model.layers[0]).__name__, "equal": equal}}

    (kv_only,) = llm.collective_rpc(kv_only_against_whole_layer)
    result = {{"donor": donor.stats, "whole": whole.stats, "part": part.stats, "full": diff(whole, full),
               "part_full": diff(part, full), "kv_only": kv_only}}
    print("RESULT " + json.dumps(result))
"""


def _make_model(name: str, root: Path, tokenizer_dir: str) -> str:
    import torch
    import transformers

    config_class, extra = FAMILIES[name][:2]
    config = getattr(transformers, config_class)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = root / name
    model.save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / file, out / file)
    return str(out)


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, model_dir, tmp_path_factory):
    """(family, what its engine reported)."""
    root = tmp_path_factory.mktemp("families")
    model = _make_model(request.param, root, model_dir)
    path = root / "run.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parents[1]), model=model,
                                  engine_args=ENGINE_ARGS.get(request.param, {})))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return request.param, json.loads(lines[-1][len("RESULT "):])


def test_each_family_is_served_exactly_or_refused_by_name(served):
    family, case = served
    layer, *refused = FAMILIES[family][2:]
    if layer is None:
        # Refused by the worker at start-up: every request is vLLM's own prefill, none is kept as a donor (the
        # first says why in saved_reason), and every one after the first step's report names the reason.
        assert case["kv_only"] is None, case
        donor = case["donor"]
        assert donor["mode"] == "full" and not donor["saved"], donor
        assert donor["saved_reason"].startswith("reuse is off in this engine: unsupported model: "), donor
        assert refused[0] in donor["saved_reason"], donor
        for stats in (case["whole"], case["part"]):
            assert stats["mode"] == "fallback" and stats["reason"].startswith("unsupported model: "), stats
            assert refused[0] in stats["reason"], stats
        same, diff = case["full"]
        assert same and diff < LOGPROB_ATOL, case
        return
    assert case["kv_only"] == {"layer": layer, "equal": [True] * COMMON["num_hidden_layers"]}, case
    assert case["donor"]["mode"] == "full" and case["donor"]["saved"], case["donor"]
    whole = case["whole"]
    assert whole["mode"] == "reuse" and whole["loaded_tokens"] > 0, whole
    same, diff = case["full"]
    assert same and diff < LOGPROB_ATOL, case
    part = case["part"]
    # Two of the four layers are check layers (every row), so about half the rows' K/V are reused at most.
    assert part["mode"] == "reuse" and 0.3 < part["reuse_ratio"] < 1.0, part
    assert min(part["recomputed_tokens"]) < part["prompt_tokens"] - part["exact_tokens"], part
