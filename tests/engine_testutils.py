"""What the engine tests (and the store, bench and eval tests) share: tiny random-weight Llama and Qwen2 models, a
tokenizer stand-in, prompts and edits, and small probes of the engine."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from semshare_ops.engine import ReferenceEntry, ReuseConfig, ReuseEngine  # noqa: E402


VOCAB = 512


MAX_POS = 1024


LAYERS = 4


KV_HEADS = 2


HEAD_DIM = 64 // 4


NEW = 12  # max_new_tokens of the generate calls that compare outputs


REF_LEN = 320


STATS_KEYS = {"mode", "prompt_tokens", "matched_tokens", "recomputed_tokens", "reuse_ratio", "kv_bytes",
              "kv_bytes_full", "ttft_ms", "similarity"}


class FakeTokenizer:
    """Enough of a tokenizer for the engine: call -> {"input_ids"}, decode, pad/eos ids, len."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab: int = VOCAB):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True):  # adds no special tokens either way
        return {"input_ids": [2 + (ord(c) * 7) % (self.vocab - 2) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids)

    def __len__(self):
        return self.vocab


def build_model(arch: str, seed: int):
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=KV_HEADS, intermediate_size=128, max_position_embeddings=MAX_POS)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    model.generation_config.eos_token_id = None  # always NEW tokens: outputs compare over their full length
    return model.eval()


TINY_WORDS = ["<unk>", "<pad>", "<s>", "</s>"] + "the a cat dog sat ran on in mat box and then".split()


def save_tiny_model(where, model_type: str = "llama", **extra):
    """A tiny random `model_type` (two layers, GQA 2/1) and a word-level tokenizer over TINY_WORDS saved as a local
    Hugging Face directory, as `--model` or `load_model` would find one; returns the model as saved."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as word_models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(word_models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(where)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=512, pad_token_id=1, bos_token_id=2, eos_token_id=3, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(where)
    return model


def engine_for(model, tokenizer, **config):
    return ReuseEngine(model, tokenizer, ReuseConfig(**config))


def rand_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def popcount_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Hamming distance of two packed int64 code rows, by python popcount (independent of the ops)."""
    return sum(bin((int(x) ^ int(y)) & (2**64 - 1)).count("1") for x, y in zip(a.tolist(), b.tolist()))


def edited(ref: list[int], kind: str, seed: int = 0) -> list[int]:
    new = rand_tokens(40, seed=200 + seed)
    if kind == "identical":
        return list(ref)
    if kind == "replace":
        return ref[:120] + new[:25] + ref[145:]
    if kind == "insert":
        return ref[:60] + new[:15] + ref[60:]
    if kind == "insert_start":
        return ref[:4] + new[:9] + ref[4:]
    if kind == "delete":
        return ref[:200] + ref[230:]
    if kind == "few":
        out = list(ref)
        for p in torch.randperm(len(ref) - 1, generator=torch.Generator().manual_seed(300 + seed))[:6].tolist():
            out[p] = 2 + (out[p] + 37) % (VOCAB - 2)
        return out
    raise ValueError(kind)


EDITS = ["replace", "insert", "delete", "few"]


def generate_with_logits(engine, prompt, **kwargs):
    """(GenerationOutput, first-token logits [V] fp32) through a forward hook on lm_head."""
    captured = []

    def hook(module, inputs, output):
        captured.append(output[0, -1].detach().float().clone())

    handle = engine.model.lm_head.register_forward_hook(hook)
    try:
        out = engine.generate(prompt, **kwargs)
    finally:
        handle.remove()
    assert captured, "lm_head was never called"
    return out, captured[0]


def kl(p_logits, q_logits) -> float:
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def clone_entry(entry: ReferenceEntry) -> dict:
    return {f.name: (getattr(entry, f.name).clone() if torch.is_tensor(getattr(entry, f.name))
                     else getattr(entry, f.name)) for f in dataclasses.fields(entry)}


def capture_assembled_cache(engine, monkeypatch) -> dict:
    """Wrap engine._decode to snapshot the prompt cache (positions 0..T-2) it receives before decoding."""
    seen = {}
    original = engine._decode

    def spy(ids, cache, *args, **kwargs):
        seen["keys"] = [layer.keys[: layer.used].clone() for layer in cache.layers]
        seen["values"] = [layer.values[: layer.used].clone() for layer in cache.layers]
        seen["kv_pos"] = [layer.kv_pos[: layer.used].clone() for layer in cache.layers]
        return original(ids, cache, *args, **kwargs)

    monkeypatch.setattr(engine, "_decode", spy)
    return seen


RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0]
