"""`semshare run`: full prefill against reuse on your own reference and target files."""
from __future__ import annotations

from typing import Dict

from .common import compare, load_engine, model_args, read_text, show_comparison


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="full prefill vs reuse on your own reference and target files")
    p.add_argument("--reference", required=True)
    p.add_argument("--target", required=True)
    model_args(p)


def run(args) -> Dict:
    reference, target = read_text(args.reference, "--reference"), read_text(args.target, "--target")
    return compare(load_engine(args), reference, target, args.max_new_tokens)


show = show_comparison
