"""TTFT of reuse configs side by side in one run, on `semshare bench e2e`'s prompts: the budget policies
(ReuseConfig.budget) and the lookahead selection.

    python benchmarks/e2e_budgets.py [--lengths 1024 2048 4096] [--edit-levels 0 0.02 0.1 0.3] [--repeat 3]
                                     [--variants fixed adaptive lookahead] [--out benchmarks/results/e2e_budget_cpu.json]

`semshare bench e2e` times the default config only; this runs its `run_e2e` once per variant on one engine and the
same targets: full prefill and the last-token `decode` floor with the first, then semshare with each: "fixed" (the
unmatched rows inside recompute_ratio), "adaptive" (on top of recompute_ratio of the others, so an edited prompt
recomputes more), "cap=1.25" / "cap=1.5" (adaptive up to that multiple of the fixed budget, `budget_cap`),
"lookahead" (adaptive, rows ranked by selection="lookahead"). Records carry `budget` and `variant` keys.
"""
import argparse
import json

import torch

from semshare_ops.bench import e2e
from semshare_ops.bench.provenance import environment
from semshare_ops.engine import ReuseConfig, ReuseEngine, load_model

# Spelt out in full, so that a recorded run means the same whatever the defaults of the day.
VARIANTS = {"fixed": {"budget": "fixed", "selection": "deviation", "budget_cap": None},
            "adaptive": {"budget": "adaptive", "selection": "deviation", "budget_cap": None},
            **{f"cap={cap}": {"budget": "adaptive", "selection": "deviation", "budget_cap": cap}
               for cap in (1.25, 1.5)},
            "lookahead": {"budget": "adaptive", "selection": "lookahead", "query_window": 16, "budget_cap": None}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--edit-levels", nargs="+", type=float, default=[0, 0.02, 0.1, 0.3])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--recompute-ratio", type=float, default=ReuseConfig().recompute_ratio)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["fixed", "adaptive"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, tokenizer = load_model(progress=False)
    text_ids = e2e.text_prompt(tokenizer, max(args.lengths))
    engine = ReuseEngine(model, tokenizer)
    records = []
    for i, name in enumerate(args.variants):
        methods = ("full", "semshare", "decode") if i == 0 else ("semshare",)
        with engine.using(ReuseConfig(recompute_ratio=args.recompute_ratio, **VARIANTS[name])):
            run = e2e.run_e2e(engine, lambda n: text_ids[:n], args.lengths, args.edit_levels, methods, args.repeat)
        for record in run:
            ours = record["method"] == "semshare"
            record["budget"], record["variant"] = (VARIANTS[name]["budget"], name) if ours else (None, None)
            records.append(record)
            print(f"{name:9s} " + e2e.format_e2e([record]).splitlines()[2], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**environment(), "model": model.name_or_path, "dtype": "float32", "records": records}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
