"""Time to first token inside vLLM: its own full prefill, its prefix cache, and semantic reuse (semshare_ops.vllm).

    PYTHONPATH=$PWD:$PWD/build/vllm-plugin VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind \\
        .venv-vllm/bin/python benchmarks/vllm_e2e.py [--model DIR] [--length 4096] [--edit 0.1] [--prompts 2] \\
        [--repeat 2] [--recompute-ratio 0.2 ...] [--in-process] [--out benchmarks/results/vllm_e2e_cpu.json]

(`make test-vllm` builds `.venv-vllm`, the converted model in build/smollm2-135m-fp32 and the plugin's entry point in
build/vllm-plugin.) One vLLM engine with the connector serves every method, request by request, so that all of them
run in the same process, a few seconds apart (the machine's speed drifts by tens of percent within a minute):

- reference: each real prompt (`--length` tokens of ShareGPT answers, as `semshare bench e2e` takes them) is served
  once per round under a fresh `cache_salt`, untimed: it fills vLLM's prefix cache and becomes the donor;
- target: the same prompt with `--edit` of its tokens replaced, inserted or deleted in short spans scattered over
  the text (`semshare_ops.bench.e2e.edit_tokens`), served by
  - `full`: vLLM's own full prefill (reuse off, a salt of its own: no prefix-cache hit);
  - `reuse`: semantic reuse from the reference (one run per `--recompute-ratio`), on top of vLLM's exact prefix hit;
  - `prefix`: vLLM's prefix cache (reuse off, the reference's salt: its exact common prefix is a hit), after the
    reuse runs, which leave nothing in the prefix cache;
  each with max_tokens=1; TTFT is the wall time of `LLM.generate` for that one request. The methods run in a
  different order each round. Every run's stats and `num_cached_tokens` are recorded, and the CPU seconds each
  process spent on the request (`cpu_s`: this one, vLLM's engine core and its worker, by process title), which show
  where two cores go besides the model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for key, value in {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(key, value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "build" / "smollm2-135m-fp32"),
                        help="HF model directory (converted from the embedded GGUF when missing)")
    parser.add_argument("--length", type=int, default=4096, help="reference prompt tokens")
    parser.add_argument("--edit", type=float, default=0.1, help="share of tokens edited in the target")
    parser.add_argument("--prompts", type=int, default=2, help="distinct real prompts")
    parser.add_argument("--repeat", type=int, default=2, help="rounds per prompt")
    parser.add_argument("--recompute-ratio", type=float, nargs="+", default=[0.2])
    parser.add_argument("--in-process", action="store_true",
                        help="run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) for every "
                             "method: one process instead of two on a small machine")
    parser.add_argument("--out", help="JSON file to write")
    return parser.parse_args(argv)


def prompts(tokenizer, length: int, count: int):
    from semshare_ops.bench.e2e import text_prompt

    ids = text_prompt(tokenizer, length * count)
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def cpu_seconds() -> dict:
    """User + system CPU seconds used so far by this process (`caller`) and by each of its descendants, by process
    title (vLLM titles its engine core and worker processes `VLLM::EngineCore` and `VLLM::Worker`)."""
    import psutil  # a vLLM dependency

    caller = psutil.Process()
    used = {"caller": sum(caller.cpu_times()[:2])}
    for child in caller.children(recursive=True):
        try:
            used[child.name()] = used.get(child.name(), 0.0) + sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return used


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.in_process:  # read by vLLM when the engine starts
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import semshare_ops.vllm as ssv
    from semshare_ops.bench.e2e import edit_tokens
    from semshare_ops.bench.provenance import environment
    from semshare_ops.vllm.convert import convert_gguf

    if not (Path(args.model) / "config.json").is_file():
        convert_gguf(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    references = prompts(tokenizer, args.length, args.prompts)
    targets = [edit_tokens(ref, args.edit, seed=1000 + i) for i, ref in enumerate(references)]
    llm = LLM(args.model, dtype="float32", enforce_eager=True, max_model_len=8192, seed=0,
              **ssv.engine_args(recompute_ratio=args.recompute_ratio[0]))

    def serve(ids, salt, options):
        params = SamplingParams(temperature=0, max_tokens=1,
                                extra_args={"kv_transfer_params": {"semshare": options}})
        before = cpu_seconds()
        start = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": list(ids), "cache_salt": salt}], params, use_tqdm=False)[0]
        seconds = time.perf_counter() - start
        cpu_s = {name: used - before.get(name, 0.0) for name, used in cpu_seconds().items()}
        return {"ttft_s": seconds, "cpu_s": cpu_s, "num_cached_tokens": out.num_cached_tokens,
                "prompt_tokens": len(ids), "token": list(out.outputs[0].token_ids),
                "stats": (out.kv_transfer_params or {}).get("semshare")}

    serve(references[0][:64], "warm-up", {"save": False})
    off = {"reuse": False, "save": False}
    runs = []
    for round_ in range(args.repeat):
        for i, (ref, target) in enumerate(zip(references, targets)):
            salt = f"p{i}-r{round_}"
            donor = serve(ref, salt, {})
            record = {"prompt": i, "round": round_, "reference_tokens": len(ref), "target_tokens": len(target),
                      "reference_ttft_s": donor["ttft_s"]}
            methods = [("full", lambda: serve(target, f"{salt}-full", off))]
            methods += [(f"reuse@{r}", lambda r=r: serve(target, salt, {"save": False, "recompute_ratio": r}))
                        for r in args.recompute_ratio]
            methods += [("prefix", lambda: serve(target, salt, off))]
            if (round_ + i) % 2:  # full last in every other round; prefix stays after reuse (see the docstring)
                methods = methods[1:] + methods[:1]
            for name, run in methods:
                record[name] = run()
                print(f"prompt {i} round {round_} {name:>10}: {record[name]['ttft_s']:7.2f} s "
                      f"cached {record[name]['num_cached_tokens']}", file=sys.stderr, flush=True)
            runs.append(record)
    summary = {}
    names = ["full", "prefix"] + [f"reuse@{r}" for r in args.recompute_ratio]
    for name in names:
        ttfts = [r[name]["ttft_s"] * 1e3 for r in runs]
        speedups = [r["full"]["ttft_s"] / r[name]["ttft_s"] for r in runs]
        row = {"mean_ttft_ms": statistics.mean(ttfts), "median_ttft_ms": statistics.median(ttfts),
               "min_ttft_ms": min(ttfts), "max_ttft_ms": max(ttfts),
               "speedup_vs_full_median": statistics.median(speedups), "speedup_vs_full_runs": speedups,
               "mean_cached_tokens": statistics.mean(r[name]["num_cached_tokens"] for r in runs),
               "mean_cpu_s": {proc: statistics.mean(r[name]["cpu_s"].get(proc, 0.0) for r in runs)
                              for proc in sorted({p for r in runs for p in r[name]["cpu_s"]})}}
        if name.startswith("reuse"):
            stats = [r[name]["stats"] for r in runs]
            row["modes"] = sorted({s["mode"] for s in stats})
            row["mean_reuse_ratio"] = statistics.mean(s["reuse_ratio"] for s in stats)
            row["mean_load_ms"] = statistics.mean(s.get("load_ms", 0.0) for s in stats)
            row["first_token_equal_to_full"] = sum(r[name]["token"] == r["full"]["token"] for r in runs) / len(runs)
        summary[name] = row
    import vllm

    result = {"environment": {**environment("cpu"), "vllm": vllm.__version__,
                              "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
              "settings": {**vars(args), "engine": "vllm", "dtype": "float32", "enforce_eager": True,
                           "enable_prefix_caching": True, "max_tokens": 1,
                           "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")},
              "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
