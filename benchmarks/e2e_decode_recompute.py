"""What decode-time recompute (ReuseConfig.decode_recompute) costs in time, on `semshare bench e2e`'s prompts.

    python benchmarks/e2e_decode_recompute.py [--lengths 1024 2048 4096] [--edit-levels 0.1 0.3]
                                              [--rows 0 64 256] [--new-tokens 48] [--repeat 2]
                                              [--out benchmarks/results/e2e_decode_recompute_cpu.json]

For each prompt (the e2e benchmark's text and edits), a full prefill and semshare at the default config with each
--rows value generate --new-tokens greedy tokens; a streamer stamps every token. Recorded per request (means over
--repeat runs): TTFT, the mean time per output token after the first (TPOT), the TPOT over the steps that recomputed
rows and over the rest, the time to the last token, and the rows recomputed during decode. Run it alone on the
machine.
"""
import argparse
import dataclasses
import json
import statistics
import time

import torch
from transformers.generation.streamers import BaseStreamer

from semshare_ops.bench import e2e
from semshare_ops.bench.provenance import environment
from semshare_ops.engine import ReuseConfig, ReuseEngine, load_model


class Stamps(BaseStreamer):
    """The time of every put after the prompt's (one per new token)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def timed(engine: ReuseEngine, target, entry, new_tokens: int) -> dict:
    stamps = Stamps()
    start = time.perf_counter()
    out = engine.generate(target, reference=entry, max_new_tokens=new_tokens, streamer=stamps)
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]  # step i + 1's time
    rows = engine.config.decode_recompute
    healing = -(-out.stats["decode_recomputed_tokens"] // rows) if rows else 0  # steps that recomputed rows
    return {"ttft_ms": (stamps.times[0] - start) * 1e3, "total_ms": (stamps.times[-1] - start) * 1e3,
            "tpot_ms": statistics.fmean(steps) * 1e3,
            "tpot_recomputing_ms": statistics.fmean(steps[:healing]) * 1e3 if healing else None,
            "tpot_after_ms": statistics.fmean(steps[healing:]) * 1e3 if healing < len(steps) else None,
            "decode_recomputed_tokens": out.stats["decode_recomputed_tokens"], "reuse_ratio": out.stats["reuse_ratio"],
            "mode": out.stats["mode"], "new_tokens": len(out.token_ids)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--edit-levels", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--rows", nargs="+", type=int, default=[0, 64, 256])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, tokenizer = load_model(progress=False)
    engine = ReuseEngine(model, tokenizer)
    engine.generate([1, 2, 3, 4], max_new_tokens=2)  # warm-up outside the timings
    text_ids = e2e.text_prompt(tokenizer, max(args.lengths))
    records = []
    for length in args.lengths:
        reference = text_ids[:length]
        entry = engine.prefill(reference)
        for level in args.edit_levels:
            target = e2e.edit_tokens(reference, level, seed=length)  # the e2e benchmark's seed
            for rows in [None] + args.rows:  # None: full prefill
                config = dataclasses.replace(ReuseConfig(), decode_recompute=rows or 0)
                with engine.using(config):
                    runs = [timed(engine, target, None if rows is None else entry, args.new_tokens)
                            for _ in range(args.repeat)]
                record = {"prompt_tokens": len(target), "edited_share": level,
                          "method": "full" if rows is None else "semshare", "decode_recompute": rows or 0,
                          **{k: runs[0][k] for k in ("decode_recomputed_tokens", "reuse_ratio", "mode",
                                                     "new_tokens")}}
                for key in ("ttft_ms", "total_ms", "tpot_ms", "tpot_recomputing_ms", "tpot_after_ms"):
                    values = [r[key] for r in runs if r[key] is not None]
                    record[key] = statistics.fmean(values) if values else None
                records.append(record)
                fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
                print(f"{len(target):>5} {level:.2f} {record['method']:<8} rows {rows or 0:>4} reuse "
                      f"{record['reuse_ratio']:.2f} TTFT {fmt(record['ttft_ms'])} TPOT {fmt(record['tpot_ms'])} "
                      f"(recomputing {fmt(record['tpot_recomputing_ms'])}, after {fmt(record['tpot_after_ms'])}) "
                      f"total {fmt(record['total_ms'])} ms, {record['decode_recomputed_tokens']} rows", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**environment(), "model": model.name_or_path, "dtype": "float32",
                       "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
