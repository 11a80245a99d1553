"""Fixtures of the store tests: the tiny random Llama with the fake tokenizer (as in the engine tests), and two
engines on it. Helpers the test modules import live in ``store_testutils.py`` next to this file."""

import os
import sys

import pytest

import torch

from semshare_ops.engine import ReuseConfig, ReuseEngine
from semshare_ops.store.retrieval import PromptKeys

from engine_testutils import FakeTokenizer, build_model

# Test modules import `store_testutils` by name; keep that working under --import-mode=importlib too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return build_model("llama", seed=0)


@pytest.fixture(scope="module")
def engine(model):
    return ReuseEngine(model, FakeTokenizer(), ReuseConfig())


@pytest.fixture(scope="module")
def edit_engine(model):
    """Exact token alignment only: a base's cost is exactly its edit distance in target tokens."""
    return ReuseEngine(model, FakeTokenizer(), ReuseConfig(matching="edit"))


@pytest.fixture
def equal_keys(monkeypatch):
    """A useless embedding: every prompt gets the same key, so retrieval's top-k by key is the oldest entries, and a
    base is found through the prefix anchor or the tree alone."""
    monkeypatch.setattr(PromptKeys, "key_of", lambda self, ids, mean: torch.zeros(4, dtype=torch.long))
