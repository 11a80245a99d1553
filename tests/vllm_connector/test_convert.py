"""The GGUF -> HF directory conversion for vLLM (semshare_ops.vllm.convert): a finished conversion is reused only for
the file and dtype asked for. No vLLM needed: these run in `make test` too."""
import json

import pytest
import torch

from semshare_ops.vllm import convert


def test_a_finished_conversion_is_taken_only_for_the_same_file_and_dtype(tmp_path):
    out, gguf = tmp_path / "model", tmp_path / "a.gguf"
    out.mkdir()
    gguf.write_bytes(b"not a GGUF: a conversion that tried to read it would fail")
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "dtype": "float32"}))
    (out / convert.DONE).write_text(f"{gguf}\n")
    assert convert.convert_gguf(out, gguf) == out  # the same file in the same dtype: taken as it is
    with pytest.raises(FileExistsError, match="bfloat16"):
        convert.convert_gguf(out, gguf, torch.bfloat16)
    with pytest.raises(FileExistsError, match="other.gguf"):
        convert.convert_gguf(out, tmp_path / "other.gguf")
