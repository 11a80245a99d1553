"""What the `semshare` commands share: parsing that exits 2 with one line, files, configs, the model, output."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

DTYPES = ("float32", "bfloat16", "float16")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        print(f"semshare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


class UsageError(Exception):
    """Bad input found after parsing (a missing file, a bad value): reported in one line, exit code 2."""


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def model_args(p, ratios: bool = False) -> None:
    """The arguments of the commands that load a model and serve prompts."""
    p.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    if ratios:
        p.add_argument("--recompute-ratio", type=float, nargs="+", default=[0.2],
                       help="one or more recompute ratios (the first gives the top-level keys; default: 0.2)")
    else:
        p.add_argument("--recompute-ratio", type=float, default=0.2,
                       help="share of the prompt's tokens recomputed, averaged over layers, spent after the exact "
                            "common prefix (default: 0.2; 1.0 gives full prefill's tokens)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="(default: float32)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def read_text(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what}: no such file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: not UTF-8 text: {path} (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise UsageError(f"{what}: file is empty: {path}")
    return text


def reuse_config(recompute_ratio: float):
    from ..engine import ReuseConfig

    try:  # checked before the (slow) model load
        return ReuseConfig(recompute_ratio=recompute_ratio)
    except ValueError as e:
        raise UsageError(f"--recompute-ratio: {e}") from e


def load(args, device: Optional[str] = None):
    """(model, tokenizer) of --model (default: the embedded SmolLM2) in --dtype, on `device`."""
    from ..engine import models  # through the module: tests substitute models.load_model

    if args.model is not None:
        where = Path(args.model)
        if not (where / "config.json").is_file():
            raise UsageError(f"--model: {args.model} is not a Hugging Face model directory (no config.json)")
    try:
        model, tokenizer = models.load_model(args.model, dtype=torch_dtype(args.dtype), progress=not args.json)
    except (FileNotFoundError, ModuleNotFoundError) as e:  # no such directory; the embedded model not installed
        raise UsageError(f"--model: {e}") from e
    except (OSError, ValueError) as e:  # a directory transformers cannot load: one line, not a traceback
        raise UsageError(f"--model: cannot load {args.model or 'the embedded model'}: "
                         f"{str(e).strip().splitlines()[0]}") from e
    return (model.to(device) if device else model), tokenizer


def load_engine(args, config=None):
    from ..engine import ReuseEngine

    config = config or reuse_config(args.recompute_ratio)
    model, tokenizer = load(args)
    try:
        engine = ReuseEngine(model, tokenizer, config)
    except ValueError as e:  # a model the engine refuses (no rotary positions, ...): one line, not a traceback
        raise UsageError(f"--model: {e}") from e
    engine.generate("Hello", max_new_tokens=1)  # warm-up: thread pools and first-call costs stay out of TTFT
    return engine


def device_of(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: not a device: {device!r} (expected cpu, cuda or cuda:N)") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no GPU")
    count = torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and (torch.device(device).index or 0) >= count:  # else a traceback at the first CUDA call
        raise UsageError(f"--device: no {device}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def check_out(path: Optional[str], **inputs: Optional[str]) -> None:
    """--out is checked before the work it records: a directory or an unwritable place would lose the result, and an
    input file (`inputs`: flag name -> path, e.g. pairs=args.pairs) would be overwritten by it."""
    if path is None:
        return
    p = Path(path).resolve()  # write_json writes through a link to its target: the checks look at the target too
    if p.is_dir():
        raise UsageError(f"--out: {path} is a directory; give a file name")
    for flag, other in inputs.items():  # the same file under two names too: a link, a hard link, `./x`
        if other is not None and (p == Path(other).resolve()
                                  or p.exists() and Path(other).exists() and os.path.samefile(p, other)):
            raise UsageError(f"--out: {path} is the --{flag.replace('_', '-')} file; the result would overwrite it")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"--out: cannot write {path}")
    # write_json makes the missing folders: the nearest one that exists must be a folder it can write into.
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--out: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"--out: cannot write into {ancestor}")


def write_json(path: Optional[str], result: Dict) -> None:
    """`result` to `path`, indented. Through a temporary file in the same folder and a rename: a write that fails
    part-way (a full disk) leaves an earlier result at `path` whole, not half overwritten."""
    if not path:
        return
    p = Path(path).resolve()  # a link is written through to its target, as a plain write would, not replaced
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            tmp.unlink()
        raise


def side(out) -> Dict:
    return {"text": out.text, "token_ids": out.token_ids, "stats": out.stats}


def compare(engine, reference: str, target: str, max_new_tokens: int) -> Dict:
    """Full prefill vs reuse of `reference` for `target`, through the same decode path."""
    try:
        entry = engine.prefill(reference)
        full = engine.generate(target, max_new_tokens=max_new_tokens)
        reuse = engine.generate(target, reference=entry, max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise UsageError(str(e)) from e
    return {"full": side(full), "reuse": side(reuse),
            "speedup": round(full.stats["ttft_ms"] / max(reuse.stats["ttft_ms"], 1e-9), 3)}


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 52) -> str:
    left_lines = [left_title, "-" * width] + textwrap.wrap(left.strip(), width)
    right_lines = [right_title, "-" * width] + textwrap.wrap(right.strip(), width)
    rows = max(len(left_lines), len(right_lines))
    left_lines += [""] * (rows - len(left_lines))
    right_lines += [""] * (rows - len(right_lines))
    return "\n".join(f"{a:<{width}}  |  {b}" for a, b in zip(left_lines, right_lines))


def show_comparison(result: Dict) -> None:
    full, reuse = result["full"]["stats"], result["reuse"]["stats"]
    print(f"\nprompt: {full['prompt_tokens']} tokens; reuse mode '{reuse['mode']}', "
          f"{reuse['matched_tokens']} tokens matched (similarity {reuse['similarity'] or 0:.2f}), "
          f"reuse ratio {reuse['reuse_ratio']:.2f}"
          + ("" if reuse["kv_bytes"] == reuse["kv_bytes_full"] else
             f", KV cache {reuse['kv_bytes'] / 1e6:.1f} MB against {reuse['kv_bytes_full'] / 1e6:.1f} MB for full "
             "prefill") + "\n")
    print(_side_by_side(f"full prefill: TTFT {full['ttft_ms']:.0f} ms", result["full"]["text"],
                        f"reuse: TTFT {reuse['ttft_ms']:.0f} ms", result["reuse"]["text"]))
    same = result["full"]["token_ids"] == result["reuse"]["token_ids"]
    print(f"\nspeedup of time to first token: {result['speedup']:.2f}x; outputs "
          + ("identical" if same else "differ (reuse is approximate below --recompute-ratio 1.0, which gives the "
                                      "full prefill's tokens)"))
