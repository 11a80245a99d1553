"""Op microbenchmarks: ours vs the pure-torch reference, SDPA with a mask and FlexAttention, at model shapes.

    python bench/bench_ops.py --device cpu [--models smollm2-135m llama3-8b] [--lengths 1024 4096]
                              [--dtype bfloat16|float32|float16] [--out bench/results/ops_cpu.json]

Lengths of 8192 and 16384 are for GPUs (`--device cuda --lengths 1024 4096 16384`). On a CPU without AMX or
AVX512-BF16, float32 is the fast path (torch's bf16 GEMM there is a scalar loop: see the ceilings it prints).
Writes a JSON file with the environment (device, versions, date, command), the device ceilings every percentage
is computed against, and one record per measurement.
"""
import argparse
import datetime
import json
import os
import platform
import sys

import torch

from semshare_ops import __version__
from semshare_ops.bench import DTYPES, SHAPES, device_ceilings, format_ceilings, format_table, run_ops


def environment(device: str) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "semshare_ops": __version__,
           "torch": torch.__version__, "python": platform.python_version(), "device": device,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama3-8b"], choices=sorted(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 1.0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    ceilings = device_ceilings(args.device, dtype)
    print(format_ceilings(ceilings), flush=True)
    records = run_ops(args.device, args.models, args.lengths, args.ratios,
                      progress=lambda r: print(format_table([r]).splitlines()[1], flush=True),
                      dtype=dtype, ceilings=ceilings)
    print()
    print(format_table(records))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"environment": environment(args.device), "dtype": args.dtype, "ceilings": ceilings,
                       "records": records}, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
