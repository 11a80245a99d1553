"""vLLM's paged KV cache on the CPU (the CPU_ATTN backend of vLLM 0.32) and its inverse.

A layer's cache, as `register_kv_caches` hands it over, is `[num_blocks, num_kv_heads, block_size, 2 * head_size]`;
the backend's `do_kv_cache_update` views it as `[num_blocks, H, 2 * block_size, head_size]` and splits dim 2 in two:
each (block, head) owns block_size x head_size K values, then as many V values. Inside those regions the order is the
ISA's (`cpu_attn_reshape_and_cache`): for "vec" and "vec16" (x86 without AMX, fp32 or bf16) K is stored
column-major `[head_size, block_size]` and V row-major `[block_size, head_size]`. Other ISAs (amx, neon, ...) are
read through the permutation their own write kernel is measured to apply (`probe_permutation`).

Writing always goes through the attention layer's own `do_kv_cache_update`, whatever the layout: vLLM has no
inverse, so this module supplies reading, and `tests/vllm_connector/test_layout.py` checks that reading inverts
writing bit for bit. slot = block_id * block_size + offset.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Tuple

import torch

FORMULA_ISAS = ("vec", "vec16")


def split_kv(kv_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each [B, H, N, D], exactly the views do_kv_cache_update writes through."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def slots_of(block_ids: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots (int64) of token positions of one request whose block table is `block_ids`."""
    return block_ids[positions // block_size] * block_size + positions % block_size


@lru_cache(maxsize=None)
def probe_permutation(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> Tuple[torch.Tensor, ...]:
    """Where an ISA's write puts (offset, dim) inside a (block, head) K region and V region: two int64
    [block_size, head_size] index maps. Measured by writing each element's id through the kernel, as two base-256
    digits so that ids stay exact in bf16 and fp16."""
    from vllm import _custom_ops as vllm_ops

    n, d = block_size, head_size
    ids = torch.arange(n * d).view(n, d)
    where = []
    for part in ("k", "v"):
        found = torch.zeros(n * d, dtype=torch.long)
        for scale in (1, 256):
            digit = ((ids // scale) % 256).float() + 1.0  # 1..256: 0 marks "not written"
            cache = torch.zeros(1, 1, n, 2 * d, dtype=dtype)
            key_cache, value_cache = split_kv(cache)
            tokens = digit[:, None, :].to(dtype).contiguous()
            zeros = torch.zeros_like(tokens)
            key, value = (tokens, zeros) if part == "k" else (zeros, tokens)
            vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(n), isa)
            region = (key_cache if part == "k" else value_cache)[0, 0].reshape(-1).float() - 1.0
            found += region.round().long() * scale  # found[p] = id of the element stored at p
        position = torch.empty(n * d, dtype=torch.long)
        position[found] = torch.arange(n * d)
        where.append(position.view(n, d))
    return tuple(where)


def read_slots(kv_cache: torch.Tensor, slots: torch.Tensor, isa: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given slots, token-major [T, H, D] copies."""
    blocks, heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    key_cache, value_cache = split_kv(kv_cache)
    block, offset = slots // block_size, slots % block_size
    if isa in FORMULA_ISAS:
        # Advanced indices split by a slice put the indexed dim first: [T, H, D].
        return key_cache.view(blocks, heads, d, block_size)[block, :, :, offset], value_cache[block, :, offset, :]
    kpos, vpos = probe_permutation(isa, kv_cache.dtype, block_size, d)
    flat_k = key_cache.reshape(blocks, heads, block_size * d)
    flat_v = value_cache.reshape(blocks, heads, block_size * d)
    keys = flat_k[block[:, None, None], torch.arange(heads)[None, :, None], kpos[offset][:, None, :]]
    values = flat_v[block[:, None, None], torch.arange(heads)[None, :, None], vpos[offset][:, None, :]]
    return keys, values


def read_range(kv_cache: torch.Tensor, block_ids: torch.Tensor, start: int, stop: int,
               isa: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """K and V [stop - start, H, D] of positions start..stop-1 of one request: whole blocks gathered and transposed
    at once on the formula ISAs (a saved prompt or a layer's reused rows are contiguous ranges), slot by slot
    otherwise."""
    blocks, heads, block_size, two_d = kv_cache.shape
    if isa not in FORMULA_ISAS or stop <= start:
        positions = torch.arange(start, stop)
        return read_slots(kv_cache, slots_of(block_ids, positions, block_size), isa)
    d = two_d // 2
    first, last = start // block_size, (stop - 1) // block_size + 1
    table = block_ids[first:last]
    key_cache, value_cache = split_kv(kv_cache)
    keys = key_cache.view(blocks, heads, d, block_size)[table].permute(0, 3, 1, 2).reshape(-1, heads, d)
    values = value_cache[table].permute(0, 2, 1, 3).reshape(-1, heads, d)
    skip = start - first * block_size
    return keys[skip: skip + stop - start], values[skip: skip + stop - start]


def write_slots(attention, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slots: torch.Tensor) -> None:
    """Token-major K/V [T, H, D] into a layer's paged cache at `slots`, through the layer's own update function."""
    attention.impl.do_kv_cache_update(attention, key.contiguous(), value.contiguous(), kv_cache, slots)


def read_layers(kv_caches: Sequence[torch.Tensor], block_ids: torch.Tensor, start: int, stop: int,
                isa: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """`read_range` over every layer: K and V [L, stop - start, H, D]."""
    pairs = [read_range(cache, block_ids, start, stop, isa) for cache in kv_caches]
    return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
