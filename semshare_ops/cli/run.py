"""`semshare run`: full prefill against reuse on your own reference and target files."""
from __future__ import annotations

from typing import Dict

from .common import compare, load_engine, model_args, read_text, show_comparison


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="full prefill vs reuse on your own reference and target files")
    p.add_argument("--reference", required=True)
    p.add_argument("--target", required=True)
    # As `demo` and `eval` do: an instruct model given raw text often answers with nothing at all (SmolLM2-Instruct
    # ends the demo's raw text at once), so each file is one user turn of the model's chat template unless this says
    # the files are already the prompts as the model should see them.
    p.add_argument("--no-chat-template", action="store_true",
                   help="serve the files' text as given, not as a user turn of the model's chat template")
    model_args(p)


def run(args) -> Dict:
    from ..engine.prompts import as_chat

    reference, target = read_text(args.reference, "--reference"), read_text(args.target, "--target")
    engine = load_engine(args)
    if not args.no_chat_template:
        reference, target = as_chat(engine.tokenizer, reference), as_chat(engine.tokenizer, target)
    return compare(engine, reference, target, args.max_new_tokens)


show = show_comparison
