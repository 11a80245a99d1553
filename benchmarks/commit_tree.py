"""An earlier commit's tree with an extension of its own kernels, in a temporary git worktree: what the
`*_against_commit.py` benchmarks time this tree against."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def built_extension() -> Path:
    """This tree's built extension, refused when a source in csrc/ or setup.py is newer than it (it would time
    other kernels than the working tree's) or when there are several."""
    built = list((REPO / "semshare_ops").glob("_C*.so"))
    if len(built) != 1:
        raise SystemExit(f"expected one built extension in semshare_ops/, found {[p.name for p in built]}: "
                         "build the extension (make build)")
    sources = [REPO / "setup.py", *(p for p in (REPO / "csrc").rglob("*") if p.is_file())]
    newer = [str(p.relative_to(REPO)) for p in sources if p.stat().st_mtime > built[0].stat().st_mtime]
    if newer:
        raise SystemExit(f"the built extension is older than {newer[:3]}: rebuild it (make build)")
    return built[0]


@contextlib.contextmanager
def commit_tree(commit: str) -> Iterator[Tuple[Path, str]]:
    """(the commit's worktree, "built" or "copied"): when csrc/ differs between the commit and the working tree,
    the commit's own extension is built there (CPU kernels only); otherwise this tree's build is copied in."""
    own_build = bool(git("diff", "--stat", commit, "--", "csrc"))
    built = built_extension()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(tree), commit)
        try:
            if own_build:
                subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True,
                               env={**os.environ, "SEMSHARE_CPU_ONLY": "1"}, stdout=subprocess.DEVNULL)
            else:
                (tree / "semshare_ops" / built.name).write_bytes(built.read_bytes())
            yield tree, "built" if own_build else "copied"
        finally:
            git("worktree", "remove", "--force", str(tree))


def save_comparison(out: Optional[str], commit: str, extension: str, provenance: Dict, summary: List[Dict],
                    records: List[Dict]) -> None:
    """Write a comparison's result, with what it compared: the two commits, this tree's uncommitted changes and how
    the commit's extension was made."""
    if out:
        result = {"command": " ".join(["python", *sys.argv]), "commit": commit, "this": git("rev-parse", "HEAD"),
                  "this_tree_changes": git("diff", "--stat", "HEAD"), "commit_extension": extension,
                  "provenance": provenance, "summary": summary, "records": records}
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
