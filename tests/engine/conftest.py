"""Fixtures of the engine tests: one tiny model per architecture and module, a reference prompt and its entry."""

import pytest

from engine_testutils import REF_LEN, FakeTokenizer, build_model, engine_for, rand_tokens


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return build_model(arch, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return FakeTokenizer()


@pytest.fixture(scope="module")
def reference_ids():
    ids = rand_tokens(REF_LEN, seed=100)
    assert len(set(ids)) > 100  # not constant data
    return ids


@pytest.fixture(scope="module")
def ref_entry(model, tokenizer, reference_ids):
    """The reference entry; it only depends on the model, not on the engine's config."""
    return engine_for(model, tokenizer).prefill(reference_ids)
