"""`semshare bench ops` with an earlier commit's kernels and with this tree's, in one run, back to back.

    python benchmarks/ops_against_commit.py COMMIT [--ops hamming_topk] [--models smollm2-135m llama3-8b]
                                            [--lengths 1024 4096] [--rounds 3] [--dtype float32]
                                            [--out benchmarks/results/ops_against_<commit>_cpu.json]

What "this kernel is x times faster" needs: both kernels timed under the same conditions. The commit's extension is
built in a temporary git worktree (commit_tree.py) and timed under this tree's Python (a copy of the package with the
commit's extension in it), so the two differ only in their kernels and `bench ops` takes the same flags. Each round
runs the commit's kernels, then this tree's, so that a slow spell of the VM falls on both. Each record carries `tree`
("commit" or "this") and `round`; the summary gives, per op and setting, the median time of each tree over the
rounds and their ratio.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from commit_tree import REPO, built_extension, commit_tree, git, save_comparison

SETTING = ("op", "model", "tokens", "bits", "k", "reuse", "ratio", "window", "dtype")  # what names a record's case


def bench(package_root: Path, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "semshare_ops.cli", "bench", "ops", "--dtype", args.dtype, "--ops", *args.ops,
           "--models", *args.models, "--lengths", *map(str, args.lengths), "--json", "--out", str(out)]
    subprocess.run(cmd, cwd=package_root, env={**os.environ, "PYTHONPATH": str(package_root)}, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit")
    parser.add_argument("--ops", nargs="+", default=["hamming_topk"])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama3-8b"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    commit = git("rev-parse", args.commit)
    built = built_extension()
    records, provenance = [], {}
    with commit_tree(commit) as (old, extension), tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for tree, so in (("commit", next((old / "semshare_ops").glob("_C*.so"))), ("this", built)):
            roots[tree] = Path(tmp) / tree
            shutil.copytree(REPO / "semshare_ops", roots[tree] / "semshare_ops",
                            ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
            shutil.copy(so, roots[tree] / "semshare_ops" / so.name)
        for rnd in range(args.rounds):
            for tree, root in roots.items():
                result = bench(root, args, Path(tmp) / "run.json")
                provenance.setdefault(tree, {k: v for k, v in result.items() if k != "records"})
                records += [{**r, "tree": tree, "round": rnd} for r in result["records"]]
                print(f"round {rnd} {tree}: " + ", ".join(f"{r['op']} {r['model']} {r['tokens']} {r['us']:.0f} us"
                                                         for r in result["records"]), flush=True)

    summary = []
    for case in dict.fromkeys(tuple(r.get(k) for k in SETTING) for r in records):
        named = {k: v for k, v in zip(SETTING, case) if v is not None}
        times = {tree: [r["us"] for r in records if r["tree"] == tree and tuple(r.get(k) for k in SETTING) == case]
                 for tree in ("commit", "this")}
        if not all(times.values()):
            print(f"{named}: timed by one tree only, left out of the summary")
            continue
        us = {tree: statistics.median(t) for tree, t in times.items()}
        summary.append({**named, "commit_us": us["commit"], "this_us": us["this"],
                        "speedup": us["commit"] / us["this"]})
        print(f"{named}: commit {us['commit']:.0f} us, this {us['this']:.0f} us, x{us['commit'] / us['this']:.2f}")
    save_comparison(args.out, commit, extension, provenance, summary, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
