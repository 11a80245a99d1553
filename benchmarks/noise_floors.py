"""How firm is the noise floor? Several changes that should not matter, each against the full prefill, beside reuse.

    python benchmarks/noise_floors.py [--chat] [--limit N] [--max-new-tokens 48] [--perturbations NAME ...]
                                      [--out benchmarks/results/noise_floors_raw_cpu.json]

`semshare eval`'s noise floor is one such change: the target with one leading space, served by full prefill, its
greedy output scored against the target's own (ROUGE-L). One draw of one kind. Here every built-in pair's target is
changed four ways, fixed before any was measured, none of which changes what the prompt says:

- "leading space" (the floor `semshare eval` reports, inside the chat template with --chat), "two leading
  spaces", "leading newline";
- "space doubled mid-prompt": the first space at or after the middle of the text doubled, a change inside the
  text as near-duplicates' edits are (the first space of the text where the second half has none).

Each is scored as `semshare eval` scores reuse: ROUGE-L of 48 greedy tokens against the full prefill's, first token
and first 8 tokens equal; and as `benchmarks/ablate_selection.py` does, by the mean KL(full || changed) of the
next-token distributions over the full prefill's own 48 tokens fed back (teacher forcing) and the share of greedy
next tokens that agree. Reuse with the default config is scored the same way in the same run, so that each pair's
reuse can be set against each of its floors (paired differences, with standard errors over pairs).
"""
import argparse
import json
import statistics

from semshare_ops.bench.provenance import environment
from semshare_ops.eval.evaluate import rouge_l

from ablate_selection import engine_and_pairs, kl_rows, mean_se, pair_arguments  # this folder (run as a script)


def _double_middle_space(text: str) -> str:
    at = text.find(" ", len(text) // 2)
    if at < 0:
        at = text.find(" ")
    return text[:at] + " " + text[at:] if at >= 0 else " " + text


PERTURBATIONS = {
    "leading space": lambda text: " " + text,
    "two leading spaces": lambda text: "  " + text,
    "leading newline": lambda text: "\n" + text,
    "space doubled mid-prompt": _double_middle_space,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--perturbations", nargs="+", choices=list(PERTURBATIONS), default=list(PERTURBATIONS),
                        help="which changes to draw (default: all four)")
    args = parser.parse_args()
    perturbations = {name: PERTURBATIONS[name] for name in args.perturbations}

    engine, wrap, pairs = engine_and_pairs(args)
    records = []
    for i, pair in enumerate(pairs):
        target = pair["target"]
        full = engine.generate(wrap(target), max_new_tokens=args.max_new_tokens)
        cont = full.token_ids
        full_logits, _ = engine.score(wrap(target), cont)

        def scored(out, logits) -> dict:
            return {"rougeL": rouge_l(out.text, full.text), "first_token": out.token_ids[:1] == cont[:1],
                    "first8": out.token_ids[:8] == cont[:8], "kl": float(kl_rows(full_logits, logits).mean()),
                    "agree": float((logits.argmax(-1) == full_logits.argmax(-1)).float().mean())}

        # The chat template wraps the changed text: the change stays inside the user's message.
        record = {"id": pair.get("id"), "set": pair["set"], "prompt_tokens": full.stats["prompt_tokens"],
                  "floors": {}}
        for name, change in perturbations.items():
            prompt = wrap(change(target))
            record["floors"][name] = scored(engine.generate(prompt, max_new_tokens=args.max_new_tokens),
                                            engine.score(prompt, cont)[0])
        entry = engine.prefill(wrap(pair["reference"]))
        reuse = engine.generate(wrap(target), reference=entry, max_new_tokens=args.max_new_tokens)
        record["reuse"] = {**scored(reuse, engine.score(wrap(target), cont, reference=entry)[0]),
                           "reuse_ratio": reuse.stats["reuse_ratio"], "mode": reuse.stats["mode"]}
        records.append(record)
        print(f"[{i + 1}/{len(pairs)}] {pair['set']} {pair.get('id')}: reuse {record['reuse']['rougeL']:.2f} floors "
              + " ".join(f"{v['rougeL']:.2f}" for v in record["floors"].values()), flush=True)

    summary = {}
    for group in args.sets + ["all"]:
        chosen = [r for r in records if group in ("all", r["set"])]
        if not chosen:
            continue
        rows = {}
        for name in [*perturbations, "reuse"]:
            runs = [r["reuse"] if name == "reuse" else r["floors"][name] for r in chosen]
            row = {metric: mean_se(float(run[metric]) for run in runs)
                   for metric in ("rougeL", "first_token", "first8", "kl", "agree")}
            if name != "reuse":  # each pair's reuse against this floor of the same pair
                row["reuse_minus_floor_rougeL"] = mean_se(r["reuse"]["rougeL"] - r["floors"][name]["rougeL"]
                                                           for r in chosen)
            rows[name] = row
        pooled = [statistics.fmean(r["floors"][n]["rougeL"] for n in perturbations) for r in chosen]
        rows["mean of the floors"] = {"rougeL": mean_se(pooled), "reuse_minus_floor_rougeL": mean_se(
            r["reuse"]["rougeL"] - p for r, p in zip(chosen, pooled))}
        summary[group] = {"pairs": len(chosen), "reuse_ratio": statistics.fmean(r["reuse"]["reuse_ratio"]
                                                                                for r in chosen), "rows": rows}
    print(f"{'set':<15} {'':<26} {'ROUGE-L':>14} {'reuse - it':>14} {'first 8':>7} {'KL':>7} {'agree':>6}")
    for group, s in summary.items():
        for name, row in s["rows"].items():
            line = f"{group:<15} {name:<26} {row['rougeL'][0]:>7.3f} ±{row['rougeL'][1]:.3f}"
            if "reuse_minus_floor_rougeL" in row:
                d = row["reuse_minus_floor_rougeL"]
                line += f" {d[0]:>+7.3f} ±{d[1]:.3f}"
            else:
                line += " " * 15
            if "kl" in row:
                line += f" {row['first8'][0]:>7.2f} {row['kl'][0]:>7.4f} {row['agree'][0]:>6.3f}"
            print(line)
        print(f"{group:<15} reuse ratio {s['reuse_ratio']:.3f} over {s['pairs']} pairs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**environment(), "chat_template": args.chat, "max_new_tokens": args.max_new_tokens,
                       "perturbations": list(perturbations), "summary": summary, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
