"""The package's sub-packages depend one way: ops <- engine <- store <- vllm <- {cli, bench, eval}.

Checked twice: statically, over every import statement of every module (function-local imports included), and by
importing the library in a fresh interpreter and looking at what got loaded.
"""
import ast
import subprocess
import sys
from pathlib import Path

import semshare_ops

PACKAGE = Path(semshare_ops.__file__).resolve().parent

# Layer of each sub-package; a module may import its own sub-package and lower layers only. Among the leaves, the
# CLI runs the benchmarks and the evaluation, and the end-to-end benchmark reads ShareGPT through eval.
LAYERS = {"ops": 0, "engine": 1, "store": 2, "vllm": 3, "bench": 4, "eval": 4, "cli": 5}
LEAF_EXCEPTIONS = {("bench", "eval")}
LEAVES = ("cli", "bench", "eval")


def subpackage(module: str) -> str:
    """'semshare_ops.engine.hf' -> 'engine'; the top-level package and _C are 'root'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "root"


def imports_of(path: Path) -> set:
    """Fully qualified semshare_ops modules that a file imports (relative imports resolved)."""
    module = ".".join(("semshare_ops",) + path.relative_to(PACKAGE).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module[: -len(".__init__")]
        package = module
    else:
        package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("semshare_ops")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("semshare_ops"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import ops` names a module
    return found


def test_imports_point_one_way():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = subpackage(".".join(("semshare_ops",) + path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imports_of(path):
            dst = subpackage(target)
            if src == "root" or dst in ("root", src) or (src, dst) in LEAF_EXCEPTIONS:
                continue  # the top-level package: test_the_top_level_package_loads_no_subpackage_eagerly_but_ops
            if LAYERS[dst] >= LAYERS[src] or (dst in LEAVES and src != "cli"):
                bad.append(f"{path.relative_to(PACKAGE)} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_top_level_package_loads_no_subpackage_eagerly_but_ops():
    for target in imports_of(PACKAGE / "__init__.py"):
        assert subpackage(target) in ("root", "ops"), target


def test_the_library_loads_no_cli_bench_or_eval_module():
    code = ("import sys, semshare_ops as ss, semshare_ops.engine, semshare_ops.store; ss.ReuseEngine; ss.KVStore; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('semshare_ops'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "semshare_ops.engine.engine" in loaded and "semshare_ops.store.store" in loaded, loaded
    leaked = [m for m in loaded if subpackage(m) in LEAVES]
    assert not leaked, f"the library imported {leaked}"


def test_the_layering_check_can_fail(tmp_path, monkeypatch):
    """A planted upward import must be reported (a test that cannot fail is a defect)."""
    fake = tmp_path / "semshare_ops"
    (fake / "engine").mkdir(parents=True)
    (fake / "cli").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("from ..cli import main\n")
    (fake / "cli" / "__init__.py").write_text("from ..engine import ReuseEngine\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    try:
        test_imports_point_one_way()
    except AssertionError as err:
        assert "engine/__init__.py (engine) imports semshare_ops.cli" in str(err)
        assert "cli/__init__.py" not in str(err)
    else:
        raise AssertionError("the planted upward import was not reported")
