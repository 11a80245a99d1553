"""The README's Python quickstart runs as written, on the embedded model: its code blocks, in order, in a fresh
directory (the store saves to kv/ there). A snippet that names something it never defines, or an API that moved,
fails here instead of in a newcomer's first minutes."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_blocks(heading: str, lang: str = "python") -> list:
    """The README's `lang` code blocks under `## heading`, in order (also tests/vllm_connector/test_readme_vllm.py)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(f"## {heading}"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


def quickstart_blocks():
    return readme_blocks("Python quickstart")


def test_quickstart_has_its_blocks():
    blocks = quickstart_blocks()
    assert len(blocks) == 2 and "engine.generate" in blocks[0] and "ss.partial_attn" in blocks[1]


@pytest.mark.slow
def test_quickstart_runs_as_written(smollm2, tmp_path, monkeypatch):
    # smollm2 (conftest): skips without the embedded model, and has loaded it once for the session
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in quickstart_blocks():
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 -- the README's own code
    assert scope["full"].text.strip() and scope["full"].stats["mode"] == "full"  # the chat template: an answer
    assert (tmp_path / "kv" / "index.json").is_file() and len(scope["store"]) == 1
    out, lse, q_pos = scope["out"], scope["lse"], scope["q_pos"]
    assert out.shape == (17, scope["Hq"], scope["D"]) and torch.isfinite(out).all() and torch.isfinite(lse).all()
    layer = scope["layer"]
    want = scope["ss"].oracle.partial_attn(scope["q"], scope["k_tgt"][layer], scope["v_tgt"][layer], q_pos)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-5)
