"""`semshare bench e2e` of an earlier commit and of this tree in one run, on the same prompts, back to back.

    python benchmarks/e2e_against_commit.py COMMIT [--lengths 1024 2048 4096] [--edit-levels 0.02 0.1 0.3]
                                            [--rounds 2] [--out benchmarks/results/e2e_against_<commit>_cpu.json]

What "TTFT within x% of what it was" needs: both codes timed under the same conditions. The commit is checked out in
a temporary git worktree, with this tree's built extension copied in (or, when csrc/ differs between the two, the
commit's own extension built there, CPU kernels only), and each round times every length with the commit's default
config, then with this tree's, alternating so that a slow spell of the machine falls on both. Each record carries
`tree` ("commit" or "this") and `round`; the summary gives, per length and edit level, the mean TTFT of both and
their ratio. The result records this tree's uncommitted changes (`this_tree_changes`) beside its commit.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from commit_tree import REPO, commit_tree, git, save_comparison


def bench(tree: Path, length: int, levels, methods, repeat: int, out: Path) -> tuple:
    """(records, the whole result with its provenance) of one `bench e2e` run from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "semshare_ops.cli", "bench", "e2e", "--lengths", str(length), "--edit-levels",
           *map(str, levels), "--methods", *methods, "--repeat", str(repeat), "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    return result["records"], result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--edit-levels", nargs="+", type=float, default=[0.02, 0.1, 0.3])
    parser.add_argument("--methods", nargs="+", default=["full", "semshare"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    commit = git("rev-parse", args.commit)
    records, provenance = [], {}
    with commit_tree(commit) as (old, extension), tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for length in args.lengths:
                for tree, where in (("commit", old), ("this", REPO)):
                    run, meta = bench(where, length, args.edit_levels, args.methods, args.repeat,
                                      Path(tmp) / "run.json")
                    provenance.setdefault(tree, {k: v for k, v in meta.items() if k != "records"})
                    records += [{**r, "tree": tree, "round": rnd} for r in run]
                    print(f"round {rnd} {length} {tree}: " + ", ".join(
                        f"{r['method']} {r['edited_share']:.2f} {r['mean_ttft_ms']:.0f} ms" for r in run), flush=True)

    summary = []
    keys = sorted({(r["prompt_tokens"], r["edited_share"], r["method"]) for r in records})
    for tokens, level, method in keys:
        runs = {tree: [r for r in records if (r["prompt_tokens"], r["edited_share"], r["method"], r["tree"]) ==
                       (tokens, level, method, tree)] for tree in ("commit", "this")}
        if all(runs.values()):
            a, b = (sum(r["mean_ttft_ms"] for r in v) / len(v) for v in (runs["commit"], runs["this"]))
            summary.append({"prompt_tokens": tokens, "edited_share": level, "method": method, "commit_ttft_ms": a,
                            "this_ttft_ms": b, "ratio": b / a,
                            **{f"{tree}_reuse_ratio": [r["reuse_ratio"] for r in v] for tree, v in runs.items()}})
            print(f"{tokens:>5} {level:.2f} {method:<9} commit {a:8.0f} ms  this {b:8.0f} ms  x{b / a:.2f}")
    save_comparison(args.out, commit, extension, provenance, summary, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
