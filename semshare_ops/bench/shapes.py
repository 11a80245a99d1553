"""Model shapes the benchmarks run at (one table: the real configs' sizes), and random-weight models of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

# The real configs' sizes; models built from them have random weights (speed only).
SHAPE_CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768),
}


@dataclass(frozen=True)
class ModelShape:
    """What an op benchmark needs of a model: layers, query and KV heads, head dim, hidden size."""

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int

    @classmethod
    def of(cls, name: str) -> "ModelShape":
        c = SHAPE_CONFIGS[name]
        return cls(name, c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                   c["hidden_size"] // c["num_attention_heads"], c["hidden_size"])


SHAPES = {name: ModelShape.of(name) for name in SHAPE_CONFIGS}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class IdTokenizer:
    """What the engine needs of a tokenizer when prompts are token ids (random-weight models)."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text: str) -> Dict:
        return {"input_ids": [2 + (ord(c) * 7919) % (self.vocab - 2) for c in text]}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(int(i)) for i in ids)

    def __len__(self) -> int:
        return self.vocab


def random_model(shape: str, layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16,
                 device: str = "cpu", seed: int = 0):
    """(model, IdTokenizer) of a real architecture's shape with random weights; `layers` truncates the depth."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPE_CONFIGS:
        raise ValueError(f"shape: unknown {shape!r}; expected one of {sorted(SHAPE_CONFIGS)}")
    kwargs = dict(SHAPE_CONFIGS[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers: expected >= 1, got {layers}")
        kwargs["num_hidden_layers"] = layers
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if shape.startswith("qwen") else \
        (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: an 8B model in fp32 first would not fit in RAM
    try:
        with torch.device(device):
            model = model_cls(config_cls(**kwargs, tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(default_dtype)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.float()
    return model.eval(), IdTokenizer(kwargs["vocab_size"])


def random_prompt(vocab: int, length: int, seed: int = 0) -> List[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (length,), generator=gen).tolist()


