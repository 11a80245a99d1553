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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_permutation_agrees_with_the_formula(isa, dtype):
    """The probe (the path of ISAs without a closed form) finds the layout the formula reads."""
    kpos, vpos = layout.probe_permutation(isa, dtype, BLOCK_SIZE, HEAD_DIM)
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


def test_slots_of_hand_worked():
    # block table [4, 1, 5], 32 slots a block: position 0 -> block 4 offset 0, 31 -> block 4 offset 31,
    # 32 -> block 1 offset 0, 70 -> block 5 offset 6
    slots = layout.slots_of(torch.tensor([4, 1, 5]), torch.tensor([0, 31, 32, 70]), BLOCK_SIZE)
    assert slots.tolist() == [128, 159, 32, 166]


def _permuting_kernel(real):
    """vLLM's write kernel, plus an ISA "perm" whose K and V regions are laid out by two fixed random permutations
    of (offset, dim): the layout of an ISA without a closed form, which only the measured permutation can read."""

    def kernel(key, value, key_cache, value_cache, slots, isa, *args, **kwargs):
        if isa != "perm":
            return real(key, value, key_cache, value_cache, slots, isa, *args, **kwargs)
        n, d = key_cache.shape[2:]
        perm_k, perm_v = _perms(n, d)
        for t, slot in enumerate(slots.tolist()):
            block, offset = divmod(slot, n)
            for h in range(key.shape[1]):
                key_cache[block, h].view(-1)[perm_k[offset * d: (offset + 1) * d]] = key[t, h]
                value_cache[block, h].view(-1)[perm_v[offset * d: (offset + 1) * d]] = value[t, h]

    return kernel


def _perms(n, d):
    gen = torch.Generator().manual_seed(1000 * n + d)
    return torch.randperm(n * d, generator=gen), torch.randperm(n * d, generator=gen)


@pytest.fixture
def perm_isa(monkeypatch):
    monkeypatch.setattr(vllm_ops, "cpu_attn_reshape_and_cache", _permuting_kernel(vllm_ops.cpu_attn_reshape_and_cache))
    return "perm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_permutation_reads_an_isa_without_formula(perm_isa, dtype):
    """The probe measures the "perm" ISA's permutations exactly (ids over two base-256 digits stay exact in bf16), and
    read_slots and read_range read its writes back bit for bit."""
    kpos, vpos = layout.probe_permutation(perm_isa, dtype, BLOCK_SIZE, HEAD_DIM)
    perm_k, perm_v = _perms(BLOCK_SIZE, HEAD_DIM)
    assert torch.equal(kpos, perm_k.view(BLOCK_SIZE, HEAD_DIM)) and torch.equal(vpos, perm_v.view(BLOCK_SIZE, HEAD_DIM))
    cache, slots, key, value = _written(dtype, seed=2, isa=perm_isa)
    got_k, got_v = layout.read_slots(cache, slots, perm_isa)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)
    table = slots[:4] // BLOCK_SIZE  # blocks that hold written slots, in a random order
    start, stop = 5, 2 * BLOCK_SIZE + 9
    keys, values = layout.read_range(cache, table, start, stop, perm_isa)
    positions = torch.arange(start, stop)
    ref_k, ref_v = layout.read_slots(cache, table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE,
                                     perm_isa)
    assert keys.shape == (stop - start, HEADS, HEAD_DIM) and torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    written = {int(s): i for i, s in enumerate(slots)}
    for p in range(start, stop):  # wherever the range holds a written slot, it reads what was written there
        slot = int(table[p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
        if slot in written:
            assert torch.equal(keys[p - start], key[written[slot]])
            assert torch.equal(values[p - start], value[written[slot]])


@pytest.mark.parametrize("isa", layout.FORMULA_ISAS)
def test_read_range_reads_the_written_tokens(isa):
    """A request's K/V written at its own slots through the kernel come back from read_range, and read_layers
    stacks the layers in order."""
    gen = torch.Generator().manual_seed(4)
    table = torch.tensor([3, 0, 5, 1])
    start, stop = BLOCK_SIZE + 9, 3 * BLOCK_SIZE + 1  # from inside the table's second block to its fourth's first
    positions = torch.arange(start, stop)
    slots = table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    caches, keys, values = [], [], []
    for _ in range(2):
        cache = torch.randn(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen)
        key, value = (torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen) for _ in range(2))
        vllm_ops.cpu_attn_reshape_and_cache(key, value, *layout.split_kv(cache), slots, isa)
        caches.append(cache), keys.append(key), values.append(value)
    got_k, got_v = layout.read_range(caches[1], table, start, stop, isa)
    assert torch.equal(got_k, keys[1]) and torch.equal(got_v, values[1])
    got_k, got_v = layout.read_layers(caches, table, start, stop, isa)
    assert torch.equal(got_k, torch.stack(keys)) and torch.equal(got_v, torch.stack(values))
    got_k, got_v = layout.read_range(caches[0], table, start + 3, start + 3 + 1, isa)  # one token
    assert torch.equal(got_k, keys[0][3:4]) and torch.equal(got_v, values[0][3:4])


@pytest.mark.parametrize("start", [0, 5])
def test_read_range_of_no_positions(start):
    cache, _, _, _ = _written(torch.float32, seed=3)
    keys, values = layout.read_range(cache, torch.tensor([2, 4]), start, start, "vec")
    assert keys.shape == values.shape == (0, HEADS, HEAD_DIM)


def test_write_slots_goes_through_the_layers_update():
    """write_slots hands the layer, contiguous K and V, the cache and the slots to the layer's do_kv_cache_update,
    in vLLM's order; what the kernel writes there reads back."""
    seen = []

    class Impl:
        def do_kv_cache_update(self, layer, key, value, kv_cache, slots):
            seen.append((layer, key.is_contiguous(), value.is_contiguous()))
            vllm_ops.cpu_attn_reshape_and_cache(key, value, *layout.split_kv(kv_cache), slots, "vec")

    attention = type("Attention", (), {"impl": Impl()})()
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(BLOCKS, HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen)
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=gen)[:20]
    key = torch.randn(HEADS, len(slots), HEAD_DIM, generator=gen).transpose(0, 1)  # [T, H, D], not contiguous
    value = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen)
    layout.write_slots(attention, cache, key, value, slots)
    assert seen == [(attention, True, True)]
    got_k, got_v = layout.read_slots(cache, slots, "vec")
    assert torch.equal(got_k, key) and torch.equal(got_v, value)


@pytest.mark.parametrize("isa", layout.FORMULA_ISAS)
def test_read_slots_with_blocks_of_another_size(isa):
    """16 tokens a block (2 * block_size no longer equals head_size): split_kv and the reads still invert the kernel."""
    gen = torch.Generator().manual_seed(6)
    cache = torch.randn(BLOCKS, HEADS, 16, 2 * HEAD_DIM, generator=gen)
    slots = torch.randperm(BLOCKS * 16, generator=gen)[:30]
    key, value = (torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    vllm_ops.cpu_attn_reshape_and_cache(key, value, *layout.split_kv(cache), slots, isa)
    got_k, got_v = layout.read_slots(cache, slots, isa)
    assert torch.equal(got_k, key) and torch.equal(got_v, value)
    flat = cache.reshape(BLOCKS, HEADS, -1)  # each (block, head): 16 x HEAD_DIM K values, then as many V values
    key_cache, value_cache = layout.split_kv(cache)
    assert torch.equal(key_cache.reshape(BLOCKS, HEADS, -1), flat[:, :, :16 * HEAD_DIM])
    assert torch.equal(value_cache.reshape(BLOCKS, HEADS, -1), flat[:, :, 16 * HEAD_DIM:])
