"""Every RoPE decoder family transformers ships is served exactly or refused with a clear error (docs/contract.md section 5).

Each family is a tiny random-weight model (fp32, CPU) whose prompts are longer than its sliding window, so windows,
soft-capping, sinks, per-layer rope and partial rotary all take effect. For a served family:
- recompute_ratio 1.0 with a reference that differs from the target gives stock `generate`'s tokens, and its
  first-token logits equal stock full prefill's (the model's own forward) to fp32 rounding;
- the identical prompt as its own reference, at the default config, gives stock tokens;
- an edited target at the default config is served by reuse.
A refused family raises ValueError at ReuseEngine(...) naming the feature and the model class.
"""
from __future__ import annotations

import copy
import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from engine_testutils import FakeTokenizer
from semshare_ops import ReuseConfig, ReuseEngine
from semshare_ops.engine.architecture import declared_windows

VOCAB = 256
PROMPT = 300  # longer than every window below (64)
NEW = 6

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0)

# id -> (model_type, config overrides). Each names what it exercises.
SERVED = {
    "llama": ("llama", {}),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=256))),
    "llama-rope-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=256))),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-rope-dynamic": ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=64)),  # every layer windowed
    "mixtral-window": ("mixtral", dict(sliding_window=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1)),
    "qwen3": ("qwen3", {}),  # q/k norms before rope
    "qwen3-moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "phi3": ("phi3", dict(pad_token_id=0)),
    "phi3-longrope": ("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                        short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                                                        original_max_position_embeddings=512),
                               original_max_position_embeddings=512)),
    "gemma": ("gemma", {}),  # scaled embeddings
    "gemma2": ("gemma2", dict(sliding_window=64, attn_logit_softcapping=5.0, final_logit_softcapping=30.0)),
    "gemma3": ("gemma3_text", dict(sliding_window=64, num_hidden_layers=4, sliding_window_pattern=2)),  # 2 ropes
    # longrope on the global layers only: its limit lives in their entry of the per-layer-type rope_parameters
    "gemma3-longrope-global": ("gemma3_text", dict(sliding_window=64, num_hidden_layers=4, sliding_window_pattern=2,
                                                   rope_parameters={
                                                       "sliding_attention": dict(rope_type="default",
                                                                                 rope_theta=10000.0),
                                                       "full_attention": dict(rope_type="longrope", rope_theta=1e6,
                                                                              short_factor=[1.0] * 8,
                                                                              long_factor=[2.0] * 8,
                                                                              original_max_position_embeddings=512)})),
    "stablelm": ("stablelm", dict(partial_rotary_factor=0.5)),  # partial rotary
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "gpt-oss": ("gpt_oss", dict(sliding_window=64, num_local_experts=4, num_experts_per_tok=2)),  # sinks, window
    "starcoder2": ("starcoder2", dict(sliding_window=64)),
    "olmo3": ("olmo3", dict(sliding_window=64, num_hidden_layers=4,  # one rotary per layer type
                            layer_types=["sliding_attention", "full_attention"] * 2)),
    "cohere": ("cohere", {}),  # interleaved pairs
    "glm": ("glm", {}),  # interleaved pairs on the first half of the head
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0])),  # a layer without RoPE
    "cohere2": ("cohere2", dict(sliding_window=64, num_hidden_layers=4,  # windowed RoPE layers, NoPE global ones
                                layer_types=["sliding_attention", "full_attention"] * 2)),
    "exaone4": ("exaone4", dict(sliding_window=64, num_hidden_layers=4,
                                layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi": ("phi", {}),  # partial rotary
    "persimmon": ("persimmon", dict(num_key_value_heads=None)),  # no kv-heads field in its config
    "granitemoe-multipliers": ("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2,
                                                  embedding_multiplier=4.0, attention_multiplier=0.2,
                                                  residual_multiplier=0.5, logits_scaling=2.0)),
    "nanochat": ("nanochat", {}),  # rotate_half turns by -theta
    "ernie4_5": ("ernie4_5", {}),
    "helium": ("helium", {}),
    "nemotron": ("nemotron", {}),
    # A window at the model's context never binds: served, though its attention applies it only through its mask.
    "phimoe-window-at-context": ("phimoe", dict(sliding_window=1024, num_local_experts=4, num_experts_per_tok=2)),
    # New in transformers 5.25 (skipped on older versions; make test-transformers-newest runs them).
    "ergo": ("ergo", dict(sliding_window=64, num_hidden_layers=4, global_attention_every_n_layers=2)),  # NoPE globals
    "minicpm5-moe": ("minicpm5_moe", {}),
    "param2moe": ("param2moe", {}),
}

# id -> (model_type, config overrides, words the refusal must contain)
REFUSED = {
    "gpt2-learned-positions": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
                               "no rotary position embedding"),
    "falcon-alibi": ("falcon", dict(alibi=True, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
                     "ALiBi"),
    "deepseek-v3-mla": ("deepseek_v3", dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                            num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                                            n_group=1, topk_group=1), "MLA"),
    "llama4-chunked": ("llama4_text", dict(BASE, intermediate_size_mlp=128, num_local_experts=4,
                                           num_experts_per_tok=2, no_rope_layers=[1, 1, 0],
                                           attention_chunk_size=64), "chunked local attention"),
    # Chunking off: its NoPE layers scale queries by a temperature of the position, counted from the cache length.
    "llama4-temperature-tuning": ("llama4_text", dict(BASE, intermediate_size_mlp=128, num_local_experts=4,
                                                      num_experts_per_tok=2, no_rope_layers=[1, 1, 0],
                                                      attention_chunk_size=None), "attn_temperature_tuning"),
    "gemma3-bidirectional": ("gemma3_text", dict(BASE, use_bidirectional_attention=True), "bidirectional"),
    "qwen3-next-linear-attention": ("qwen3_next", dict(BASE, num_hidden_layers=4, linear_conv_kernel_dim=4,
                                                       linear_key_head_dim=16, linear_value_head_dim=16,
                                                       linear_num_key_heads=2, linear_num_value_heads=4,
                                                       num_experts=4, num_experts_per_tok=2,
                                                       moe_intermediate_size=32,
                                                       shared_expert_intermediate_size=32),
                                    "cannot be run one layer at a time"),
    "gptj-layout": ("gptj", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=1024),
                    "a layout the engine cannot drive"),
    # Windows their attention applies only through the mask (no sliding_window= to the attention function).
    "qwen2-moe-mask-only-window": ("qwen2_moe", dict(BASE, use_sliding_window=True, sliding_window=64,
                                                     max_window_layers=2, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=32),
                                   "only through its mask"),
    "phimoe-mask-only-window": ("phimoe", dict(BASE, sliding_window=64, num_local_experts=4, num_experts_per_tok=2),
                                "only through its mask"),
    # The other way round: a window passed to the attention call (which SDPA and eager ignore) that no mask of the
    # model's forward applies (OLMoE masks causally, whatever its config says).
    "olmoe-window-not-masked": ("olmoe", dict(BASE, sliding_window=16, num_experts=4, num_experts_per_tok=2),
                                "no attention mask of its own forward applies (the masks' windows: none)"),
    # 5.25: indexed sparse attention, K/V shared across layers
    "kolibri1_1-shared-kv": ("kolibri1_1", dict(BASE, num_hidden_layers=5, index_num_heads=1),
                             "cannot be run one layer at a time"),
}


def skip_unless_known(model_type: str):
    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no model type {model_type!r}")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(model_type: str, overrides: dict):
    skip_unless_known(model_type)
    # a deep copy: a config keeps the nested dicts it is given (rope_parameters), and a test may edit its model's
    cfg = AutoConfig.for_model(model_type, **copy.deepcopy({**BASE, **overrides}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # always NEW tokens
    return model


def prompts():
    gen = torch.Generator().manual_seed(7)
    target = torch.randint(2, VOCAB, (PROMPT,), generator=gen).tolist()
    reference = list(target)
    for i in range(11, PROMPT, 29):  # scattered edits: the reference differs from the target in 11 places
        reference[i] = 2 + (reference[i] + 5) % (VOCAB - 2)
    return target, reference


def stock_generate(model, ids):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", params=list(SERVED))
def family(request):
    model_type, overrides = SERVED[request.param]
    return request.param, build(model_type, overrides)


def test_recompute_everything_equals_stock(family):
    name, model = family
    target, reference = prompts()
    stock_tokens = stock_generate(model, target)
    with torch.inference_mode():
        stock_logits = model(torch.tensor([target])).logits[0, -1].float()
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig(recompute_ratio=1.0))
    out = engine.generate(target, reference=engine.prefill(reference), max_new_tokens=NEW, output_logits=True,
                          return_dict_in_generate=True)
    assert out.stats["mode"] == "reuse" and out.stats["matched_tokens"] > PROMPT // 2, out.stats
    assert out.token_ids == stock_tokens, name
    scale = stock_logits.abs().max().item()
    torch.testing.assert_close(out.logits[0][0].float(), stock_logits, atol=1e-4 * max(1.0, scale), rtol=1e-4)


def test_identical_prompt_and_edited_prompt(family):
    name, model = family
    target, reference = prompts()
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    same = engine.generate(target, reference=engine.prefill(target), max_new_tokens=NEW)
    assert same.stats["mode"] == "reuse"
    assert same.token_ids == stock_generate(model, target), name
    edited = engine.generate(target, reference=engine.prefill(reference), max_new_tokens=NEW)
    assert edited.stats["mode"] == "reuse" and edited.stats["reuse_ratio"] > 0.2, edited.stats  # 2 check layers of 3
    assert len(edited.token_ids) == NEW


def test_reused_first_layer_kv_move_to_new_positions_as_the_model_computes_them(family):
    """Layer 0's K/V depend on the token alone, not on its context: an entry's layer-0 K/V moved 3 positions by
    the rotation the probe found must be the target's own full-prefill K/V there. The other tests reuse K/V with no
    shift (identical prompts) or recompute them all (ratio 1.0), so a wrong pair convention, direction or frequency
    showed nowhere else."""
    check_first_layer_kv_moved(*family)


def check_first_layer_kv_moved(name, model):
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    target, _ = prompts()
    reference, full = engine.prefill([3, 4, 5] + target), engine.prefill(target)
    dst = torch.arange(len(target))
    cache = engine._new_cache(capacity=len(target))
    engine._reuse_kv(cache, reference, dst + 3, dst, torch.full_like(dst, -3))
    for got, want in ((cache.keys[0], full.keys[0]), (cache.values[0], full.values[0])):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=1e-4 * max(1.0, scale), rtol=1e-4, msg=name)


def test_a_first_layer_without_rope_is_copied_unrotated():
    """SmolLM3 with its first layer the one without RoPE: the probe groups it apart and its reused keys are copied
    as they are (the check above on a NoPE layer)."""
    model = build("smollm3", dict(num_hidden_layers=4, no_rope_layers=[0, 1, 1, 1]))
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert {g.layers: g.inv_freq is None for g in engine.rope_groups} == {(0,): True, (1, 2, 3): False}
    check_first_layer_kv_moved("smollm3-nope-first", model)


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_with_a_clear_error(name):
    model_type, overrides, feature = REFUSED[name]
    skip_unless_known(model_type)
    cfg = AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with pytest.raises(ValueError) as info:
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    message = str(info.value)
    assert re.search(re.escape(feature), message), message
    assert type(model).__name__ in message, message


def test_model_outside_the_engine_serves_as_before(family):
    """The engine switches the model to its "semshare" attention; outside an engine call the model's previous
    attention (and its mask) serve, windows, caps and sinks included."""
    name, model = family
    target, _ = prompts()
    fresh = build(*SERVED[name])  # the same weights, never switched
    assert fresh.config._attn_implementation != "semshare"
    ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert model.config._attn_implementation == "semshare"
    assert stock_generate(model, target) == stock_generate(fresh, target), name


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", dict(max_position_embeddings=4)), ("llama", dict(max_position_embeddings=8)),
    # longrope's long factors start at 6, 32 or 40: a probe past it would see other frequencies than the ones served
    *[("phi3", dict(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8,
                                         long_factor=[2.0] * 8, original_max_position_embeddings=limit),
                    original_max_position_embeddings=limit)) for limit in (6, 32, 40)]],
    ids=["llama-4", "llama-8", "phi3-longrope-6", "phi3-longrope-32", "phi3-longrope-40"])
def test_short_context_is_probed_inside_it(model_type, overrides):
    """The RoPE probe fits its two sets of positions inside a short limit without overlapping them (a model of 8
    positions was refused as not rotating its keys), and the model is served exactly up to the limit."""
    model = build(model_type, overrides)
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    limit = engine.max_positions
    assert limit == overrides.get("original_max_position_embeddings", overrides.get("max_position_embeddings"))
    assert [(g.neox, g.sign) for g in engine.rope_groups] == [(True, 1)]
    target = [2 + (7 * i) % 250 for i in range(limit - 1)]
    reference = [target[0] + 1] + target[1:]  # the first token edited: every later row's context changed
    with torch.inference_mode():
        stock = model(torch.tensor([target])).logits[0, -1].float()
    with engine.using(ReuseConfig(recompute_ratio=1.0)):
        out = engine.generate(target, reference=engine.prefill(reference), max_new_tokens=1, output_logits=True,
                              return_dict_in_generate=True)
    assert out.stats["mode"] == "reuse" and out.stats["matched_tokens"] == limit - 2, out.stats
    torch.testing.assert_close(out.logits[0][0].float(), stock, atol=1e-4 * max(1.0, stock.abs().max().item()),
                               rtol=1e-4)
    same = engine.generate(target, reference=engine.prefill(target), max_new_tokens=1)
    assert same.token_ids == stock_generate(model, target)[:1]


@pytest.mark.parametrize("dtype, drift", [(torch.float32, 1e-4), (torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_keys_that_rotate_only_nearly_as_rope_are_refused(dtype, drift):
    """Keys scaled by 1 + drift x position on top of RoPE (the rotation plus 0.4% or 0.04% in fp32, 3.7% in bf16,
    over the probe's 37 positions): reused keys re-rotated by the position difference would be that far off, with no
    self-check to see it (a full prefill is exact), so the probe's tolerance is its dtype's rounding (1e-4 of the
    keys' largest value in fp32), not a share of the keys. The same model without the drift is served in either
    dtype."""
    model = build("llama", {}).to(dtype)
    ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    rotary = model.model.rotary_emb
    plain = rotary.forward

    def drifting(x, position_ids, *args, **kwargs):
        cos, sin = plain(x, position_ids, *args, **kwargs)
        scale = 1 + drift * position_ids[..., None].to(cos.dtype)
        return cos * scale, sin * scale

    rotary.forward = drifting
    with pytest.raises(ValueError, match="keys of decoder layer 0 do not rotate as RoPE"):
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())


def test_keys_of_any_scale_are_found_to_rotate():
    """The probe's tests are relative to the keys' size: a Llama whose keys are a thousandth of the usual scale (so a
    rotation moves them by about 1e-3 in absolute terms) is still found to rotate as RoPE in every layer, not taken
    for a model without RoPE whose reused keys would be copied unrotated."""
    model = build("llama", {})
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1e-3)
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert [g.inv_freq is not None for g in engine.rope_groups] == [True], engine.rope_groups
    assert sorted(i for g in engine.rope_groups for i in g.layers) == list(range(engine.num_layers))


def test_a_model_that_names_no_context_length_is_served():
    """No max_position_embeddings (a remote-code config may lack it; transformers' own refuse None, hence the
    validation bypassed): no limit on a request, and the probe and the self-check take their own sizes."""
    model = build("llama", {})
    object.__setattr__(model.config, "max_position_embeddings", None)
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions is None
    target, reference = prompts()
    assert engine.generate(target, reference=engine.prefill(target), max_new_tokens=NEW).token_ids == \
        stock_generate(model, target)


def test_length_dependent_rope_is_refused_past_its_original_length():
    """longrope switches to its long factors past original_max_position_embeddings (512 here): requests that
    would cross it are refused by name, shorter ones are served (the tests above)."""
    model = build(*SERVED["phi3-longrope"])
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions == 512
    with pytest.raises(ValueError, match="longrope"):
        engine.generate([2 + i % 250 for i in range(500)], max_new_tokens=20)
    assert len(engine.generate([2 + i % 250 for i in range(500)], max_new_tokens=8).token_ids) == 8
    # Per layer type: Gemma-3's global layers' longrope holds until 512, a length its config names nowhere else.
    model = build(*SERVED["gemma3-longrope-global"])
    assert getattr(model.config, "original_max_position_embeddings", None) is None
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions == 512
    with pytest.raises(ValueError, match="'longrope' RoPE changes its frequencies with the sequence length past 512"):
        engine.generate([2 + i % 250 for i in range(500)], max_new_tokens=20)
    # dynamic RoPE's limit is the model's own max_position_embeddings: the refusal still names the rope type (the
    # model itself runs past that length, with other frequencies), not only "the model's context".
    model = build(*SERVED["llama-rope-dynamic"])
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions == model.config.max_position_embeddings
    with pytest.raises(ValueError, match="'dynamic' RoPE changes its frequencies"):
        engine.generate([2 + i % 250 for i in range(engine.max_positions)], max_new_tokens=2)


def test_mask_window_reads_transformers_mask_functions():
    """The self-check's reading of a mask function's window, on transformers' own: causal (no window), sliding
    windows of several sizes (query q sees q - w < k <= q, as partial_attn's window), and what is not a causal
    window (chunked attention, a mask that reads the real sequence's padding) read as unknown, never as a window."""
    from transformers import masking_utils as mu

    from semshare_ops.engine.hf import UNKNOWN_WINDOW, mask_window

    assert mask_window(mu.causal_mask_function) is None
    for w in (1, 16, 4096, 131072):
        assert mask_window(mu.sliding_window_causal_mask_function(w)) == w
    chunked = getattr(mu, "chunked_causal_mask_function", None)
    if chunked is not None:
        args = inspect.signature(chunked).parameters
        fn = chunked(64, torch.zeros(1, dtype=torch.long)) if len(args) == 2 else chunked(64)
        assert mask_window(fn) == UNKNOWN_WINDOW
    padded = mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 12, dtype=torch.bool)))
    assert mask_window(padded) == UNKNOWN_WINDOW
    assert mask_window(None) == UNKNOWN_WINDOW


def test_mask_window_reads_masks_that_are_no_causal_window_as_unknown():
    """Unknown, never a window or None: a mask where a query sees later keys (bidirectional, or the next one), one
    where it does not see itself, and one that also sees every even key before its window (no single span of keys).
    A mask is read for the first sequence and head."""
    from semshare_ops.engine.hf import UNKNOWN_WINDOW, mask_window

    def bidirectional(b, h, q, k):
        return torch.tensor(True)

    def strictly_before(b, h, q, k):
        return k < q

    def window_and_even(b, h, q, k):
        return (k <= q) & ((k > q - 4) | (k % 2 == 0))

    def one_ahead(b, h, q, k):
        return k <= q + 1

    def causal_in_the_first_sequence_and_head(b, h, q, k):
        return (k <= q) & (b == 0) & (h == 0)

    assert mask_window(bidirectional) == UNKNOWN_WINDOW
    assert mask_window(strictly_before) == UNKNOWN_WINDOW
    assert mask_window(window_and_even) == UNKNOWN_WINDOW
    assert mask_window(one_ahead) == UNKNOWN_WINDOW
    assert mask_window(causal_in_the_first_sequence_and_head) is None


@pytest.mark.parametrize("chunk", [2, 3, 6, 7, 64])
def test_mask_window_reads_no_chunked_mask_as_a_window(chunk):
    """A chunked mask is no sliding window, whatever its chunk size: query q sees the keys from the start of its
    chunk, so neighbouring queries see spans of different lengths. (Chunks of 2, 3 and 6 divide 2**39 - 2, the
    distance between two queries that read the same span under them: read alone, those two made them windows of
    2, 1 and 4.)"""
    from transformers import masking_utils as mu

    from semshare_ops.engine.hf import UNKNOWN_WINDOW, mask_window

    chunked = getattr(mu, "chunked_causal_mask_function", None)
    if chunked is None:
        pytest.skip("this transformers has no chunked mask")
    args = inspect.signature(chunked).parameters
    fn = chunked(chunk, torch.zeros(1, dtype=torch.long)) if len(args) == 2 else chunked(chunk)
    assert mask_window(fn) == UNKNOWN_WINDOW


def test_kv_dtype_is_the_attentions_not_the_embeddings(monkeypatch):
    """Ergo keeps its embeddings and norms in fp32 (`_keep_in_fp32_modules_strict`) and runs its attention in the
    dtype asked for: the engine made its caches in the embeddings' fp32 and refused the model ("cannot be run one
    layer at a time"), and would have counted fp32 bytes. Its caches now take the attention's fp16. (Its
    self-check still refuses it in half precision, on the stock model's own error: stock fp16 Ergo is 0.11 off its
    fp32 logits on one row of the check's prompt, the engine 1e-3; skipped here to see the engine's own result.)"""
    from semshare_ops.engine import engine as engine_module

    skip_unless_known("ergo")
    model_type, overrides = SERVED["ergo"]
    cfg = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    torch.manual_seed(0)
    exact = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    monkeypatch.setattr(engine_module.ReuseEngine, "_self_check", lambda self: None)
    target, reference = prompts()
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig(recompute_ratio=1.0))
    assert engine.kv_dtype == torch.float16 and engine.token_bytes == engine.kv_heads * 2 * engine.head_dim * 2
    entry = engine.prefill(reference)
    assert entry.keys.dtype == entry.values.dtype == torch.float16
    out = engine.generate(target, reference=entry, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    assert out.stats["mode"] == "reuse"
    with torch.inference_mode():
        want = exact(torch.tensor([target])).logits[0, -1].float()
    torch.testing.assert_close(out.logits[0][0].float(), want, atol=1e-2, rtol=0)


def test_kv_dtype_without_floating_point_attention_weights_is_the_embeddings():
    """An attention whose weights are not floating point (int8 weights, as bitsandbytes keeps them, computing in the
    embeddings' dtype) or a first layer without `self_attn`: the K/V dtype is the embeddings'."""
    from types import SimpleNamespace

    from semshare_ops.engine import engine as engine_module

    embeddings = torch.nn.Embedding(4, 8, dtype=torch.bfloat16)
    quantized = torch.nn.Module()
    quantized.weight = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    for layer in (SimpleNamespace(self_attn=quantized), SimpleNamespace()):
        engine = SimpleNamespace(decoder=SimpleNamespace(layers=[layer], embed_tokens=embeddings))
        assert engine_module.ReuseEngine.kv_dtype.fget(engine) == torch.bfloat16
    # Projections in fp16 beside a small norm kept in fp32: the projections' (the largest tensor's) dtype
    mixed = torch.nn.Module()
    mixed.q_proj = torch.nn.Linear(8, 8, bias=False, dtype=torch.float16)
    mixed.q_norm = torch.nn.LayerNorm(8, dtype=torch.float32)
    engine = SimpleNamespace(decoder=SimpleNamespace(layers=[SimpleNamespace(self_attn=mixed)],
                                                     embed_tokens=embeddings))
    assert engine_module.ReuseEngine.kv_dtype.fget(engine) == torch.float16


# config field(s) -> words the refusal must contain. Each field is one that a family's config names and that no probe
# needs to confirm (architecture._refuse_static); set alone on a Llama, which would otherwise be served.
STATIC_REFUSALS = {
    "alibi": (dict(alibi=True), "ALiBi"),
    "kv_lora_rank": (dict(kv_lora_rank=16), "MLA"),
    "qk_rope_head_dim": (dict(qk_rope_head_dim=8), "MLA"),
    "mrope_section": (dict(mrope_section=[2, 3, 3]), "M-RoPE"),
    "rope_parameters.mrope_section": (dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                mrope_section=[2, 3, 3])), "M-RoPE"),
    "attention_chunk_size": (dict(attention_chunk_size=64), "chunked local attention"),
    "attn_temperature_tuning": (dict(attn_temperature_tuning=True, no_rope_layers=[1, 0, 1]),
                                "attn_temperature_tuning"),
    "use_bidirectional_attention": (dict(use_bidirectional_attention=True), "bidirectional"),
    "is_causal": (dict(is_causal=False), "bidirectional"),
    "is_encoder_decoder": (dict(is_encoder_decoder=True), "encoder-decoder"),
}


@pytest.mark.parametrize("name", list(STATIC_REFUSALS))
def test_each_config_field_the_static_checks_read_is_refused_alone(name):
    fields, feature = STATIC_REFUSALS[name]
    model = build("llama", {})
    for key, value in fields.items():
        setattr(model.config, key, value)
    with pytest.raises(ValueError, match=re.escape(feature)) as info:
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert "LlamaForCausalLM" in str(info.value)


def test_temperature_tuning_without_nope_layers_is_served():
    """Llama4 scales queries by position only in its layers without RoPE: with every layer rotating, nothing reads
    the cache's length, and the model is served."""
    model = build("llama", {})
    model.config.attn_temperature_tuning, model.config.no_rope_layers = True, [1, 1, 1]
    assert ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig()).max_positions == BASE["max_position_embeddings"]


def test_an_encoder_decoder_is_refused():
    """T5Gemma rotates its keys like Gemma, but its decoder reads an encoder's output: refused by name."""
    from transformers import AutoModelForSeq2SeqLM

    skip_unless_known("t5gemma")
    sub = {k: v for k, v in BASE.items() if k != "pad_token_id"}
    cfg = AutoConfig.for_model("t5gemma", encoder=sub, decoder=sub, vocab_size=VOCAB)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="T5GemmaForConditionalGeneration: an encoder-decoder model"):
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())


@pytest.mark.parametrize("window", [None, 0, -64, True, 64.0, "64"])
def test_declared_windows_ignore_what_is_no_positive_int(window):
    """A config's sliding_window counts only as a positive int: 0, negatives, a bool, a float or a string declare
    no window (bool is an int in Python; True would read as a 1-token window)."""
    for types in (None, ["sliding_attention", "full_attention"] * 2):
        cfg = SimpleNamespace(sliding_window=window, layer_types=types)
        assert declared_windows(cfg, 4) == [None] * 4


def test_declared_windows_per_layer_type():
    cfg = SimpleNamespace(sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 3)
    assert declared_windows(cfg, 4) == [64, None, 64, None]  # the first num_layers types
    assert declared_windows(SimpleNamespace(sliding_window=64), 3) == [64, 64, 64]  # no layer_types: every layer
    assert declared_windows(SimpleNamespace(sliding_window=1), 2) == [1, 1]  # the smallest window is one


def test_a_rotary_embedding_is_found_by_its_config_fields_whatever_its_class_is_named():
    """A rotary module whose class name does not say "Rotary" (remote code names its own) is still a RoPE model
    when its config names rope fields: served, and the probe confirms the rotation."""
    model = build("llama", {})
    rotary = model.model.rotary_emb
    rotary.__class__ = type("PositionTurner", (type(rotary),), {})
    assert not any("Rotary" in type(m).__name__ for m in model.modules())
    target, _ = prompts()
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    out = engine.generate(target, reference=engine.prefill(target), max_new_tokens=NEW)
    assert out.stats["mode"] == "reuse" and out.token_ids == stock_generate(model, target)


@pytest.mark.parametrize("missing", ["embed_tokens", "layers", "rotary_emb"])
def test_a_decoder_without_one_of_the_parts_the_engine_drives_is_refused_as_a_layout(missing):
    model = build("llama", {})
    delattr(model.model, missing)
    with pytest.raises(ValueError, match="LlamaForCausalLM: a layout the engine cannot drive"):
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())


@pytest.mark.parametrize("name", ["llama", "llama-rope-yarn", "llama-rope-linear", "gemma3"])
def test_rope_with_fixed_frequencies_is_limited_by_the_models_context_alone(name):
    """Only length-dependent ropes (dynamic, longrope) are named as the reason a request is refused; the others keep
    their frequencies at any length, and the model's context is the limit."""
    model = build(*SERVED[name])
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions == model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"positions \(the model's context\)$"):
        engine.generate([2 + i % 250 for i in range(engine.max_positions)], max_new_tokens=2)


def test_a_rotary_embedding_without_frequencies_the_engine_can_read_is_refused():
    """One inv_freq, or one per layer type: a rotary module with neither is refused by name, before any layer runs."""
    model = build("llama", {})
    del model.model.rotary_emb.inv_freq
    with pytest.raises(ValueError, match="a rotary embedding \\(LlamaRotaryEmbedding\\) with neither one inv_freq"):
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())


def test_a_length_dependent_rope_without_its_length_is_refused():
    """The length up to which longrope keeps its frequencies must be named somewhere: not guessed."""
    model = build(*SERVED["gemma3-longrope-global"])
    del model.config.rope_parameters["full_attention"]["original_max_position_embeddings"]
    with pytest.raises(ValueError, match="Gemma3ForCausalLM: 'longrope' RoPE without original_max_position_embeddings"):
        ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())


def test_a_rope_limit_past_the_models_context_does_not_raise_it():
    """Gemma-3's global layers' longrope holds until 512, its context ends at 400: the context is the limit."""
    model_type, overrides = SERVED["gemma3-longrope-global"]
    model = build(model_type, dict(overrides, max_position_embeddings=400))
    engine = ReuseEngine(model, FakeTokenizer(VOCAB), ReuseConfig())
    assert engine.max_positions == 400
    with pytest.raises(ValueError, match=r"exceed 400 positions \(the model's context\)$"):
        engine.generate([2 + i % 250 for i in range(399)], max_new_tokens=2)
