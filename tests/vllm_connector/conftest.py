"""One vLLM engine with the semshare connector for every test of tests/vllm_connector (starting one takes ~15 s), loaded as
users load it: `engine_args`, the plugin found through its entry point (build/vllm-plugin, `make test-vllm`)."""
import os
from pathlib import Path

import pytest

MODEL = os.environ.get("SEMSHARE_VLLM_MODEL", "")
LENGTH = 640  # tokens of the reference prompt


def _model_dir() -> str:
    pytest.importorskip("vllm")
    if not (Path(MODEL) / "config.json").is_file():
        pytest.skip("no converted model (SEMSHARE_VLLM_MODEL; `make test-vllm` makes one)")
    return MODEL


@pytest.fixture(scope="session")
def model_dir():
    return _model_dir()


@pytest.fixture(scope="session")
def llm(model_dir):
    from vllm import LLM

    import semshare_ops.vllm as ssv

    # Lets a test send a function of its own to the worker (`LLM.collective_rpc`, pickled by value): our own
    # processes only.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine = LLM(model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
                 **ssv.engine_args(recompute_ratio=0.2))
    yield engine
    del engine


@pytest.fixture(scope="session")
def texts(llm):
    """(reference, the reference with 10% of its tokens edited in short scattered spans, unrelated text): ShareGPT."""
    from semshare_ops.bench.e2e import edit_tokens, text_prompt

    ids = text_prompt(llm.get_tokenizer(), 3 * LENGTH)
    reference, unrelated = ids[:LENGTH], ids[2 * LENGTH:3 * LENGTH]
    return reference, edit_tokens(reference, 0.1, seed=7), unrelated
