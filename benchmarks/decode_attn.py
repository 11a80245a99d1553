"""partial_attn with few queries on CPU (decoding; the small calls of the lookahead and of decode_recompute): time,
K/V bytes read per second against the machine's read bandwidth, and torch SDPA on the same call, timed in turn.
With --baseline-tree, the same measurements run from another checkout (its own built extension) in alternating
rounds, so the two kernels meet the same spells of a shared machine.

    python benchmarks/decode_attn.py [--lengths 1024 4096 16384] [--queries 1 4 16 64] [--rounds 2]
                                     [--model smollm2-135m] [--dtype float32] [--baseline-tree DIR]
                                     [--out benchmarks/results/decode_attn_cpu.json]

Each call reads a different layer's K/V (the model's heads, from bench.shapes: SmolLM2-135M by default, 9 query
heads, 3 KV heads of 64; one cache per layer, at most 2 GiB of them), as a decode step does, so a cache that fits
in L3 is not read from it on every call. The queries are the last positions of the cache (causal); bytes counted:
K and V of every key, read once. SDPA gets K/V head-major (as HF's cache keeps them) with `enable_gqa`, no mask for
one query and the boolean causal mask otherwise. The read ceiling is `torch.sum` over 256 MiB.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_BYTES = 2 * 2**30  # the most that the layers' K/V of one length take


def worker(lengths, queries, model, dtype_name) -> list:
    import torch

    import semshare_ops
    from semshare_ops.bench.shapes import ModelShape
    from semshare_ops.bench.timing import paired_median_us

    shape = ModelShape.of(model)
    dtype = getattr(torch, dtype_name)

    torch.manual_seed(0)
    big = torch.randn(64 * 2**20)
    read_gbps = big.numel() * 4 / paired_median_us([big.sum], "cpu", repeat=5)[0] / 1e3
    del big
    records = []
    for nk in lengths:
        kv_bytes = 2 * nk * shape.kv_heads * shape.head_dim * dtype.itemsize  # one layer's K and V
        layers = max(2, min(shape.layers, CACHE_BYTES // kv_bytes))
        caches = [tuple(torch.randn(nk, shape.kv_heads, shape.head_dim).to(dtype) for _ in "kv") for _ in range(layers)]
        head_major = [(k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()) for k, v in caches]
        for nq in queries:
            q = torch.randn(nq, shape.q_heads, shape.head_dim).to(dtype)
            q_pos = torch.arange(nk - nq, nk)
            qh = q.transpose(0, 1)[None].contiguous()
            mask = None if nq == 1 else (torch.arange(nk)[None, :] <= q_pos[:, None])
            calls = {"n": 0}

            def ours():
                k, v = caches[calls["n"] % layers]
                calls["n"] += 1
                semshare_ops.partial_attn(q, k, v, q_pos)

            def sdpa():
                k, v = head_major[calls["n"] % layers]
                calls["n"] += 1
                torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)

            # a median of 9 rounds of `layers` calls each, the two timed in turn
            us = [t / layers for t in paired_median_us(
                [lambda: [ours() for _ in range(layers)], lambda: [sdpa() for _ in range(layers)]], "cpu")]
            records.append({"keys": nk, "queries": nq, "us": round(us[0], 1), "sdpa_us": round(us[1], 1),
                            "GB/s": round(kv_bytes / us[0] / 1e3, 2), "read_GB/s": round(read_gbps, 2),
                            "pct_of_read": round(100 * kv_bytes / us[0] / 1e3 / read_gbps, 1),
                            "vs_sdpa": round(us[1] / us[0], 2), "threads": torch.get_num_threads(),
                            "model": model, "dtype": dtype_name, "layers": layers})
    return records


def run_tree(tree: Path, args) -> list:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--worker", "--lengths", *map(str, args.lengths), "--queries",
           *map(str, args.queries), "--model", args.model, "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--queries", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m", help="the heads of one of bench.shapes' models")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="Q, K and V")
    parser.add_argument("--baseline-tree", default=None, help="a checkout with its extension built in place")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.lengths, args.queries, args.model, args.dtype)))
        return 0

    trees = {"this": REPO}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    records = []
    for r in range(args.rounds):
        for name, tree in trees.items():
            for record in run_tree(tree, args):
                records.append({**record, "tree": name, "round": r})
    print(f"{'keys':>6} {'queries':>7} {'tree':<8} {'us':>8} {'GB/s':>6} {'% read':>6} {'SDPA us':>8} {'vs SDPA':>7}"
          + ("  vs baseline" if args.baseline_tree else ""))
    summary = []
    for nk in args.lengths:
        for nq in args.queries:
            row = {}
            for name in trees:
                mine = [x for x in records if x["keys"] == nk and x["queries"] == nq and x["tree"] == name]
                row[name] = {key: statistics.median(x[key] for x in mine)
                             for key in ("us", "sdpa_us", "GB/s", "pct_of_read", "vs_sdpa")}
            for name, m in row.items():
                line = (f"{nk:>6} {nq:>7} {name:<8} {m['us']:>8.1f} {m['GB/s']:>6.2f} {m['pct_of_read']:>6.1f} "
                        f"{m['sdpa_us']:>8.1f} {m['vs_sdpa']:>7.2f}")
                if name == "this" and "baseline" in row:
                    # each tree's time against the SDPA of its own run, then the two ratios: drift cancels
                    line += f"  x{row['baseline']['us'] / row['baseline']['sdpa_us'] * m['sdpa_us'] / m['us']:.2f}"
                print(line)
            summary.append({"keys": nk, "queries": nq, **{f"{name}_{key}": value for name, m in row.items()
                                                          for key, value in m.items()}})
    if args.out:
        from semshare_ops.bench.provenance import environment

        meta = {**environment(), "model": args.model, "dtype": args.dtype, "baseline_tree": None}
        if args.baseline_tree:
            head = subprocess.run(["git", "-C", str(trees["baseline"]), "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
            meta["baseline_tree"] = head or str(trees["baseline"])
        with open(args.out, "w") as f:
            json.dump({**meta, "summary": summary, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
