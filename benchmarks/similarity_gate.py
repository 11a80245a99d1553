"""What a similarity gate would buy: recorded reuse runs replayed as if `min_similarity` had sent some to full prefill.

    python benchmarks/similarity_gate.py RUN.json [RUN.json ...] [--variant NAME]
                                         [--gates 0.5 0.6 0.7 0.8 0.85 0.9 0.95]
                                         [--out benchmarks/results/similarity_gate_raw_cpu.json]

Each RUN is a `benchmarks/ablate_selection.py --rouge` run that recorded every request's `similarity` (the share of
target tokens matched in the reference, what `ReuseConfig.min_similarity` gates on). A request whose similarity is
under a gate is served by a full prefill (`stats["mode"] == "fallback"`): its output is the full prefill's own (ROUGE-L
1.0, KL 0), its TTFT the full prefill's (`ttft_ms_full`, measured in the same run) and its reuse ratio 0. Every other
request keeps what the run measured. Nothing is run again: the replay is exact for the outputs, since a fallback is a
full prefill, and for the time up to the match a fallback still pays (a few ms). Per run and gate: the share sent to
full prefill, the mean ROUGE-L (± its standard error over requests) and its paired difference to the one-leading-space
floor, the mean KL, reuse ratio and TTFT; and the ROUGE-L the same share sent to full prefill at random would give
(in expectation), the baseline a gate must beat to say its similarity tells good requests from bad. Also, per run,
how ROUGE-L falls with similarity (requests in bins).
"""
import argparse
import json

from semshare_ops.bench.provenance import environment

from ablate_selection import mean_se  # this folder (run as a script)


def served(record: dict, variant: str, gate: float) -> dict:
    """What `record`'s request would have been given under `gate`: the run's reuse, or the full prefill."""
    reuse = record["variants"][variant]
    if reuse["similarity"] is None:
        raise SystemExit(f"{record['id']}: no similarity recorded (was the run made before it was recorded?)")
    if reuse["similarity"] < gate or reuse["mode"] == "fallback":
        return {"fallback": True, "rougeL": 1.0, "kl": 0.0, "reuse_ratio": 0.0, "ttft_ms": record["ttft_ms_full"]}
    return {"fallback": False, "rougeL": reuse["rougeL"], "kl": reuse["kl"], "reuse_ratio": reuse["reuse_ratio"],
            "ttft_ms": reuse["ttft_ms"]}


def replay(records: list, variant: str, gates: list) -> list:
    rows = []
    # The mark: the same number of requests sent to full prefill, those the run itself sent and the rest drawn at
    # random from the ones it served by reuse (whose mean ROUGE-L is `reused`).
    reused = [s["rougeL"] for s in (served(r, variant, 0.0) for r in records) if not s["fallback"]]
    reused = sum(reused) / len(reused) if reused else 1.0
    for gate in [0.0] + gates:
        given = [served(r, variant, gate) for r in records]
        rouge, rouge_se = mean_se(g["rougeL"] for g in given)
        minus_floor, minus_floor_se = mean_se(g["rougeL"] - r["rougeL_floor"] for g, r in zip(given, records))
        share = sum(g["fallback"] for g in given) / len(given)
        rows.append({"gate": gate, "requests": len(given), "fallback_share": share,
                     "rougeL_same_share_at_random": share + (1 - share) * reused,
                     "rougeL": rouge, "rougeL_se": rouge_se, "rougeL_minus_floor": minus_floor,
                     "rougeL_minus_floor_se": minus_floor_se, "kl": sum(g["kl"] for g in given) / len(given),
                     "reuse_ratio": sum(g["reuse_ratio"] for g in given) / len(given),
                     "ttft_ms": sum(g["ttft_ms"] for g in given) / len(given)})
    return rows


def by_similarity(records: list, variant: str, edges: list) -> list:
    """ROUGE-L of reuse (no gate) for the requests whose similarity falls in each [edges[i], edges[i + 1])."""
    bins = []
    for low, high in zip(edges, edges[1:]):
        inside = [r for r in records if low <= r["variants"][variant]["similarity"] < high]
        if inside:
            rouge, se = mean_se(r["variants"][variant]["rougeL"] for r in inside)
            floor = sum(r["rougeL_floor"] for r in inside) / len(inside)
            bins.append({"similarity": [low, high], "requests": len(inside), "rougeL": rouge, "rougeL_se": se,
                         "rougeL_floor": floor})
    return bins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="ablate_selection.py --rouge runs that recorded similarity")
    parser.add_argument("--variant", default=None, help="the variant @ ratio to replay (default: each run's first)")
    parser.add_argument("--gates", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if any(not 0.0 <= g <= 1.0 for g in args.gates):
        parser.error(f"--gates: expected values in [0, 1], got {args.gates}")

    edges = [0.0, 0.5, 0.8, 0.85, 0.9, 0.95, 1.01]  # the last bin holds similarity 1.0
    results = []
    for path in args.runs:
        with open(path) as f:
            run = json.load(f)
        records = run["records"]
        if not all("rougeL_floor" in r for r in records):
            parser.error(f"{path}: not recorded with --rouge")
        variant = args.variant or next(iter(records[0]["variants"]))
        edited = run.get("edit_share")
        label = "+".join(dict.fromkeys(r["set"] for r in records)) + (", the pairs' own targets" if edited is None else
                                     f", {edited:.0%} of the reference edited")
        results.append({"run": path, "label": label, "variant": variant, "command": run.get("command"),
                        "gates": replay(records, variant, args.gates),
                        "by_similarity": by_similarity(records, variant, edges)})

    print("| requests | gate | to full prefill | ROUGE-L | same share at random | - floor | KL | reuse | TTFT ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for row in result["gates"]:
            print(f"| {result['label']} ({row['requests']}) | {row['gate']:.2f} | {row['fallback_share']:.2f} | "
                  f"{row['rougeL']:.3f} ± {row['rougeL_se']:.3f} | {row['rougeL_same_share_at_random']:.3f} | "
                  f"{row['rougeL_minus_floor']:+.3f} ± "
                  f"{row['rougeL_minus_floor_se']:.3f} | {row['kl']:.4f} | {row['reuse_ratio']:.3f} | "
                  f"{row['ttft_ms']:.0f} |")
    print("\n| requests | similarity | n | ROUGE-L (reuse) | floor |")
    print("|---|---|---|---|---|")
    for result in results:
        for b in result["by_similarity"]:
            print(f"| {result['label']} | {b['similarity'][0]:.2f}-{min(b['similarity'][1], 1.0):.2f} | "
                  f"{b['requests']} | {b['rougeL']:.3f} ± {b['rougeL_se']:.3f} | {b['rougeL_floor']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**environment(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
