"""Reading vLLM's paged CPU cache (semshare_ops.vllm.layout) inverts vLLM's own write kernel, bit for bit, for the
closed-form layout of the vec and vec16 ISAs and for the measured permutation any other ISA would take
(`make test-vllm`)."""
import pytest
import torch

pytest.importorskip("vllm")
from vllm import _custom_ops as vllm_ops  # noqa: E402

from semshare_ops.vllm import layout  # noqa: E402

BLOCKS, HEADS, BLOCK_SIZE, HEAD_DIM = 6, 3, 32, 64


def _written(dtype, seed=0, isa="vec"):
    """A random cache (not zeros: a read of the wrong place must show), and random K/V written at random slots."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen).to(dtype)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=gen)[:70]
    key = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).to(dtype)
    value = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).to(dtype)
    key_cache, value_cache = layout.split_kv(cache)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    return cache, slots, key, value


@pytest.mark.parametrize("isa", layout.FORMULA_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_slots_inverts_the_write_kernel(dtype, isa):
    cache, slots, key, value = _written(dtype, isa=isa)
    got_k, got_v = layout.read_slots(cache, slots, isa)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)


@pytest.mark.parametrize("isa", layout.FORMULA_ISAS)
def test_measured_permutation_agrees_with_the_formula(isa):
    """The probe (the path of ISAs without a closed form) finds the layout the formula reads."""
    kpos, vpos = layout.probe_permutation(isa, torch.float32, BLOCK_SIZE, HEAD_DIM)
    offsets, dims = torch.meshgrid(torch.arange(BLOCK_SIZE), torch.arange(HEAD_DIM), indexing="ij")
    assert torch.equal(kpos, dims * BLOCK_SIZE + offsets)  # K column-major [D, N]
    assert torch.equal(vpos, offsets * HEAD_DIM + dims)  # V row-major [N, D]


@pytest.mark.parametrize("isa", layout.FORMULA_ISAS)
def test_read_range_follows_the_block_table(isa):
    cache, _, _, _ = _written(torch.float32, seed=1, isa=isa)
    table = torch.tensor([4, 1, 5, 0])
    start, stop = 7, 3 * BLOCK_SIZE + 5
    keys, values = layout.read_range(cache, table, start, stop, isa)
    ref_k, ref_v = layout.read_slots(cache, layout.slots_of(table, torch.arange(start, stop), BLOCK_SIZE), isa)
    assert keys.shape == (stop - start, HEADS, HEAD_DIM)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
