"""What the reuse engine must know about a Hugging Face decoder, and what it refuses.

Reuse re-rotates each reused key by its position delta with `rope_reuse_`, then drives the model's own decoder
layers by hand for the recomputed rows. That is exact only if (1) every layer's keys rotate as RoPE does with the
frequencies the engine passes, in the pair convention it passes, and (2) the engine calls the layers as the model's
own forward does. `Architecture.of(model)` finds out, per layer:

- the rotary embedding the layer uses: one `rotary_emb.inv_freq` for the model, or one per layer type
  (`rotary_emb.{layer_type}_inv_freq`, Gemma-3's local and global layers); the layers that share frequencies form
  a `RopeGroup`, and reuse runs one `rope_reuse_` per group;
- rope types whose frequencies change with the sequence length (`dynamic`, `longrope`): their original frequencies
  hold up to a length, and the engine serves requests only up to it (`max_positions`);
- features it cannot serve exactly, refused with a `ValueError` that names the feature and the model class: no
  rotary embedding (learned or ALiBi positions), M-RoPE, MLA, chunked or bidirectional attention.

What a static reading cannot tell (the pair convention, layers that apply no RoPE, anything a new family does
differently) the engine measures when it is made: it runs each layer on the same inputs at two positions and checks
that `rope_reuse_` maps one layer's keys onto the other's (`ReuseEngine._probe_rope`), and it checks its
layer-by-layer recompute against the model's own forward (`ReuseEngine._self_check`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

# Rope types whose frequencies depend on the sequence length, and the config key of the length up to which their
# original frequencies apply.
LENGTH_DEPENDENT_ROPE = {"dynamic": "max_position_embeddings", "longrope": "original_max_position_embeddings"}


class UnsupportedModelError(ValueError):
    """A model the engine cannot serve exactly: the message names the model class and the feature."""


def refusal(model, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{type(model).__name__}: {feature}; semshare cannot reuse its KV cache exactly, "
                                 "so it refuses this model")


@dataclass(frozen=True)
class RopeGroup:
    """Layers whose keys rotate with the same frequencies. inv_freq None: the layers apply no rotary embedding, and
    reused keys are copied as they are."""

    layers: Tuple[int, ...]
    layer_type: Optional[str]  # the rotary embedding's layer_type argument for these layers (None: single rotary)
    inv_freq: Optional[torch.Tensor]  # fp32 [rotary_dim / 2]
    neox: bool  # HF rotate_half pairs (i, i + rotary_dim / 2); False: interleaved (2i, 2i + 1)
    sign: int  # 1: keys turn by +position * inv_freq, as in HF's rotate_half; -1: by -position (nanochat)


@dataclass
class Architecture:
    layer_types: List[Optional[str]]  # per decoder layer: the rotary embedding's layer_type argument (or None)
    inv_freq: Dict[Optional[str], torch.Tensor]  # fp32 frequencies per rotary layer type (one 0 for a type without)
    max_positions: Optional[int]  # positions a request may use (prompt + new tokens)
    position_limit_reason: str  # why max_positions is what it is
    unrotated_types: frozenset = frozenset()  # layer types the model gives no position embeddings

    @classmethod
    def of(cls, model) -> "Architecture":
        cfg = model.config
        _refuse_static(model, cfg)
        rope_fields = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base")
        if not any("Rotary" in type(m).__name__ for m in model.modules()) and \
                not any(getattr(cfg, f, None) is not None for f in rope_fields):
            raise refusal(model, "no rotary position embedding: learned, absolute, ALiBi or no positions cannot be "
                                 "re-rotated")
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        rotary = getattr(decoder, "rotary_emb", None)
        if decoder is None or layers is None or rotary is None or not hasattr(decoder, "embed_tokens"):
            raise refusal(model, "a layout the engine cannot drive (it needs model.model.embed_tokens, .layers and "
                                 ".rotary_emb, as Llama-style decoders have)")
        num_layers = len(layers)
        if hasattr(rotary, "inv_freq") and not hasattr(rotary, "layer_types"):
            layer_types: List[Optional[str]] = [None] * num_layers
            rope_types = {None: getattr(rotary, "rope_type", "default")}
            unrotated = set()
        else:
            types = getattr(cfg, "layer_types", None)
            per_type = getattr(rotary, "rope_type", None)
            # A layer type the rotary embedding has no entry for takes no position embeddings (Ergo's global layers:
            # rope_parameters None); the probe still checks that its keys do not move with position.
            unrotated = {t for t in set(types or ()) if isinstance(per_type, dict) and t not in per_type
                         and not hasattr(rotary, f"{t}_inv_freq")}
            if types is None or not all(hasattr(rotary, f"{t}_inv_freq") or t in unrotated for t in set(types)):
                raise refusal(model, f"a rotary embedding ({type(rotary).__name__}) with neither one inv_freq nor "
                                     "one per layer type")
            layer_types = list(types[:num_layers])
            rope_types = {t: (per_type[t] if isinstance(per_type, dict) else per_type)
                          for t in set(layer_types) - unrotated}
        unrotated = frozenset(unrotated & set(layer_types))
        inv_freq, max_positions, reason = {}, getattr(cfg, "max_position_embeddings", None), "the model's context"
        for t in unrotated:
            # fp32, as rope_reuse_ takes it: turns a key by 0 at any delta, so reused keys are copied as they are
            inv_freq[t] = torch.zeros(1, dtype=torch.float32)
        for t, rope_type in rope_types.items():
            prefix = "" if t is None else f"{t}_"
            if rope_type in LENGTH_DEPENDENT_ROPE or "dynamic" in str(rope_type):
                # Exact only where the model keeps its original frequencies: up to a length, then refused.
                key = LENGTH_DEPENDENT_ROPE.get(rope_type, "max_position_embeddings")
                params = _rope_parameters(cfg, t)
                limit = params.get(key) or getattr(cfg, key, None)
                if not limit:
                    raise refusal(model, f"'{rope_type}' RoPE without {key}")
                # At the model's own context too (dynamic RoPE's limit is max_position_embeddings): the model runs
                # past it, so the rope is the reason a request is refused.
                if max_positions is None or limit <= max_positions:
                    max_positions = int(limit)
                    reason = (f"{type(model).__name__}'s '{rope_type}' RoPE changes its frequencies with the sequence "
                              f"length past {limit} positions")
                freq = getattr(rotary, f"{prefix}original_inv_freq")
            else:
                freq = getattr(rotary, f"{prefix}inv_freq")
            inv_freq[t] = freq.detach().float().clone()
        return cls(layer_types, inv_freq, max_positions, reason, unrotated)

    def position_embeddings(self, decoder, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int):
        """(cos, sin) for `layer` at `position_ids`, computed as the model's own forward computes them."""
        t = self.layer_types[layer]
        if t in self.unrotated_types:
            return None
        if t is None:
            return decoder.rotary_emb(hidden, position_ids)
        return decoder.rotary_emb(hidden, position_ids, t)


def declared_windows(cfg, num_layers: int) -> List[Optional[int]]:
    """The sliding window the config declares for each decoder layer (None: full attention). With `layer_types`, the
    "sliding_attention" layers; without, every layer when `sliding_window` is set (PhiMoE: its mask windows all).

    The engine applies the window each attention call passes (`hf.visibility`); some families apply theirs only
    through the attention mask (Qwen2-MoE, PhiMoE), which the engine replaces. The self-check compares the two."""
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return [None] * num_layers
    types = getattr(cfg, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:num_layers]]
    return [window] * num_layers


def _rope_parameters(cfg, layer_type: Optional[str]) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    return params if isinstance(params, dict) else {}


def _refuse_static(model, cfg) -> None:
    """Features that the config names and that no probe needs to confirm."""
    if getattr(cfg, "alibi", False):
        raise refusal(model, "ALiBi position biases (config.alibi)")
    if getattr(cfg, "kv_lora_rank", None) or getattr(cfg, "qk_rope_head_dim", None):
        raise refusal(model, "multi-head latent attention (MLA: kv_lora_rank / qk_rope_head_dim), whose cache holds "
                             "compressed latents and a separate rotary part")
    params = _rope_parameters(cfg, None)
    if "mrope_section" in params or getattr(cfg, "mrope_section", None):
        raise refusal(model, "M-RoPE (mrope_section): multimodal rotary positions")
    if getattr(cfg, "attention_chunk_size", None):
        raise refusal(model, "chunked local attention (attention_chunk_size)")
    no_rope = getattr(cfg, "no_rope_layers", None)  # Llama4: 1 where a layer rotates, 0 where it does not
    if getattr(cfg, "attn_temperature_tuning", False) and no_rope and not all(no_rope):
        # Llama4 scales its NoPE layers' queries by a factor of each query's position, which it counts from the
        # cache's length: a recomputed row (anywhere in a filled cache) would get the scale of a later position.
        raise refusal(model, "query temperature tuning in its layers without RoPE (attn_temperature_tuning), whose "
                             "query positions the model counts from the cache's length, not from position_ids")
    if getattr(cfg, "use_bidirectional_attention", False) or getattr(cfg, "is_causal", True) is False:
        raise refusal(model, "bidirectional attention (use_bidirectional_attention): not a causal decoder")
    if getattr(cfg, "is_encoder_decoder", False):
        raise refusal(model, "an encoder-decoder model")
