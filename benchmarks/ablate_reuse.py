"""Reuse-side ablation on the built-in eval pairs: which ReuseConfig knobs buy quality, and at what TTFT.

    python benchmarks/ablate_reuse.py [--full-from benchmarks/results/eval_cpu.json] [--limit N] [--sets ...]
                                 [--variants ...] [--out benchmarks/results/ablation_cpu.json]

Only the reuse side runs: the full-prefill output of every pair is read from a recorded `semshare eval` result
(same model and max_new_tokens; prompts with or without the chat template, as that run had them), so each variant
costs one reuse request per pair. Every variant keeps recompute_ratio 0.2, so rows compare where the recompute
budget goes (or which tokens are reused), not how big it is:
- `default`: ReuseConfig's defaults of the day (recorded per variant under `configs`; since the adaptive budget,
  flat counts: recompute_decay 1.0, so `decay=1.0` is the same run);
- `check_layers=1`: one full layer, more budget for the deeper ones;
- `tail=16` / `tail=32`: the last prompt tokens (the end of the user turn and the chat template's assistant header)
  recomputed in every layer;
- `check_layers=1, tail=16`;
- `edit only`: no fuzzy LSH pairs (tokens the edit alignment leaves unmatched are recomputed, not borrowed);
- `lsh<=12`: fuzzy pairs only within 12 bits (default 24);
- `decay=0.9` / `decay=1.0`: the recompute count shrinks by 10% per layer past the check layers (the default before
  benchmarks/results/ablation_decay_cpu.json), or not at all.
"""
import argparse
import dataclasses
import json
import statistics
import sys

from semshare_ops.bench.provenance import environment
from semshare_ops.engine import ReuseConfig, ReuseEngine, load_model
from semshare_ops.engine.prompts import as_chat
from semshare_ops.eval import pairs as evalsets
from semshare_ops.eval.evaluate import rouge_l

VARIANTS = {
    "default": {},
    "check_layers=1": {"check_layers": 1},
    "tail=16": {"recompute_tail": 16},
    "tail=32": {"recompute_tail": 32},
    "check_layers=1, tail=16": {"check_layers": 1, "recompute_tail": 16},
    "edit only": {"matching": "edit"},
    "lsh<=12": {"lsh_max_distance": 12},
    "decay=0.9": {"recompute_decay": 0.9},
    "decay=1.0": {"recompute_decay": 1.0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-from", default="benchmarks/results/eval_cpu.json")
    parser.add_argument("--limit", type=int, default=None, help="pairs per set")
    parser.add_argument("--sets", nargs="+", choices=evalsets.SETS, default=list(evalsets.SETS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    recorded = json.load(open(args.full_from))
    if recorded.get("dtype") != "float32":
        sys.exit(f"--full-from: expected a float32 `semshare eval` run, got {args.full_from}")
    chat = recorded.get("chat_template", True)
    full_text = {r["id"]: r["full_text"] for r in recorded["records"]}
    max_new = recorded["max_new_tokens"]
    variants = {name: VARIANTS[name] for name in args.variants}

    model, tokenizer = load_model(progress=False)
    engine = ReuseEngine(model, tokenizer, ReuseConfig(recompute_ratio=0.2))
    prompt = (lambda text: as_chat(tokenizer, text)) if chat else (lambda text: text)
    pairs = [p for p in evalsets.load_eval_pairs(sets=args.sets, limit=args.limit) if p["id"] in full_text]
    rows = {name: [] for name in variants}
    for i, pair in enumerate(pairs):
        entry = engine.prefill(prompt(pair["reference"]))
        target = prompt(pair["target"])
        for name, overrides in variants.items():
            with engine.using(dataclasses.replace(engine.config, **overrides)):
                out = engine.generate(target, reference=entry, max_new_tokens=max_new)
            rows[name].append({"id": pair["id"], "set": pair["set"], "rougeL": rouge_l(out.text, full_text[pair["id"]]),
                               "exact": out.text == full_text[pair["id"]], "reuse_ratio": out.stats["reuse_ratio"],
                               "ttft_ms": out.stats["ttft_ms"]})
        print(f"[{i + 1}/{len(pairs)}] " + ", ".join(f"{n} {rows[n][-1]['rougeL']:.2f}" for n in variants),
              flush=True)

    summary = {}
    for name, records in rows.items():
        for subset in sorted({r["set"] for r in records}) + ["all"]:
            chosen = [r for r in records if subset == "all" or r["set"] == subset]
            summary.setdefault(name, {})[subset] = {
                "pairs": len(chosen), "rougeL": statistics.fmean(r["rougeL"] for r in chosen),
                "exact_output": statistics.fmean(float(r["exact"]) for r in chosen),
                "reuse_ratio": statistics.fmean(r["reuse_ratio"] for r in chosen),
                "mean_ttft_ms": statistics.fmean(r["ttft_ms"] for r in chosen)}
    print(f"\n{'variant':<24} {'set':<16} {'ROUGE-L':>7} {'exact':>6} {'reuse':>6} {'TTFT ms':>8}")
    for name, by_set in summary.items():
        for subset, s in by_set.items():
            print(f"{name:<24} {subset:<16} {s['rougeL']:>7.3f} {s['exact_output']:>6.2f} {s['reuse_ratio']:>6.2f} "
                  f"{s['mean_ttft_ms']:>8.0f}")
    if args.out:
        result = {**environment("cpu"), "full_from": args.full_from,
                  "chat_template": chat,
                  "recompute_ratio": 0.2, "max_new_tokens": max_new,
                  "configs": {name: dataclasses.asdict(dataclasses.replace(engine.config, **overrides))
                              for name, overrides in variants.items()},
                  "summary": summary, "records": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
