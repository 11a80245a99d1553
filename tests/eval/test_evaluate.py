"""semshare_ops.evaluate (`semshare eval`): metrics, one pair end to end on a tiny model, the summary keys."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rouge_score")

from semshare_ops.eval import evaluate  # noqa: E402
from semshare_ops.engine import ReuseConfig, ReuseEngine  # noqa: E402

from engine_testutils import FakeTokenizer, build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC_KEYS = {"pairs", "rougeL", "rougeL_noise_floor", "first_token_agreement", "reuse_ratio", "mean_ttft_ms_full",
             "mean_ttft_ms_reuse"}


def test_rouge_l():
    assert evaluate.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert evaluate.rouge_l("dogs bark loudly", "the cat sat on the mat") == pytest.approx(0.0)
    partial = evaluate.rouge_l("the cat sat", "the cat sat on the mat")
    assert 0.5 < partial < 1.0  # LCS 3 of 3 / 6: F1 = 2/3
    assert evaluate.rouge_l("", "") == 1.0
    # rouge-score drops every token that is not [a-z0-9]; equal outputs still score 1, different ones 0
    assert evaluate.rouge_l("\n\n# \n# \n#", "\n\n# \n# \n#") == 1.0
    assert evaluate.rouge_l("# \n#", "- \n-") == 0.0
    assert evaluate.rouge_l("", "the cat") == 0.0 and evaluate.rouge_l("the cat", " ") == 0.0  # one side empty


def _record(rouge, floor, first, first8, ttft_full=10.0, ttft=4.0):
    """One pair's record as evaluate_pair writes it, with only what summarise reads; floor None: no baselines."""
    reuse = {"recompute_ratio": 0.2, "rougeL": rouge, "first_token_equal": first, "first8_equal": first8,
             "kl_first_token": 0.01, "reuse_ratio": 0.8, "similarity": 0.9, "matched_tokens": 30, "mode": "reuse",
             "guard": None, "ttft_ms": ttft}
    record = {"reuse": [reuse], "prompt_tokens": 40, "ttft_ms_full": ttft_full}
    if floor is not None:
        record.update(rougeL_noise_floor=floor, rougeL_gptcache=0.1)
    return record


def test_summarise_pairs_each_output_with_its_own_floor():
    """The means, the standard errors over pairs and the paired difference to the floor, against hand-worked
    figures; a pair without a floor is left out of the paired difference only."""
    records = [_record(0.5, 0.9, True, False), _record(0.8, 0.6, True, True), _record(1.0, 1.0, False, True),
               _record(0.3, None, True, False)]
    summary = evaluate.summarise(records)
    rouges, paired = [0.5, 0.8, 1.0, 0.3], [0.5 - 0.9, 0.8 - 0.6, 1.0 - 1.0]
    assert summary["pairs"] == 4 and summary["rougeL"] == pytest.approx(0.65)
    assert summary["rougeL_stderr"] == pytest.approx(float(np.std(rouges, ddof=1)) / 2.0)
    assert summary["rougeL_minus_floor"] == pytest.approx(-0.2 / 3)
    assert summary["rougeL_minus_floor_stderr"] == pytest.approx(float(np.std(paired, ddof=1)) / 3 ** 0.5)
    assert summary["rougeL_noise_floor"] == pytest.approx(2.5 / 3)
    assert (summary["first_token_agreement"], summary["first8_agreement"]) == (0.75, 0.5)
    one = evaluate.summarise(records[:1])
    assert one["rougeL"] == 0.5 and one["rougeL_stderr"] is None and one["rougeL_minus_floor_stderr"] is None
    assert evaluate.summarise(records[:2])["rougeL_stderr"] == pytest.approx(0.15)  # two pairs have a spread


def test_first_token_kl():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 50, generator=gen)
    b = a + 0.5 * torch.randn(1, 50, generator=gen)
    assert evaluate.first_token_kl((a,), (a.clone(),)) == pytest.approx(0.0, abs=1e-6)
    kl = evaluate.first_token_kl((a,), (b,))
    p, q = torch.softmax(a[0].double(), -1), torch.softmax(b[0].double(), -1)
    assert kl == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4) and kl > 0
    assert evaluate.first_token_kl(None, (a,)) is None


def test_first_token_kl_is_never_negative():
    # Logits shifted by a constant are the same distribution: KL 0, which fp32 sums of terms of both signs give as a
    # few 1e-10 either side of 0 (-6e-10 for the first seed here).
    for seed in range(8):
        a = 3 * torch.randn(1, 49152, generator=torch.Generator().manual_seed(seed))
        kl = evaluate.first_token_kl((a,), (a + 1.0,))
        assert 0.0 <= kl < 1e-7, (seed, kl)


@pytest.fixture(scope="module")
def engine():
    return ReuseEngine(build_model("llama", seed=0), FakeTokenizer(), ReuseConfig())


TEXT = ("The harbour library reopened on Monday after eight months of repairs and a new roof. " * 4).strip()
PAIRS = [{"reference": TEXT, "target": TEXT.replace("Monday", "Tuesday", 1), "set": "controlled_edit",
          "kind": "name", "id": "a"},
         {"reference": TEXT, "target": TEXT, "set": "near_duplicate", "kind": "near_duplicate", "id": "b"}]


def test_run_eval_on_a_tiny_model(engine):
    result = evaluate.run_eval(engine, PAIRS, ratios=[0.0, 1.0], max_new_tokens=6, chat=False)
    assert SPEC_KEYS <= result.keys()
    assert result["pairs"] == 2 and result["recompute_ratio"] == 0.0
    assert [s["recompute_ratio"] for s in result["sweep"]] == [0.0, 1.0]
    assert set(result["sets"]) == {"controlled_edit", "near_duplicate"}
    identical, edited = result["records"][1], result["records"][0]
    # identical target: reuse gives the full-prefill output at any ratio (invariant 1 of docs/contract.md section 4)
    for run in identical["reuse"]:
        assert run["rougeL"] == pytest.approx(1.0) and run["first_token_equal"] and run["first8_equal"]
        assert run["kl_first_token"] == pytest.approx(0.0, abs=1e-4)
    # recompute ratio 1.0 is a full prefill (invariant 2): only the exact common prefix before the edit (the first
    # sentence's few tokens, the reference's own K/V) is not recomputed; ratio 0 reused most of the prompt
    assert 0.0 < edited["reuse"][1]["reuse_ratio"] < 0.15
    assert edited["reuse"][1]["rougeL"] == pytest.approx(1.0)
    assert edited["reuse"][0]["reuse_ratio"] > 0.4  # 2 of the 4 layers are check layers: at most 0.5
    assert result["sweep"][1]["first_token_agreement"] == 1.0
    for record in result["records"]:
        assert 0.0 <= record["rougeL_noise_floor"] <= 1.0 and 0.0 <= record["rougeL_gptcache"] <= 1.0
    # the reference's own answer is the target's answer only when the prompts are the same
    assert identical["rougeL_gptcache"] == pytest.approx(1.0)
    assert "near_duplicate" in evaluate.format_eval(result)


def test_run_eval_without_baselines(engine):
    result = evaluate.run_eval(engine, PAIRS[:1], ratios=[0.2], max_new_tokens=3, chat=False, baselines=False)
    assert result["rougeL_noise_floor"] is None and "rougeL_noise_floor" not in result["records"][0]
    assert not math.isnan(result["rougeL"])


def test_engine_config_restored_after_sweep(engine):
    before = engine.config
    evaluate.run_eval(engine, PAIRS[:1], ratios=[0.7], max_new_tokens=2, chat=False, baselines=False)
    assert engine.config is before


def test_noise_floor_space_goes_inside_the_chat_template(engine, monkeypatch):
    """The floor's leading space is in the user's text, inside the template (a prompt a chat client could send), not
    in front of the templated prompt."""
    monkeypatch.setattr(evaluate, "as_chat", lambda tokenizer, text: "<turn>" + text + "</turn>")
    prompts = []
    generate = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompt, *a, **k: prompts.append(prompt) or generate(prompt, *a, **k))
    evaluate.run_eval(engine, PAIRS[:1], ratios=[0.2], max_new_tokens=2, chat=True)
    target = PAIRS[0]["target"]
    assert "<turn> " + target + "</turn>" in prompts
    assert all(p.startswith("<turn>") for p in prompts), prompts
    assert evaluate.floor_prompt(target) == " " + target  # without a template, the space leads the prompt
