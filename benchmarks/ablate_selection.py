"""Which rows to recompute, and how many: selection methods and budget policies on the built-in eval pairs.

    python benchmarks/ablate_selection.py [--chat] [--ratios 0.2] [--variants ...] [--rouge] [--limit N]
                                          [--ids ID ...] [--edit-share S]
                                          [--out benchmarks/results/ablation_selection_cpu.json]
    python benchmarks/ablate_selection.py --summarize benchmarks/results/<a --rouge run>.json

Greedy outputs of a 135M model flip between two answers on a small change (one flip moves a 20-pair ROUGE-L mean by
0.05), so methods are ranked first by a distance that moves smoothly: the full prefill's own 48-token greedy
continuation is fed back (teacher forcing) after the prompt served by full prefill and by reuse, and each variant is
scored by the mean KL(full || reuse) of the next-token distributions over those 48 positions, and by how many of the
48 greedy next tokens agree (`agree`). The noise floor is the same distance for the target with one leading space,
served by full prefill (what `semshare eval` calls the floor). With --rouge every variant also generates 48 tokens
greedily, for ROUGE-L against the full prefill's output and first-token / first-8 agreement (`semshare eval`'s
metrics). Every variant runs at each --ratios recompute ratio; reuse_ratio, similarity (what `min_similarity` gates
on: `benchmarks/similarity_gate.py` replays a run under other gates) and TTFT are recorded beside. Each record also
says where greedy decoding from the reused cache would first leave the full prefill's path and the leads (best logit
minus second) around it: what a decode guard (ReuseConfig.guard_margin) would need to catch it.
--edit-share S serves, instead of each pair's target, its reference with about S of its tokens edited the way
`semshare bench e2e` edits its prompts (seeded by the pair's index): heavily edited prompts, where a budget policy
shows its cost. --summarize prints a recorded --rouge run as the README's table: ROUGE-L with its standard error
over pairs, and paired differences (each pair against itself) to the floor and to the run's first variant at the
same ratio.
"""
import argparse
import dataclasses
import json
import statistics
import time

import torch

from semshare_ops.bench import e2e
from semshare_ops.bench.provenance import environment
from semshare_ops.engine import ReuseConfig, ReuseEngine, load_model
from semshare_ops.engine.engine import logit_leads
from semshare_ops.engine.prompts import as_chat
from semshare_ops.eval import pairs as evalsets
from semshare_ops.eval.evaluate import floor_prompt, rouge_l

# Every variant spells out the knobs it compares (selection, progressive, recompute_decay, check_layers, tail, ...), so
# that a recorded run means the same whatever the defaults of the day.
_BASE = {"selection": "deviation", "progressive": False, "recompute_decay": 0.95, "check_layers": 2,
         "recompute_tail": 0, "recompute_boundary": 0, "budget": "fixed", "budget_cap": None, "decode_recompute": 0,
         "query_window": 16}
VARIANTS = {name: {**_BASE, **knobs} for name, knobs in {
    "deviation": {},
    "deviation, progressive": {"progressive": True},
    "deviation, progressive, decay=1.0": {"progressive": True, "recompute_decay": 1.0},
    "deviation, progressive, decay=0.9": {"progressive": True, "recompute_decay": 0.9},
    "attention": {"selection": "attention"},
    "attention, progressive": {"selection": "attention", "progressive": True},
    "blend": {"selection": "blend"},
    "blend, progressive": {"selection": "blend", "progressive": True},
    "deviation, tail=16": {"recompute_tail": 16},
    "deviation, decay=1.0": {"recompute_decay": 1.0},
    "blend, progressive, decay=1.0": {"selection": "blend", "progressive": True, "recompute_decay": 1.0},
    "deviation, check_layers=1": {"check_layers": 1},
    "default": {"progressive": True, "recompute_decay": 1.0},
    "default, adaptive budget": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive"},
    "blend, progressive, check_layers=1": {"selection": "blend", "progressive": True, "check_layers": 1},
    "default, check_layers=3": {"progressive": True, "recompute_decay": 1.0, "check_layers": 3},
    "default, check_layers=4": {"progressive": True, "recompute_decay": 1.0, "check_layers": 4},
    "default, tail=32": {"progressive": True, "recompute_decay": 1.0, "recompute_tail": 32},
    "default, adaptive budget, tail=16": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                          "recompute_tail": 16},
    "default, adaptive budget, tail=32": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                          "recompute_tail": 32},
    "default, adaptive budget, check_layers=4": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                                 "check_layers": 4},
    "default, adaptive budget, boundary=1": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                             "recompute_boundary": 1},
    "default, adaptive budget, boundary=4": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                             "recompute_boundary": 4},
    "default, adaptive budget, boundary=4, tail=32": {"progressive": True, "recompute_decay": 1.0,
                                                      "budget": "adaptive", "recompute_boundary": 4,
                                                      "recompute_tail": 32},
    "default, adaptive budget, boundary=8": {"progressive": True, "recompute_decay": 1.0, "budget": "adaptive",
                                             "recompute_boundary": 8},
    # The default with only the selection changed, and with only the budget changed: the ablation grid.
    **{f"default, adaptive budget, boundary=4, {selection}": {
        "progressive": True, "recompute_decay": 1.0, "budget": "adaptive", "recompute_boundary": 4,
        "selection": selection} for selection in ("attention", "blend")},
    "default, fixed budget, boundary=4": {"progressive": True, "recompute_decay": 1.0, "budget": "fixed",
                                          "recompute_boundary": 4},
    **{f"default, adaptive budget, boundary=4, cap={cap}": {
        "progressive": True, "recompute_decay": 1.0, "budget": "adaptive", "recompute_boundary": 4,
        "budget_cap": cap} for cap in (1.25, 1.5)},
    **{f"default, adaptive budget, boundary=4, lookahead={q}": {
        "progressive": True, "recompute_decay": 1.0, "budget": "adaptive", "recompute_boundary": 4,
        "selection": "lookahead", "query_window": q} for q in (16, 64)},
    **{f"default, adaptive budget, boundary=4, decode={k}": {
        "progressive": True, "recompute_decay": 1.0, "budget": "adaptive", "recompute_boundary": 4,
        "decode_recompute": k} for k in (16, 64, 256)},
    **{f"default, adaptive budget, boundary=4, check_layers={n}": {
        "progressive": True, "recompute_decay": 1.0, "budget": "adaptive", "recompute_boundary": 4,
        "check_layers": n} for n in (3, 4)},
}.items()}


def divergence(full: torch.Tensor, other: torch.Tensor) -> dict:
    """Where greedy decoding from `other` would first leave the full prefill's path, and the leads around it. A guard
    margin above `other`'s lead at that step (`needed_margin`) trips there or earlier, so it catches the step before
    it is taken; one above `min_lead` trips somewhere in the continuation (a repair either way)."""
    agree = (other.argmax(-1) == full.argmax(-1)).tolist()
    first = next((i for i, ok in enumerate(agree) if not ok), None)
    lead, full_lead = logit_leads(other), logit_leads(full)
    return {"first_divergence": first, "min_lead": float(lead.min()),
            "full_lead_at_divergence": None if first is None else float(full_lead[first]),
            "needed_margin": None if first is None else float(lead[first])}


def kl_rows(full: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(full || other) of each row's next-token distribution, in nats."""
    p, q = torch.log_softmax(full.float(), -1), torch.log_softmax(other.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def pair_arguments(parser: argparse.ArgumentParser) -> None:
    """What every run over the built-in eval pairs takes (here and in noise_floors.py)."""
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    parser.add_argument("--sets", nargs="+", choices=evalsets.SETS, default=list(evalsets.SETS))
    parser.add_argument("--limit", type=int, default=None, help="pairs per set")
    parser.add_argument("--ids", nargs="+", default=None, help="only the pairs with these ids")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=None)


def engine_and_pairs(args, engine_class=ReuseEngine) -> tuple:
    """(the embedded model's engine (an `engine_class`) with the default config, the prompt wrapper --chat asks for,
    the pairs)."""
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(progress=False)
    engine = engine_class(model, tokenizer, ReuseConfig())
    wrap = (lambda text: as_chat(tokenizer, text)) if args.chat else (lambda text: text)
    pairs = evalsets.load_eval_pairs(sets=args.sets, limit=args.limit)
    if args.ids:
        unknown = sorted(set(args.ids) - {pair.get("id") for pair in pairs})
        if unknown:
            raise SystemExit(f"--ids: no pair {', '.join(unknown)} in the sets {args.sets}")
        pairs = [pair for pair in pairs if pair.get("id") in args.ids]
    return engine, wrap, pairs


def edited_text(tokenizer, text: str, share: float, seed: int) -> str:
    """`text` with about `share` of its tokens edited by `semshare bench e2e`'s edit model, decoded back to text."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.decode(e2e.edit_tokens(ids, share, seed), skip_special_tokens=True)


def mean_se(values) -> tuple:
    """(mean, standard error of the mean) over pairs of a non-empty iterable (here and in noise_floors.py)."""
    values = list(values)
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def summarize(records: list, sets: list, rouge: bool) -> dict:
    """Per variant @ ratio and per set (and "all"): means over pairs. With ROUGE-L: its standard error, and two paired
    differences, each pair against itself: `rougeL_minus_floor` (reuse minus the one-leading-space floor) and
    `rougeL_minus_first` (this variant minus the run's first variant at the same ratio), each with its standard error."""
    summary = {}
    keys = list(records[0]["variants"])
    for key in keys:
        first = next(k for k in keys if k.rsplit(" @ ", 1)[1] == key.rsplit(" @ ", 1)[1])
        for group in sets + ["all"]:
            chosen = [r for r in records if group in ("all", r["set"])]
            if not chosen:
                continue
            vals = [r["variants"][key] for r in chosen]
            row = {"pairs": len(chosen), "kl": statistics.fmean(v["kl"] for v in vals),
                   "kl_median": statistics.median(v["kl"] for v in vals),
                   "agree": statistics.fmean(v["agree"] for v in vals),
                   "kl_floor": statistics.fmean(r["kl_floor"] for r in chosen),
                   "agree_floor": statistics.fmean(r["agree_floor"] for r in chosen),
                   "reuse_ratio": statistics.fmean(v["reuse_ratio"] for v in vals),
                   "score_ms": statistics.fmean(v["score_ms"] for v in vals),
                   "decode_recomputed_tokens": statistics.fmean(v["decode_recomputed_tokens"] for v in vals)}
            if rouge:
                rouge_l_, se = mean_se([v["rougeL"] for v in vals])
                floor, floor_se = mean_se([r["rougeL_floor"] for r in chosen])
                minus_floor, minus_floor_se = mean_se([v["rougeL"] - r["rougeL_floor"] for v, r in zip(vals, chosen)])
                minus_first, minus_first_se = mean_se([v["rougeL"] - r["variants"][first]["rougeL"]
                                                        for v, r in zip(vals, chosen)])
                row.update(rougeL=rouge_l_, rougeL_se=se, rougeL_floor=floor, rougeL_floor_se=floor_se,
                           rougeL_minus_floor=minus_floor, rougeL_minus_floor_se=minus_floor_se,
                           rougeL_minus_first=minus_first, rougeL_minus_first_se=minus_first_se,
                           first_token=statistics.fmean(float(v["first_token"]) for v in vals),
                           first8=statistics.fmean(float(v["first8"]) for v in vals),
                           ttft_ms=statistics.fmean(v["ttft_ms"] for v in vals),
                           ttft_ms_full=statistics.fmean(r["ttft_ms_full"] for r in chosen),
                           generate_ms=statistics.fmean(v["generate_ms"] for v in vals))
            summary.setdefault(key, {})[group] = row
    return summary


def print_summary(summary: dict, rouge: bool) -> None:
    print(f"{'variant':<44} {'set':<15} {'reuse':>5} {'KL':>7} {'floor':>7} {'agree':>6} {'floor':>6}"
          + (f" {'ROUGE-L':>7} {'floor':>6}" if rouge else ""))
    for key, groups in summary.items():
        for group, row in groups.items():
            line = (f"{key:<44} {group:<15} {row['reuse_ratio']:>5.3f} {row['kl']:>7.4f} {row['kl_floor']:>7.4f} "
                    f"{row['agree']:>6.3f} {row['agree_floor']:>6.3f}")
            if rouge:
                line += f" {row['rougeL']:>7.3f} {row['rougeL_floor']:>6.3f}"
            print(line)


def markdown_table(summary: dict) -> str:
    """The README's ablation table from a --rouge run's summary: one row per set and variant @ ratio."""
    lines = ["| set | variant | ratio | reuse | ROUGE-L | - floor | - first variant | first token | first 8 | KL (median) "
             "| TTFT ms (full) |", "|---" * 11 + "|"]
    any_variant = next(iter(summary.values()))  # the floor is per pair: the same under every variant
    for group in [g for g in any_variant if g != "all"]:
        for key, rows in summary.items():
            row, (name, ratio) = rows[group], key.rsplit(" @ ", 1)
            lines.append(f"| {group} | {name} | {ratio} | {row['reuse_ratio']:.3f} | {row['rougeL']:.3f} ± "
                         f"{row['rougeL_se']:.3f} | {row['rougeL_minus_floor']:+.3f} ± {row['rougeL_minus_floor_se']:.3f} "
                         f"| {row['rougeL_minus_first']:+.3f} ± {row['rougeL_minus_first_se']:.3f} | "
                         f"{row['first_token']:.2f} | {row['first8']:.2f} | {row['kl']:.4f} ({row['kl_median']:.5f}) | "
                         f"{row['ttft_ms']:.0f} ({row['ttft_ms_full']:.0f}) |")
        floor = any_variant[group]
        lines.append(f"| {group} | floor (one leading space) | | | {floor['rougeL_floor']:.3f} ± "
                     f"{floor['rougeL_floor_se']:.3f} | | | | | {floor['kl_floor']:.4f} | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rouge", action="store_true", help="also generate greedily for ROUGE-L")
    parser.add_argument("--edit-share", type=float, default=None,
                        help="targets: each pair's reference with this share of its tokens edited as `semshare bench "
                             "e2e` edits them (spans of up to 8 tokens replaced, inserted or deleted), not its target")
    parser.add_argument("--summarize", metavar="RESULT", default=None,
                        help="run nothing: print a recorded --rouge run's summary as a markdown table")
    args = parser.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            recorded = json.load(f)
        if not all("rougeL_floor" in r for r in recorded["records"]):
            parser.error(f"--summarize: {args.summarize} was not recorded with --rouge")
        sets = list(dict.fromkeys(r["set"] for r in recorded["records"]))
        print(markdown_table(summarize(recorded["records"], sets, rouge=True)))
        return 0

    engine, wrap, pairs = engine_and_pairs(args)
    if args.edit_share is not None:
        # Seeded by the pair's place in its own set (its id's number), not by its index in this run's list: the
        # same pair gets the same edits under any --ids / --limit / --sets (the recorded runs used one set, unfiltered).
        pairs = [{**pair, "target": edited_text(engine.tokenizer, pair["reference"], args.edit_share,
                                                seed=int(pair["id"].rsplit("-", 1)[1]))} for pair in pairs]
    records = []
    for i, pair in enumerate(pairs):
        reference, target = wrap(pair["reference"]), wrap(pair["target"])
        floor = floor_prompt(pair["target"], wrap)  # the leading space inside the chat template (semshare eval's)
        entry = engine.prefill(reference)
        start = time.perf_counter()
        full = engine.generate(target, max_new_tokens=args.max_new_tokens)
        full_ms = (time.perf_counter() - start) * 1e3
        cont = full.token_ids
        full_logits, _ = engine.score(target, cont)
        noise_logits, _ = engine.score(floor, cont)
        record = {"id": pair.get("id"), "set": pair["set"], "prompt_tokens": full.stats["prompt_tokens"],
                  "kl_floor": float(kl_rows(full_logits, noise_logits).mean()),
                  "agree_floor": float((noise_logits.argmax(-1) == full_logits.argmax(-1)).float().mean()),
                  "ttft_ms_full": full.stats["ttft_ms"], "generate_ms_full": full_ms, "variants": {}}
        if args.rouge:
            noise = engine.generate(floor, max_new_tokens=args.max_new_tokens)
            record["rougeL_floor"] = rouge_l(noise.text, full.text)
        for name in args.variants:
            for ratio in args.ratios:
                config = dataclasses.replace(ReuseConfig(), recompute_ratio=ratio, **VARIANTS[name])
                with engine.using(config):
                    start = time.perf_counter()
                    logits, stats = engine.score(target, cont, reference=entry)
                    elapsed = (time.perf_counter() - start) * 1e3
                    result = {"kl": float(kl_rows(full_logits, logits).mean()),
                              "agree": float((logits.argmax(-1) == full_logits.argmax(-1)).float().mean()),
                              "reuse_ratio": stats["reuse_ratio"], "mode": stats["mode"],
                              "similarity": stats["similarity"],
                              "exact_tokens": stats["exact_tokens"], "check_deviation": stats.get("check_deviation"),
                              "decode_recomputed_tokens": stats["decode_recomputed_tokens"],
                              "score_ms": elapsed, **divergence(full_logits, logits)}
                    if args.rouge:
                        start = time.perf_counter()
                        out = engine.generate(target, reference=entry, max_new_tokens=args.max_new_tokens)
                        elapsed = (time.perf_counter() - start) * 1e3
                        result.update(rougeL=rouge_l(out.text, full.text), ttft_ms=out.stats["ttft_ms"],
                                      generate_ms=elapsed, first_token=out.token_ids[:1] == cont[:1],
                                      first8=out.token_ids[:8] == cont[:8])
                record["variants"][f"{name} @ {ratio}"] = result
        records.append(record)
        print(f"[{i + 1}/{len(pairs)}] {pair['set']} {pair.get('id')}: floor kl {record['kl_floor']:.4f} " +
              " ".join(f"{k.split(' @')[0][:14]}={v['kl']:.4f}" for k, v in list(record["variants"].items())[:4]),
              flush=True)

    summary = summarize(records, args.sets, args.rouge)
    print_summary(summary, args.rouge)
    if args.out:
        result = {**environment(), "chat_template": args.chat, "edit_share": args.edit_share,
                  "max_new_tokens": args.max_new_tokens, "summary": summary,
                  "records": records}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
