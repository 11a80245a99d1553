"""`semshare bench ops|e2e`: the ops against their baselines and the device's ceilings; TTFT of full prefill
against reuse and other reuse methods, end to end."""
from __future__ import annotations

import contextlib
from typing import Dict

from .common import DTYPES, UsageError, check_out, device_of, load, reuse_config, torch_dtype

METHODS = ["full", "hf", "prefix", "cacheblend", "semshare", "decode"]  # bench.e2e.METHODS, without importing it


# The flags of one sub-command, with their defaults: they parse as None so that one given to the other sub-command is
# refused by name, not silently ignored (run() fills the defaults in).
OPS = ["simhash", "hamming_topk", "rope_reuse_", "partial_attn"]  # bench.ops.OPS, without importing it
OPS_DEFAULTS = {"models": ["smollm2-135m"], "ratios": [0.1, 0.2, 1.0], "windows": [], "ops": OPS}
E2E_DEFAULTS = {"model": None, "shape": None, "layers": None, "edit_levels": [0.02, 0.1, 0.3], "methods": METHODS,
                "repeat": 3, "recompute_ratio": [0.2]}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="microbenchmarks of the ops (ops) or TTFT of full prefill vs reuse (e2e)")
    p.add_argument("what", choices=["ops", "e2e"], metavar="{ops,e2e}",
                   help="ops: the ops against their baselines; e2e: TTFT of full prefill vs reuse")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--models", nargs="+", default=None, help="ops: model shapes (default: smollm2-135m)")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="prompt lengths in tokens (ops: 1024 4096, add 8192 16384 on GPUs; e2e: 1024 2048 4096)")
    p.add_argument("--ratios", nargs="+", type=float, default=None, help="ops: recompute ratios (default: 0.1 0.2 1.0)")
    p.add_argument("--windows", nargs="+", type=int, default=None,
                   help="ops: also time partial_attn with these sliding windows (positions; default: none)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, help="ops: the ops to time (default: all)")
    p.add_argument("--model", default=None, help="e2e: local HF model directory (default: embedded SmolLM2)")
    p.add_argument("--shape", default=None, help="e2e: random-weight model of a real shape (llama3-8b, "
                   "qwen2.5-7b) instead of a real model: speed only")
    p.add_argument("--layers", type=int, default=None, help="e2e --shape: truncate to this many layers")
    p.add_argument("--edit-levels", nargs="+", type=float, default=None,
                   help="e2e: share of the reference's tokens edited to make each target (default: 0.02 0.1 0.3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="e2e: hf is the model's own forward and attention with HF's cache, through the engine's "
                   "dispatch, timed in the same run (default: all)")
    p.add_argument("--repeat", type=int, default=None,
                   help="e2e: timed runs per method and prompt, in rounds over the methods after one untimed round "
                   "(default: 3)")
    p.add_argument("--recompute-ratio", type=float, nargs="+", default=None,
                   help="e2e: semshare's recompute ratio; several: one semshare row per ratio (default: 0.2)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="ops: default bfloat16 (float32 is the fast path of CPUs without AMX); "
                   "e2e: default float32 for real models, bfloat16 for --shape")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args) -> Dict:
    import torch

    mine, others = (OPS_DEFAULTS, E2E_DEFAULTS) if args.what == "ops" else (E2E_DEFAULTS, OPS_DEFAULTS)
    for name in others:
        if getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')}: not an option of bench {args.what}")
    for name, default in mine.items():
        if getattr(args, name) is None:
            setattr(args, name, list(default) if isinstance(default, list) else default)
    if args.what == "e2e" and args.model is not None and args.shape is not None:
        raise UsageError("--model: not with --shape (a --shape model is a random-weight model of that shape)")
    if args.what == "e2e" and args.layers is not None and args.shape is None:
        raise UsageError("--layers: only with --shape (it truncates the random-weight model)")
    if args.lengths is None:
        args.lengths = [1024, 4096] if args.what == "ops" else [1024, 2048, 4096]
    if args.dtype is None:
        args.dtype = "bfloat16" if args.shape or args.what == "ops" else "float32"
    if args.what == "e2e" and args.repeat < 1:
        raise UsageError("--repeat: must be at least 1")
    check_out(args.out)
    device = device_of(args)
    # The timing (CUDA events, synchronisation, memory statistics) and the device's name in the record are those of
    # the current CUDA device: make it the one asked for (cuda:1 would otherwise be timed on cuda:0's clock).
    with torch.cuda.device(device) if device.startswith("cuda") else contextlib.nullcontext():
        return run_e2e(args, device) if args.what == "e2e" else run_ops(args, device)


def run_ops(args, device: str) -> Dict:
    from ..bench.ops import SHAPES, device_ceilings, format_ceilings, format_table, run_ops as bench_ops
    from ..bench.provenance import environment

    unknown = [m for m in args.models if m not in SHAPES]
    if unknown:
        raise UsageError(f"--models: unknown {unknown}; expected some of {sorted(SHAPES)}")
    if any(n < 2 for n in args.lengths):
        raise UsageError("--lengths: every length must be at least 2 tokens")
    if any(not 0 < r <= 1 for r in args.ratios):
        raise UsageError("--ratios: every ratio must lie in (0, 1]")
    if any(w < 1 for w in args.windows):
        raise UsageError("--windows: every window must be at least 1 position")
    dtype = torch_dtype(args.dtype)
    ceilings = device_ceilings(device, dtype)  # once, so every record's percentage uses the same numbers
    if not args.json:  # the table row by row as measured (show adds nothing after it)
        print(format_ceilings(ceilings) + "\n" + format_table([]).splitlines()[0], flush=True)
    records = bench_ops(device, args.models, args.lengths, args.ratios,
                        progress=(lambda r: None) if args.json else
                        (lambda r: print(format_table([r]).splitlines()[1], flush=True)),
                        dtype=dtype, ceilings=ceilings, windows=args.windows, ops_to_time=args.ops)
    return {**environment(device), "dtype": args.dtype, "ceilings": ceilings, "records": records}


def run_e2e(args, device: str) -> Dict:
    from ..bench import e2e
    from ..bench.provenance import environment
    from ..bench.shapes import random_model, random_prompt
    from ..engine import ReuseEngine

    configs = [reuse_config(r) for r in args.recompute_ratio]  # every ratio is checked before a model loads
    if any(n < 16 for n in args.lengths):
        raise UsageError("--lengths: every prompt length must be at least 16 tokens")
    if any(not 0 <= x < 1 for x in args.edit_levels):
        raise UsageError("--edit-levels: every level must lie in [0, 1) (0: the reference itself)")
    if args.shape:
        try:
            model, tokenizer = random_model(args.shape, args.layers, torch_dtype(args.dtype), device)
        except ValueError as e:
            raise UsageError(f"--shape/--layers: {e}") from e
        vocab = model.config.vocab_size
        prompt = lambda n: random_prompt(vocab, n, seed=n)  # noqa: E731
        model_name = f"{args.shape} (random weights, {model.config.num_hidden_layers} layers)"
    else:
        model, tokenizer = load(args, device)
        text_ids = e2e.text_prompt(tokenizer, max(args.lengths))
        prompt = lambda n: text_ids[:n]  # noqa: E731
        model_name = model.name_or_path
    try:
        engine = ReuseEngine(model, tokenizer, configs[0])
    except ValueError as e:  # a model the engine refuses (no rotary positions, ...): one line, not a traceback
        raise UsageError(f"{'--shape' if args.shape else '--model'}: {e}") from e
    limit = engine.max_positions
    if limit and max(args.lengths) * (1 + max(args.edit_levels)) + 1 > limit:
        raise UsageError(f"--lengths: edited prompts of {max(args.lengths)} tokens may exceed the model's context "
                         f"of {limit}")
    if not args.json:  # the table row by row as measured (show adds nothing after it)
        print("\n".join(e2e.format_e2e([]).splitlines()[:2]), flush=True)
    records = e2e.run_e2e(engine, prompt, args.lengths, args.edit_levels, args.methods, args.repeat,
                          progress=(lambda r: None) if args.json else
                          (lambda r: print(e2e.format_e2e([r]).splitlines()[2], flush=True)),
                          recompute_ratios=args.recompute_ratio if len(args.recompute_ratio) > 1 else ())
    return {**environment(device), "model": model_name, "dtype": args.dtype, "records": records}


def show(result: Dict) -> None:
    """Nothing: without --json, run() printed the table row by row as it measured them (it once printed it again
    here)."""
