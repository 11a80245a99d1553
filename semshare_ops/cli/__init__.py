"""The `semshare` command (docs/contract.md section 5): demo, run, bench, eval; one module per command, each with
`add_parser(sub)`, `run(args) -> dict` and `show(result)`.

Every command takes --json and then prints one JSON object on stdout. Bad input exits with code 2 and one line
on stderr naming the problem. `bench` and `eval` also write their result to --out (here, after printing it).
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional

from . import bench, demo, eval as eval_command, run as run_command
from .common import Parser, UsageError, write_json

COMMANDS = {"demo": demo, "run": run_command, "bench": bench, "eval": eval_command}


def build_parser() -> Parser:
    parser = Parser(prog="semshare", description="Semantic KV-cache reuse on HF models (semshare_ops).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if getattr(args, "max_new_tokens", 1) < 1:
            raise UsageError("--max-new-tokens: must be at least 1")
        result = command.run(args)
    except UsageError as e:
        print(f"semshare: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        command.show(result)
    # --out last, after the result is printed: a write that fails then (a full disk) loses nothing.
    out = getattr(args, "out", None)
    if out:
        sys.stdout.flush()
        try:
            write_json(out, result)
        except OSError as e:
            print(f"semshare: error: --out: cannot write {out}: {e.strerror or e}", file=sys.stderr)
            return 2
    return 0
