"""PNG plots of recorded results: TTFT speedup (bench e2e) and output quality (eval) against the recompute ratio.

    python benchmarks/plot_results.py [--results benchmarks/results]

For every `e2e_*.json` in the folder, `<name>_speedup.png`: semshare's `speedup_vs_full` against its recompute
ratio when the file holds several ratios (`semshare bench e2e --recompute-ratio 0.1 0.2 0.35`; one panel per edited
share, one line per prompt length, the other methods as points at their own ratio); with a single ratio,
speedup against the edited share, one panel per method, one line per prompt length.
For every `eval_*.json`, `<name>_quality.png`: ROUGE-L of reuse against full prefill per pair set over the
recompute-ratio sweep, each set's noise floor (full prefill of the target with one leading space vs without:
how far a change that should not matter moves the output) dashed in the same colour.
Needs matplotlib (`pip install matplotlib`, or the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def _load(path: Path) -> Optional[Dict]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"plot_results: skipping {path}: {e}", file=sys.stderr)
        return None
    return result if isinstance(result, dict) else None


def _title(result: Dict, what: str) -> str:
    env = result.get("provenance", {}).get("this", {})  # e2e_against_commit.py nests each tree's provenance
    get = lambda k: result.get(k) or env.get(k)  # noqa: E731
    model = Path(str(get("model") or "?")).name
    parts = [model, get("dtype"), get("device_name") or get("device"), get("date")]
    return f"{what}\n" + ", ".join(str(p) for p in parts if p)


def length_groups(tokens: Sequence[int], spread: float = 1.25) -> Dict[int, int]:
    """prompt_tokens -> a representative length: targets of one nominal length differ by their edits (1023, 1065
    for 1024), lengths of a run differ by 2x or more, so values within `spread` of a group's smallest join it."""
    groups: Dict[int, int] = {}
    members: List[List[int]] = []
    for t in sorted(set(tokens)):
        if members and t <= members[-1][0] * spread:
            members[-1].append(t)
        else:
            members.append([t])
    for group in members:
        for t in group:
            groups[t] = sorted(group)[len(group) // 2]
    return groups


def plot_e2e(result: Dict, out: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result.get("records", []) if "speedup_vs_full" in r and "method" in r]
    if not records:
        return None
    # Files of benchmarks/e2e_budgets.py and e2e_against_commit.py hold several variants / trees / rounds of one method:
    # each variant (or tree) is its own method here, and rounds of one point are averaged, not drawn as a zig-zag.
    merged: Dict[tuple, List[Dict]] = defaultdict(list)
    for r in records:
        tags = ("variant" if r.get("variant") is not None else "budget", "tree")  # older e2e_budgets files: budget
        name = r["method"] + "".join(f" [{r[k]}]" for k in tags if r.get(k) is not None)
        merged[(name, r["prompt_tokens"], r["edited_share"], r.get("recompute_ratio"))].append(r)
    records = [{**runs[0], "method": key[0],
                "speedup_vs_full": sum(x["speedup_vs_full"] for x in runs) / len(runs)} for key, runs in merged.items()]
    length_of = length_groups([r["prompt_tokens"] for r in records])
    ratios = sorted({r.get("recompute_ratio") for r in records
                     if r["method"] == "semshare" and r.get("recompute_ratio") is not None})
    if len(ratios) >= 2:
        shares = sorted({r["edited_share"] for r in records})
        fig, axes = plt.subplots(1, len(shares), figsize=(4.5 * len(shares), 4), squeeze=False, sharey=True)
        for ax, share in zip(axes[0], shares):
            at = [r for r in records if r["edited_share"] == share]
            lines = defaultdict(list)
            for r in at:
                if r["method"] == "semshare":
                    lines[length_of[r["prompt_tokens"]]].append((r["recompute_ratio"], r["speedup_vs_full"]))
            for length, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=f"semshare, ~{length} tokens")
            for method in sorted({r["method"] for r in at if r["method"].split(" [")[0] not in ("semshare", "full")}):
                pts = [(r.get("recompute_ratio") or 0.0, r["speedup_vs_full"]) for r in at if r["method"] == method]
                ax.scatter(*zip(*pts), marker="x", label=method)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{share:.0%} of tokens edited")
            ax.set_xlabel("recompute ratio")
        axes[0][0].set_ylabel("TTFT speedup vs full prefill")
        axes[0][-1].legend(fontsize=7)
    else:
        methods = [m for m in dict.fromkeys(r["method"] for r in records) if m.split(" [")[0] != "full"]
        if not methods:
            return None
        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False, sharey=True)
        for ax, method in zip(axes[0], methods):
            lines = defaultdict(list)
            for r in records:
                if r["method"] == method:
                    lines[length_of[r["prompt_tokens"]]].append((r["edited_share"], r["speedup_vs_full"]))
            for length, points in sorted(lines.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=f"~{length} tokens")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ratio = next((r.get("recompute_ratio") for r in records if r["method"] == method), None)
            ax.set_title(method + ("" if ratio is None else f" (recompute {ratio:g})"))
            ax.set_xlabel("share of tokens edited")
        axes[0][0].set_ylabel("TTFT speedup vs full prefill")
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(_title(result, "time to first token"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_eval(result: Dict, out: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(result.get("sets") or {})
    series["all pairs"] = result.get("sweep") or ([result] if "rougeL" in result else [])
    series = {name: sorted((p for p in points if p.get("rougeL") is not None and "recompute_ratio" in p),
                           key=lambda p: p["recompute_ratio"]) for name, points in series.items()}
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, points) in enumerate(series.items()):
        color = f"C{i}"
        label = f"{name} ({points[0].get('pairs', '?')} pairs)"
        ax.plot([p["recompute_ratio"] for p in points], [p["rougeL"] for p in points], marker="o", color=color,
                label=label)
        floor = points[0].get("rougeL_noise_floor")
        if floor is not None:
            ax.axhline(floor, color=color, linestyle="--", linewidth=1, label=f"{name}: noise floor")
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel("ROUGE-L of reuse vs full prefill")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(_title(result, "output quality"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                        help="folder with e2e_*.json and eval_*.json; the PNGs are written there")
    args = parser.parse_args(argv)
    folder = Path(args.results)
    if not folder.is_dir():
        print(f"plot_results: error: --results: no such folder: {folder}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot_results: error: needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    written = []
    for pattern, plot, suffix in (("e2e_*.json", plot_e2e, "speedup"), ("eval_*.json", plot_eval, "quality")):
        for path in sorted(folder.glob(pattern)):
            result = _load(path)
            if result is None:
                continue
            png = plot(result, path.with_name(f"{path.stem}_{suffix}.png"))
            if png is None:
                print(f"plot_results: nothing to plot in {path}", file=sys.stderr)
            else:
                written.append(png)
                print(f"wrote {png}")
    if not written:
        print(f"plot_results: no e2e_*.json or eval_*.json with results in {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
