"""What the matrix products of a one-token forward read, and how fast torch reads them on this CPU.

    python benchmarks/decode_weights.py [--rounds 7] [--out benchmarks/results/decode_weights_cpu.json]

A decode step (and the last prompt token of a request served by reuse) multiplies one row by every weight of the
model: it reads each weight once, so its time is the weights' bytes over the rate torch's one-row product reads them.
For every `nn.Linear` of the embedded model (SmolLM2-135M-Instruct, fp32; the tied `lm_head` included), in the
model's order, one round times:
- `linear`: `F.linear` of one row, as the model calls it (torch's mm; on an MKL build, MKL's sgemv);
- `linear_1_thread`: the same under `torch.set_num_threads(1)`, which tells whether the product uses both cores;
- `sum`: `W.sum()`, the read ceiling of these very tensors.
Medians over `--rounds` rounds (`bench.timing.paired_median_us`: the methods in turn within each, after one untimed
call of each); GB/s count each weight's bytes once.
"""
import argparse
import json
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)

    import torch

    from semshare_ops.bench.provenance import environment
    from semshare_ops.bench.timing import paired_median_us
    from semshare_ops.engine.models import load_model

    model, _ = load_model(progress=False)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    torch.manual_seed(0)
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    threads = torch.get_num_threads()

    def linear():
        for w in weights:
            torch.nn.functional.linear(rows[w.shape[1]], w)

    def linear_1_thread():
        torch.set_num_threads(1)
        try:
            linear()
        finally:
            torch.set_num_threads(threads)

    def read():
        for w in weights:
            w.sum()

    methods = {"linear": linear, "linear_1_thread": linear_1_thread, "sum": read}
    with torch.inference_mode():
        medians_us = paired_median_us(list(methods.values()), "cpu", repeat=args.rounds)
    summary = {name: {"median_ms": us / 1e3, "gbps": nbytes / us / 1e3} for name, us in zip(methods, medians_us)}
    result = {"environment": environment("cpu"), "weights": len(weights), "weight_bytes": nbytes,
              "rounds": args.rounds, "summary": summary}
    for name, row in summary.items():
        print(f"{name:>16}: {row['median_ms']:7.1f} ms  {row['gbps']:5.1f} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
