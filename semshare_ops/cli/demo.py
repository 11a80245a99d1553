"""`semshare demo`: the built-in pair of similar prompts, full prefill against reuse."""
from __future__ import annotations

from typing import Dict

from .common import compare, load_engine, model_args, show_comparison

HELP = "a built-in pair of similar prompts: full prefill vs reuse"


def add_parser(sub) -> None:
    model_args(sub.add_parser("demo", help=HELP))


def run(args) -> Dict:
    from ..engine.prompts import DEMO_REFERENCE, DEMO_TARGET, as_chat

    engine = load_engine(args)
    return compare(engine, as_chat(engine.tokenizer, DEMO_REFERENCE), as_chat(engine.tokenizer, DEMO_TARGET),
                   args.max_new_tokens)


show = show_comparison
