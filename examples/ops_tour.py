"""A tour of the four semshare ops on random data, through the compiled extension (`make demo`).

Each step prints what it did and checks itself against semshare_ops.ops.oracle, the spec in plain torch.
This is also the shortest example of calling the ops directly, as another engine would.
"""
import time

import torch

import semshare_ops as ss
from semshare_ops.ops import oracle as ref


def timed(fn, *args):
    """Milliseconds of one call after a warm-up call (first-call costs excluded), the device synchronised."""
    fn(*args)  # every op here is idempotent on its inputs (rope_reuse_ writes the same values again)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, (time.perf_counter() - start) * 1e3


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"semshare_ops {ss.__version__} on {device}, torch {torch.__version__}\n")
    # Shapes of SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, head dim 64, hidden 576.
    layers, hq, hkv, d, hidden, tokens = 30, 9, 3, 64, 576, 1024

    # 1. SimHash codes of token embeddings, 128 bits = 2 int64 words per token.
    planes = torch.randn(hidden, 128, device=device)
    ref_emb = torch.randn(tokens, hidden, device=device)
    tgt_emb = ref_emb + 0.3 * torch.randn_like(ref_emb)  # a noisy copy: most tokens should find their twin
    codes_ref, ms = timed(ss.simhash, ref_emb, planes)
    codes_tgt = ss.simhash(tgt_emb, planes)
    print(f"simhash      {tokens} x {hidden} -> {tuple(codes_ref.shape)} int64 codes in {ms:.2f} ms; "
          f"equal to reference: {torch.equal(codes_ref, ref.simhash(ref_emb, planes))}")

    # 2. Nearest reference token of every target token by Hamming distance.
    (dist, idx), ms = timed(ss.hamming_topk, codes_tgt, codes_ref, 1)
    hits = (idx[:, 0] == torch.arange(tokens, device=device)).float().mean().item()
    print(f"hamming_topk {tokens} x {tokens}, k=1 in {ms:.2f} ms: {hits:.0%} of target tokens matched their twin "
          f"(median distance {dist.float().median().item():.0f} of 128 bits)")

    # 3. Assemble a target cache from a reference cache: every layer in one call, keys re-rotated by the shift.
    k_src = torch.randn(layers, tokens, hkv, d, device=device, dtype=torch.bfloat16)
    v_src = torch.randn_like(k_src)
    k_dst, v_dst = torch.randn_like(k_src), torch.randn_like(v_src)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
    src = torch.arange(tokens - 16, device=device)  # 16 tokens were inserted at position 100 of the target
    dst = torch.where(src < 100, src, src + 16)
    delta = dst - src
    k_chk, v_chk = k_dst.clone(), v_dst.clone()
    _, ms = timed(ss.rope_reuse_, k_dst, v_dst, k_src, v_src, src, dst, delta, inv_freq, True)
    ref.rope_reuse_(k_chk, v_chk, k_src, v_src, src, dst, delta, inv_freq, True)
    moved = 2 * (k_src[:, src].numel() + v_src[:, src].numel()) * k_src.element_size()
    print(f"rope_reuse_  {len(src)} tokens x {layers} layers in {ms:.2f} ms ({moved / ms / 1e6:.1f} GB/s); "
          f"max |diff| vs reference {(k_dst.float() - k_chk.float()).abs().max().item():.2e}, "
          f"V bit-exact: {torch.equal(v_dst, v_chk)}")

    # 4. Recompute the 16 inserted tokens plus the last one against the assembled cache of one layer.
    q_pos = torch.cat([torch.arange(100, 116, device=device), torch.tensor([tokens - 1], device=device)])
    q = torch.randn(len(q_pos), hq, d, device=device, dtype=torch.bfloat16)
    (out, lse), ms = timed(ss.partial_attn, q, k_dst[0], v_dst[0], q_pos)
    out_ref, lse_ref = ref.partial_attn(q, k_dst[0], v_dst[0], q_pos)
    print(f"partial_attn {len(q_pos)} queries x {tokens} keys (GQA {hq}/{hkv}) in {ms:.2f} ms; "
          f"max |diff| vs reference: out {(out.float() - out_ref.float()).abs().max().item():.2e}, "
          f"lse {(lse - lse_ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
