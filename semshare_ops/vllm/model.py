"""vLLM's own model, driven one decoder layer at a time on chosen rows of one request (worker process).

The connector recomputes a subset of a prompt's positions through the model's own layers (norms, projections,
rotary embedding, attention over the paged cache, MLP), as the HF engine does through transformers' layers. A
vLLM decoder layer reads its attention metadata and slot mapping from the forward context, so each call runs inside
a context of our own (`vllm.forward_context.set_forward_context`, which nests inside the step's): metadata built by
the runner's own CPU attention builder, in which every run of consecutive positions is one "sequence" whose keys
are positions 0..run end of the request's block table. Causal attention of any row set over the whole cache is then
exact, and the layer writes its rows' K/V into the cache at their slots, as in a normal step.

Served: the architectures whose decoder layers vLLM runs as Llama's do (input norm, self-attention on positions and
hidden states, post-attention norm, MLP or mixture of experts, the residual stream passed on beside the hidden states or
added inside the layer; `SUPPORTED_ARCHITECTURES`: Apertus, Cohere, Ernie 4.5, Gemma 1-3, GLM-4, Granite (its
multipliers included), Llama, Mistral, Mixtral, Nemotron, OLMoE, Phi-3 (longrope included), Qwen2, Qwen3 (keys
normalised per head before RoPE), the MoE versions of these and StableLM) on the CPU attention backend, one KV cache
group, no tensor or pipeline parallelism, the model's dtype in the cache (no fp8), causal attention (soft-capping
included) with no sliding window, sinks or ALiBi, no LoRA. Anything else is refused by name (`Unsupported`), and the
connector falls back to vLLM's own prefill for every request. At start-up a self-check runs a few random tokens through
the model's own forward and through the connector's layer-by-layer run and K/V-only pass, and every layer's K/V must
agree (`self_check`); then a probe measures each layer's RoPE on scratch blocks: the keys of the same inputs at
positions p and p + delta must differ by exactly the rotation `rope_reuse_` applies with the layer's inverse
frequencies, as the HF engine's probe checks its models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..ops import oracle
from . import layout

@dataclass(frozen=True)
class Architecture:
    """How vLLM's model runs an architecture's decoder layers, as far as the connector must know it."""
    layer: str  # the decoder layer class; the K/V-only pass calls its input norm and `self_attn`
    # True: layer(positions, hidden, residual) -> (hidden, residual), the residual added by the next norm (Llama's
    # fused add-norm). False: layer(positions, hidden) -> hidden, the residual added inside the layer (Granite's).
    fused_residual: bool = True
    # The model's forward scales `embed_input_ids`' output by `config.embedding_multiplier` before the first layer.
    embedding_multiplier: bool = False
    input_norm: str = "input_layernorm"  # the norm the layer runs on its input before `self_attn`


_GRANITE = dict(fused_residual=False, embedding_multiplier=True)
# Architecture -> how its decoder layers run. A class not listed here may order its parts otherwise.
SUPPORTED_ARCHITECTURES = {
    "ApertusForCausalLM": Architecture("ApertusDecoderLayer", input_norm="attention_layernorm"),  # per-head q/k norms
    # Cohere (Command R): LayerNorm, attention and MLP side by side on one norm, interleaved rotary pairs.
    "CohereForCausalLM": Architecture("CohereDecoderLayer"),
    # vLLM's Ernie 4.5 is its Llama with interleaved rotary pairs.
    "Ernie4_5ForCausalLM": Architecture("LlamaDecoderLayer"),
    "Ernie4_5_MoeForCausalLM": Architecture("Ernie4_5_MoeDecoderLayer"),
    "GemmaForCausalLM": Architecture("GemmaDecoderLayer"),  # embed_input_ids scales by sqrt(hidden_size) itself
    # Gemma-2/3: logit soft-capping (Gemma-2), norms after attention and MLP; their windows are refused below unless
    # the engine runs without them (disable_sliding_window). Gemma-3's local layers rotate with their own base.
    "Gemma2ForCausalLM": Architecture("Gemma2DecoderLayer"),
    "Gemma3ForCausalLM": Architecture("Gemma3DecoderLayer"),
    # GLM-4: RoPE on the first half of each head, interleaved pairs; norms after the attention and the MLP too.
    "Glm4ForCausalLM": Architecture("Glm4DecoderLayer"),
    "Glm4MoeForCausalLM": Architecture("Glm4MoeDecoderLayer"),  # RoPE on half of each head, neox pairs
    # Granite: multipliers on the embeddings, the attention scores (the attention's own scale) and each residual
    # branch (inside the layer).
    "GraniteForCausalLM": Architecture("GraniteDecoderLayer", **_GRANITE),
    "GraniteMoeForCausalLM": Architecture("GraniteMoeDecoderLayer", **_GRANITE),
    "GraniteMoeSharedForCausalLM": Architecture("GraniteMoeSharedDecoderLayer", **_GRANITE),
    "LlamaForCausalLM": Architecture("LlamaDecoderLayer"),
    "MistralForCausalLM": Architecture("MistralDecoderLayer"),
    "MixtralForCausalLM": Architecture("MixtralDecoderLayer"),
    "NemotronForCausalLM": Architecture("NemotronDecoderLayer"),  # RoPE on part of each head; LayerNorm1P
    "OlmoeForCausalLM": Architecture("OlmoeDecoderLayer"),  # q/k norms over the whole projections
    "Phi3ForCausalLM": Architecture("LlamaDecoderLayer"),  # vLLM's Phi-3 is its Llama with fused projections
    "Qwen2ForCausalLM": Architecture("Qwen2DecoderLayer"),
    "Qwen2MoeForCausalLM": Architecture("Qwen2MoeDecoderLayer"),
    "Qwen3ForCausalLM": Architecture("Qwen3DecoderLayer"),
    "Qwen3MoeForCausalLM": Architecture("Qwen3MoeDecoderLayer"),
    # StableLM: LayerNorms, RoPE on a quarter of each head. vLLM registers the config's StableLmForCausalLM as its
    # class StablelmForCausalLM: the config's name and the class's are both checked, so both are listed.
    "StableLmForCausalLM": Architecture("StablelmDecoderLayer", fused_residual=False),
    "StablelmForCausalLM": Architecture("StablelmDecoderLayer", fused_residual=False),
}


class Unsupported(Exception):
    """The model or the engine's configuration is one the connector does not serve; the message says which part."""


class _KVWritten(Exception):
    """Raised by the K/V-only pass once its layer's attention has been handed the K/V: what follows is not needed."""


def check_architecture(architectures) -> None:
    """Refuse, by name, architectures other than the supported ones (scheduler side: from the model config)."""
    names = list(architectures or [])
    if not names or any(name not in SUPPORTED_ARCHITECTURES for name in names):
        raise Unsupported(f"model architecture {names or 'unknown'} is not served by the semshare connector "
                          f"(served: {', '.join(SUPPORTED_ARCHITECTURES)})")


def check_config(vllm_config) -> None:
    """Refuse, by name, what the engine's configuration alone rules out (both sides: the scheduler before any
    request, the worker before its start-up probe)."""
    check_architecture(getattr(vllm_config.model_config, "architectures", None))
    if getattr(vllm_config, "lora_config", None) is not None:
        # vLLM's LoRA layers read the step's adapter mapping: rows recomputed outside the step would run under a
        # mapping made for other tokens, and a donor's K/V under one adapter is not the K/V under another.
        raise Unsupported("LoRA adapters (enable_lora): the connector recomputes rows with the base weights only")


@dataclass(frozen=True)
class RopeGroup:
    layers: Tuple[int, ...]
    inv_freq: torch.Tensor  # fp32, the layer's own (scaled) inverse frequencies
    neox: bool


def runs_of(rows: torch.Tensor) -> torch.Tensor:
    """[R, 2] (start, stop) of the maximal runs of consecutive positions in sorted, unique `rows`."""
    if rows.numel() == 0:
        return torch.empty(0, 2, dtype=torch.long)
    breaks = torch.nonzero(rows[1:] != rows[:-1] + 1)[:, 0] + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    stops = torch.cat([breaks, torch.tensor([rows.numel()])])
    return torch.stack([rows[starts], rows[stops - 1] + 1], dim=1)


class VllmModel:
    """What the worker-side connector needs of vLLM's model: its layers, their caches, and a way to run them."""

    def __init__(self, runner, vllm_config, kv_caches: Dict[str, torch.Tensor]):
        self.vllm_config = vllm_config
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        self.model = model
        name = type(model).__name__
        check_config(vllm_config)
        check_architecture([name])
        decoder = getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "embed_input_ids"):
            raise Unsupported(f"{name}: no model.layers / embed_input_ids")
        self.decoder = decoder
        self.layers = list(layers)
        self.architecture = SUPPORTED_ARCHITECTURES[name]
        expected = self.architecture.layer
        if any(type(layer).__name__ != expected for layer in self.layers):
            raise Unsupported(f"{name}: decoder layers other than {expected}")
        config = model.config
        if getattr(config, "ada_rms_norm_t_cond", False) or getattr(config, "dual_chunk_attention_config", None):
            # Mistral's time-conditioned norm needs an input the connector does not have; Qwen2's dual-chunk
            # attention is not the paged causal attention the recompute builds metadata for.
            raise Unsupported(f"{name}: time-conditioned norms or dual-chunk attention")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise Unsupported("tensor or pipeline parallelism (each rank would have to run the same rows in step)")
        if vllm_config.cache_config.cache_dtype not in ("auto", None):
            raise Unsupported(f"kv_cache_dtype {vllm_config.cache_config.cache_dtype!r} (quantised caches)")
        self.attentions = [layer.self_attn.attn for layer in self.layers]
        self.layer_names = [attn.layer_name for attn in self.attentions]
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing or len(kv_caches) != len(self.layers):
            raise Unsupported(f"KV caches do not map one to one onto the decoder layers (missing {missing[:3]})")
        self.kv_caches = [kv_caches[n] for n in self.layer_names]
        for attn in self.attentions:
            impl = attn.impl
            if type(impl).__name__ != "CPUAttentionBackendImpl":
                raise Unsupported(f"attention backend {type(impl).__name__}: the paged layout is known for the CPU "
                                  "backend only")
            # The CPU backend stores "none" as sliding_window -1 and logits_soft_cap 0.
            if impl.sliding_window not in (None, -1):
                # vLLM frees the blocks a window has passed, so a donor's K/V would have holes. A window as long as
                # the context binds nowhere: disable_sliding_window runs it as causal attention, max_model_len
                # capped at the window.
                raise Unsupported("sliding window (an engine started with disable_sliding_window=True runs the "
                                  "model with causal attention up to the window's length, which the connector serves)")
            # Soft-capping is the attention's own (the layer runs it), so it is served; ALiBi has no RoPE to move
            # keys by, and sinks are untested here.
            if impl.alibi_slopes is not None or getattr(impl, "sinks", None) is not None:
                raise Unsupported("ALiBi or attention sinks")
            if getattr(attn, "attn_type", "decoder") != "decoder":  # a str Enum: equal to its value
                raise Unsupported(f"attention type {attn.attn_type!s} (bidirectional or encoder attention)")
        groups = runner.attn_groups
        if len(groups) != 1 or len(groups[0]) != 1:
            raise Unsupported("more than one KV cache group or attention backend")
        self.builder = groups[0][0].get_metadata_builder()
        cache = self.kv_caches[0]
        self.num_blocks, self.kv_heads, self.block_size, two_d = cache.shape
        self.head_dim = two_d // 2
        self.dtype = cache.dtype
        self.isa = self.attentions[0].isa
        self.rope_groups = self._rope_groups()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def token_bytes(self) -> int:
        """K/V bytes of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype.itemsize

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's input for these tokens, as the model's forward makes it."""
        hidden = self.decoder.embed_input_ids(ids)
        if self.architecture.embedding_multiplier:
            hidden = hidden * self.model.config.embedding_multiplier
        return hidden

    def _rope_groups(self) -> List[RopeGroup]:
        found: Dict[tuple, List[int]] = {}
        tensors = {}
        for idx, layer in enumerate(self.layers):
            rotary = layer.self_attn.rotary_emb
            if type(rotary).__name__ == "Phi3LongRoPEScaledRotaryEmbedding":
                # vLLM takes one factor set for the whole engine at start-up (the long one when max_model_len
                # passes the original context), so every position rotates with the same frequencies; its
                # constructor allows neox pairs only. The probe below checks both.
                factors = rotary.long_factor if rotary.use_long_rope else rotary.short_factor
                inv_freq, neox = rotary._compute_inv_freq(factors).float(), True
            else:
                inv_freq, neox = rotary._compute_inv_freq(rotary.base).float(), rotary.is_neox_style
            if 2 * inv_freq.numel() != rotary.rotary_dim or rotary.rotary_dim > self.head_dim:
                raise Unsupported(f"rotary embedding {type(rotary).__name__} of layer {idx}")
            key = (tuple(inv_freq.tolist()), bool(neox))
            tensors[key] = inv_freq
            found.setdefault(key, []).append(idx)
        return [RopeGroup(tuple(layers), tensors[key], key[1]) for key, layers in found.items()]

    # ---- running layers --------------------------------------------------------------------------------------------

    def metadata(self, rows: torch.Tensor, block_ids: torch.Tensor):
        """Forward-context arguments for queries at sorted positions `rows` of one request (block table
        `block_ids`): each run of consecutive rows is a sequence ending at its last row, sharing the block table."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        runs = runs_of(rows)
        lengths = (runs[:, 1] - runs[:, 0]).to(torch.int32)
        starts = torch.zeros(len(runs) + 1, dtype=torch.int32)
        starts[1:] = torch.cumsum(lengths, 0)
        seq_lens = runs[:, 1].to(torch.int32)
        table = block_ids.to(torch.int32)[None].expand(len(runs), -1).contiguous()
        slots = layout.slots_of(block_ids, rows, self.block_size)
        common = CommonAttentionMetadata(
            query_start_loc=starts, query_start_loc_cpu=starts, seq_lens=seq_lens, num_reqs=len(runs),
            num_actual_tokens=int(rows.numel()), max_query_len=int(lengths.max()), max_seq_len=int(seq_lens.max()),
            block_table_tensor=table, slot_mapping=slots, causal=True, positions=rows)
        md = self.builder.build(common_prefix_len=0, common_attn_metadata=common)
        return {n: md for n in self.layer_names}, {n: slots for n in self.layer_names}

    def run_layer(self, idx: int, rows: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                  block_ids: torch.Tensor, context=None):
        """Decoder layer `idx` on positions `rows` (sorted, unique) of one request; K/V go into its paged cache.
        Returns (hidden, residual) as the model's own forward passes them to the next layer (residual None for
        layers that add it inside)."""
        from vllm.forward_context import set_forward_context

        md, slot_mapping = context if context is not None else self.metadata(rows, block_ids)
        # vLLM's attention kernels size their work by the metadata and their output by the hidden states: a mismatch
        # reads and writes past a buffer (a heap corruption, not an error), so it is refused here.
        n = rows.numel()
        if hidden.shape[0] != n or (residual is not None and residual.shape[0] != n) or any(
                slots.numel() != n for slots in slot_mapping.values()):
            raise ValueError(f"decoder layer {idx}: {n} rows, hidden states for {hidden.shape[0]}"
                             + ("" if residual is None else f", a residual for {residual.shape[0]}")
                             + f", cache slots for {next(iter(slot_mapping.values())).numel()}")
        with set_forward_context(md, self.vllm_config, slot_mapping=slot_mapping):
            if self.architecture.fused_residual:
                return self.layers[idx](rows, hidden, residual)
            out = self.layers[idx](rows, hidden)
            # StableLM's layers return (hidden, residual) and its model passes on the hidden states only.
            return (out[0] if isinstance(out, tuple) else out), None

    def write_kv(self, idx: int, rows: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                 block_ids: torch.Tensor) -> None:
        """Decoder layer `idx` on positions `rows` only up to its cache write: the layer's own input norm and
        attention module up to its attention call (QKV projection, per-head norms, rotary embedding), and the K/V
        written as `write` writes them (what `run_layer` writes, bit for bit: the same modules on the same rows).
        No attention, no MLP: for rows whose output the next layer does not take. `hidden` and `residual` are left
        as they are (vLLM's fused add-norm may work in place)."""
        layer = self.layers[idx]
        norm = getattr(layer, self.architecture.input_norm)
        normed = norm(hidden.clone()) if residual is None else norm(hidden.clone(), residual.clone())
        if isinstance(normed, tuple):  # (normed, residual): the fused add-norm, or Cohere's norm, which returns both
            normed = normed[0]
        n, slots = rows.numel(), layout.slots_of(block_ids, rows, self.block_size)

        def write_and_stop(query, key, value, *args, **kwargs):
            self.write(idx, key.reshape(n, self.kv_heads, self.head_dim),
                       value.reshape(n, self.kv_heads, self.head_dim), slots)
            raise _KVWritten

        # The layer's own attention module up to its attention call (projections, per-head norms, rotary
        # embedding: whatever the architecture does there), then stop: the attention, output projection and MLP
        # are the rows' output, which nothing reads.
        attention = self.attentions[idx]
        attention.forward = write_and_stop  # an instance attribute: shadows the class's forward for this call
        try:
            layer.self_attn(positions=rows, hidden_states=normed)
        except _KVWritten:
            pass
        else:
            raise RuntimeError(f"decoder layer {idx}'s attention module never called its attention")
        finally:
            del attention.forward

    def read(self, idx: int, block_ids: torch.Tensor, start: int, stop: int):
        return layout.read_range(self.kv_caches[idx], block_ids, start, stop, self.isa)

    def read_rows(self, idx: int, block_ids: torch.Tensor, positions: torch.Tensor):
        """K and V [n, H, D] of sorted, unique positions of one request in layer idx."""
        if positions.numel() and int(positions[-1] - positions[0]) + 1 == positions.numel():  # one range
            return self.read(idx, block_ids, int(positions[0]), int(positions[-1]) + 1)
        return layout.read_slots(self.kv_caches[idx], layout.slots_of(block_ids, positions, self.block_size),
                                 self.isa)

    def read_all(self, block_ids: torch.Tensor, start: int, stop: int):
        return layout.read_layers(self.kv_caches, block_ids, start, stop, self.isa)

    def write(self, idx: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        layout.write_slots(self.attentions[idx], self.kv_caches[idx], key, value, slots)

    # ---- start-up checks -------------------------------------------------------------------------------------------

    def _scratch_blocks(self, positions: int) -> torch.Tensor:
        """Block ids at the end of the pool for `positions` positions of a start-up check (vLLM has handed none out
        yet; each check clears them after)."""
        need = (positions + self.block_size - 1) // self.block_size
        if need >= self.num_blocks:
            raise Unsupported("the KV cache is too small for the start-up checks")
        return torch.arange(self.num_blocks - need, self.num_blocks, dtype=torch.long)

    def _clear_scratch(self, block_ids: torch.Tensor, layers=None) -> None:
        """Zero the scratch blocks in the given layers' caches (all by default). An assignment, not `zero_()`:
        indexing by a tensor of ids gathers a copy, whose `zero_()` would leave the cache as it was."""
        for idx in range(self.num_layers) if layers is None else layers:
            self.kv_caches[idx][block_ids] = 0

    @torch.inference_mode()
    def self_check(self, n: int = 12) -> None:
        """The model's own forward over n random tokens at positions 0..n-1, then the connector's way of running the
        same tokens (`embed`, then `run_layer` layer by layer, and `write_kv` in each layer): every layer's K/V must
        agree. What the connector does not know about an architecture (a multiplier between the embeddings and the
        first layer, something done between layers, a residual stream passed on otherwise, an input norm other than
        the one named) fails here, before any request, as a refusal that names the layer. The forward is the
        decoder's own Python method, not its compiled `__call__`: the same modules, run eagerly."""
        from vllm.forward_context import set_forward_context

        block_ids = self._scratch_blocks(n)
        ids = torch.randint(0, self.model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
        rows = torch.arange(n)
        context = self.metadata(rows, block_ids)
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2

        def check(idx, what, got, want):
            for name, a, b in (("keys", got[0], want[0]), ("values", got[1], want[1])):
                err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                if not err <= tol:
                    raise Unsupported(f"decoder layer {idx}: the {name} of {what} differ from the model's own forward "
                                      f"(relative error {err:.3g}): the connector does not run this model as vLLM does")

        try:
            with set_forward_context(context[0], self.vllm_config, slot_mapping=context[1]):
                self.decoder.forward(ids, rows, None)
            reference = [tuple(t.clone() for t in self.read(idx, block_ids, 0, n)) for idx in range(self.num_layers)]
            hidden, residual = self.embed(ids), None
            for idx in range(self.num_layers):
                self._clear_scratch(block_ids, [idx])
                self.write_kv(idx, rows, hidden, residual, block_ids)
                check(idx, "the K/V-only pass", self.read(idx, block_ids, 0, n), reference[idx])
                self._clear_scratch(block_ids, [idx])
                hidden, residual = self.run_layer(idx, rows, hidden, residual, block_ids, context)
                check(idx, "the layer run alone", self.read(idx, block_ids, 0, n), reference[idx])
        finally:
            self._clear_scratch(block_ids)

    @torch.inference_mode()
    def probe_rope(self, n: int = 4, delta: int = 37) -> None:
        """Each layer on the same inputs at positions 0..n-1 and delta..delta+n-1 (scratch blocks at the end of the
        pool, zeroed after): the second keys must be the first rotated by delta with the layer's inv_freq and pair
        convention, and the values equal. Raises Unsupported otherwise."""
        block_ids = self._scratch_blocks(n + delta)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.model.config.vocab_size, (n,), generator=gen)
        hidden = self.embed(ids)
        hidden = torch.cat([hidden, hidden])
        rows = torch.cat([torch.arange(n), torch.arange(n) + delta])
        tol = 1e-4 if self.dtype == torch.float32 else 2e-2
        try:
            for group in self.rope_groups:
                for idx in group.layers:
                    self.run_layer(idx, rows, hidden.clone(), None, block_ids)
                    k1, v1 = self.read(idx, block_ids, 0, n)
                    k2, v2 = self.read(idx, block_ids, delta, delta + n)
                    rotated = oracle.rotate(k1.float(), torch.full((n,), delta), group.inv_freq, group.neox)
                    scale = k2.float().abs().max().clamp_min(1e-30)
                    err = ((rotated - k2.float()).abs().max() / scale).item()
                    if not err <= tol or not torch.equal(v1, v2):
                        raise Unsupported(f"the keys of decoder layer {idx} do not move with position as RoPE with "
                                          f"its rotary embedding's frequencies (relative error {err:.3g})")
        finally:
            self._clear_scratch(block_ids)
