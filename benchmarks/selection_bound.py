"""How good can row selection get? The budget's rows chosen by an oracle that knows the full prefill's K/V.

    python benchmarks/selection_bound.py [--chat] [--sets near_duplicate] [--ratios 0.2] [--oracles deep L3]
                                         [--rouge] [--limit N] [--out benchmarks/results/selection_bound_cpu.json]

Every recompute row the default config chooses by its ranking (the rows past the mandatory ones) is chosen here
instead by the true staleness of its reused K/V: ||dK|| + ||dV|| against the target's own full prefill, each layer's
normalised by its mean over the matched rows, summed over the oracle's layers ("deep": every layer past the check
layers, what the reused rows actually carry; "L<i>": layer i alone; "L1" is what the default's check layer measures,
without its boundary tier). The counts per layer, and so the reuse ratio and the time, are the default's: only which
rows differs. Scored as `ablate_selection.py` scores a variant (teacher-forced KL(full || reuse) over the full
prefill's 48 greedy tokens, agreement, the one-leading-space floor; --rouge: ROUGE-L of 48 greedy tokens).

No front end can do this (it needs the answer it is saving the work of computing): it bounds what any ranking of
rows can reach at the default's counts (docs/design.md, "How good can selection get").
"""
import argparse
import dataclasses
import json
import statistics

import torch

from semshare_ops.bench.provenance import environment
from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.engine.rows import effective_check_layers, selection_scores
from semshare_ops.eval.evaluate import floor_prompt, rouge_l

from ablate_selection import engine_and_pairs, kl_rows, pair_arguments  # this folder (run as a script)


class OracleEngine(ReuseEngine):
    """Ranks recompute rows by their reused K/V's true distance to `self.truth`, the target's full-prefill (K, V)
    [L, T, H, D], over the layers `self.oracle` names ("deep", or "L<i>"); None: the default's own ranking."""

    oracle = None
    truth = None

    def _layers(self) -> range:
        if self.oracle == "deep":
            return range(effective_check_layers(self.config), self.num_layers)
        layer = int(self.oracle[1:])
        return range(layer, layer + 1)

    def _recompute(self, cache, ids, plan, window, exact, unmatched):
        # Here the cache holds every matched row's reused K/V in every layer (nothing recomputed yet).
        if self.oracle is not None and len(ids) > exact:
            keys, values = self.truth
            rows = torch.arange(exact, len(ids))
            free = ~plan.mandatory[exact:].cpu()
            staleness = torch.zeros(len(rows))
            for layer in self._layers():
                reused = (cache.keys[layer, rows].float().cpu(), cache.values[layer, rows].float().cpu())
                dev = selection_scores("deviation", reused, (keys[layer, rows], values[layer, rows]), None)
                staleness += dev / dev[free].mean().clamp_min(1e-30) if bool(free.any()) else dev
            # The default's deep count less its mandatory rows: the rows its ranking would choose, the oracle's first
            # tier instead (ranked above every other matched row, so exactly these are taken).
            take = min(int(free.sum()), max(0, plan.counts[-1] - int((~free).sum())))
            first = torch.zeros(len(ids), dtype=torch.bool)
            chosen = torch.topk(staleness.masked_fill(~free, -1.0), take).indices if take else rows[:0]
            first[exact + chosen] = True
            plan = plan._replace(first=first)
        return super()._recompute(cache, ids, plan, window, exact, unmatched)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    pair_arguments(parser)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2])
    parser.add_argument("--oracles", nargs="+", default=["deep", "L3"], help='"deep" or "L<layer>"')
    parser.add_argument("--rouge", action="store_true", help="also generate greedily for ROUGE-L")
    args = parser.parse_args()
    for name in args.oracles:
        if name != "deep" and not (name.startswith("L") and name[1:].isdigit()):
            parser.error(f"--oracles: expected 'deep' or 'L<layer>', got {name!r}")

    engine, wrap, pairs = engine_and_pairs(args, OracleEngine)
    records = []
    for i, pair in enumerate(pairs):
        reference, target = wrap(pair["reference"]), wrap(pair["target"])
        floor = floor_prompt(pair["target"], wrap)  # the leading space inside the chat template (semshare eval's)
        entry = engine.prefill(reference)
        full = engine.generate(target, max_new_tokens=args.max_new_tokens, return_entry=True)  # its K/V: the truth
        engine.truth = (full.entry.keys.cpu(), full.entry.values.cpu())
        cont = full.token_ids
        full_logits, _ = engine.score(target, cont)
        noise_logits, _ = engine.score(floor, cont)
        record = {"id": pair.get("id"), "set": pair["set"], "prompt_tokens": full.stats["prompt_tokens"],
                  "kl_floor": float(kl_rows(full_logits, noise_logits).mean()), "variants": {}}
        if args.rouge:
            record["rougeL_floor"] = rouge_l(engine.generate(floor, max_new_tokens=args.max_new_tokens).text,
                                             full.text)
        for ratio in args.ratios:
            for oracle in [None] + args.oracles:
                engine.oracle = oracle
                with engine.using(dataclasses.replace(ReuseConfig(), recompute_ratio=ratio)):
                    logits, stats = engine.score(target, cont, reference=entry)
                    result = {"kl": float(kl_rows(full_logits, logits).mean()),
                              "agree": float((logits.argmax(-1) == full_logits.argmax(-1)).float().mean()),
                              "reuse_ratio": stats["reuse_ratio"]}
                    if args.rouge:
                        out = engine.generate(target, reference=entry, max_new_tokens=args.max_new_tokens)
                        result["rougeL"] = rouge_l(out.text, full.text)
                record["variants"][f"{oracle or 'default'} @ {ratio}"] = result
        engine.oracle = engine.truth = None
        records.append(record)
        print(f"[{i + 1}/{len(pairs)}] {pair['set']} {pair.get('id')}: floor {record['kl_floor']:.4f} " +
              " ".join(f"{k}={v['kl']:.4f}" for k, v in record["variants"].items()), flush=True)

    summary = {}
    for key in records[0]["variants"]:
        for group in args.sets:
            chosen = [r for r in records if r["set"] == group]
            if not chosen:
                continue
            kl = [r["variants"][key]["kl"] for r in chosen]
            row = {"pairs": len(chosen), "kl": statistics.fmean(kl), "kl_median": statistics.median(kl),
                   "kl_floor": statistics.fmean(r["kl_floor"] for r in chosen),
                   "kl_floor_median": statistics.median(r["kl_floor"] for r in chosen),
                   "agree": statistics.fmean(r["variants"][key]["agree"] for r in chosen),
                   "reuse_ratio": statistics.fmean(r["variants"][key]["reuse_ratio"] for r in chosen)}
            if args.rouge:
                row.update(rougeL=statistics.fmean(r["variants"][key]["rougeL"] for r in chosen),
                           rougeL_floor=statistics.fmean(r["rougeL_floor"] for r in chosen))
            summary.setdefault(key, {})[group] = row
            print(f"{key:<16} {group:<16} reuse {row['reuse_ratio']:.3f} KL {row['kl']:.4f} (median "
                  f"{row['kl_median']:.5f}; floor {row['kl_floor']:.4f}, {row['kl_floor_median']:.5f}) agree "
                  f"{row['agree']:.3f}" + (f" ROUGE-L {row['rougeL']:.3f} (floor {row['rougeL_floor']:.3f})"
                                           if args.rouge else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**environment(), "chat_template": args.chat, "max_new_tokens": args.max_new_tokens,
                       "summary": summary, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
