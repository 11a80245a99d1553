"""A GGUF model (by default the embedded SmolLM2-135M-Instruct) -> a Hugging Face model directory that vLLM loads.

    python -m semshare_ops.vllm.convert OUT_DIR [--gguf FILE] [--dtype float32|bfloat16]

vLLM reads GGUF files itself only through its own quantised kernels; the engine tests and the benchmark want the
dequantised weights in plain fp32, as the HF engine runs them, so that both engines compute the same model.
transformers dequantises the GGUF on load, but then refuses `save_pretrained` ("quantized with GGUF and is not
serializable") because of the quantizer it leaves on the model: the weights are plain tensors by then, so the
quantizer and the config's `quantization_config` are dropped before saving.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

DONE = ".semshare-converted"  # written last: a directory without it is an interrupted conversion


def convert_gguf(out: str | os.PathLike, gguf: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write the model of `gguf` (None: the embedded SmolLM2) to `out` as safetensors, config and tokenizer files.
    Does nothing when `out` already holds a finished conversion of the same file in the same dtype; a conversion of
    another file or dtype there raises FileExistsError. Returns `out`."""
    from ..engine.models import default_gguf_path

    out = Path(out)
    file = Path(gguf) if gguf is not None else default_gguf_path()
    if (out / DONE).is_file():
        _check_done(out, file, dtype)
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not file.is_file():
        raise FileNotFoundError(f"gguf: no such file: {file}")
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True, dtype=dtype,
                                                 use_kernels=False)  # no Hub layers (engine/models.py)
    if not all(p.dtype == dtype for p in model.parameters()):
        raise RuntimeError(f"{file}: not every weight was dequantised to {dtype}")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # vLLM would try to honour a quantization_config it found in config.json.
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / DONE).write_text(f"{file.resolve()}\n")
    return out


def _check_done(out: Path, file: Path, dtype: torch.dtype) -> None:
    """A finished conversion in `out` is taken only if it is the one asked for: the marker names its GGUF file, and
    its config.json its dtype (what save_pretrained recorded)."""
    held = Path((out / DONE).read_text().strip())
    config = json.loads((out / "config.json").read_text())
    held_dtype = config.get("dtype", config.get("torch_dtype"))
    want_dtype = str(dtype).removeprefix("torch.")
    if held.resolve() != file.resolve() or held_dtype != want_dtype:
        raise FileExistsError(f"out: {out} already holds a conversion of {held} in {held_dtype}, not of {file} in "
                              f"{want_dtype}; give another directory, or remove it to convert again")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m semshare_ops.vllm.convert", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--gguf", help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    print(convert_gguf(args.out, args.gguf, getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
