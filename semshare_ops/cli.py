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


def _engine(args):
    import torch

    import semshare_ops as ss

    try:  # checked before the (slow) model load
        config = ss.ReuseConfig(recompute_ratio=args.recompute_ratio)
    except ValueError as e:
        raise UsageError(f"--recompute-ratio: {e}") from e
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        model, tokenizer = ss.load_model(args.model, dtype=dtype, progress=not args.json)
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


def cmd_bench(args) -> Dict:
    import torch

    from .bench import format_table, run_ops

    if args.what != "ops":
        raise UsageError("bench: only 'ops' is implemented in this version ('e2e' is planned)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no GPU")
    records = run_ops(device, args.models, args.lengths, args.ratios,
                      progress=(lambda r: None) if args.json else
                      (lambda r: print(format_table([r]).splitlines()[1], flush=True)))
    return {"device": device, "records": records}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="semshare", description="Semantic KV-cache reuse on HF models (semshare_ops).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
        p.add_argument("--max-new-tokens", type=int, default=48)
        p.add_argument("--recompute-ratio", type=float, default=0.2)
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    model_args(sub.add_parser("demo", help="a built-in pair of similar prompts: full prefill vs reuse"))
    run = sub.add_parser("run", help="full prefill vs reuse on your own reference and target files")
    run.add_argument("--reference", required=True)
    run.add_argument("--target", required=True)
    model_args(run)
    bench = sub.add_parser("bench", help="microbenchmarks of the ops (bench ops)")
    bench.add_argument("what", choices=["ops", "e2e"])
    bench.add_argument("--device", default=None)
    bench.add_argument("--models", nargs="+", default=["smollm2-135m"])
    bench.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    bench.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 1.0])
    bench.add_argument("--json", action="store_true")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_new_tokens", 1) < 1:
        print("semshare: error: --max-new-tokens: must be at least 1", file=sys.stderr)
        return 2
    handler = {"demo": cmd_demo, "run": cmd_run, "bench": cmd_bench}[args.command]
    try:
        result = handler(args)
    except UsageError as e:
        print(f"semshare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    elif args.command in ("demo", "run"):
        _print_comparison(result)
    else:
        from .bench import format_table

        print("\n" + format_table(result["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
