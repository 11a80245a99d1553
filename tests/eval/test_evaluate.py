"""semshare_ops.evaluate (`semshare eval`): metrics, one pair end to end on a tiny model, the summary keys."""
import contextlib
import math
import types

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
    # two blank outputs that differ both have no words: equal (rouge-score alone gives 0 when there are no tokens)
    assert evaluate.rouge_l(" ", "\n") == 1.0 and evaluate.rouge_l("", "\t ") == 1.0


def test_rouge_l_is_stemmed():
    # Porter stems: dogs -> dog, barked and barks -> bark; unstemmed, only "the" is common (F1 1/3)
    assert evaluate.rouge_l("the dogs barked", "the dog barks") == pytest.approx(1.0)


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


def test_summarise_means_and_counts_of_fallbacks_and_repairs():
    """The per-pair means of similarity, tokens reused, prompt tokens and the GPTCache baseline, and the counts of
    fallbacks (any mode but "reuse") and of repairs (a guard that repaired at some layer, layer 0 included)."""
    records = [_record(0.5, 0.9, True, False) for _ in range(4)]
    for record, similarity, matched, prompt, gptcache, mode, guard in zip(
            records, (0.25, 0.5, 0.75, 1.0), (12, 30, 7, 3), (40, 50, 33, 9), (0.1, 0.2, 0.6, 0.3),
            ("reuse", "full", "reuse", "reuse"), (None, {"repaired_at": 0}, {"repaired_at": None}, {})):
        record.update(prompt_tokens=prompt, rougeL_gptcache=gptcache)
        record["reuse"][0].update(similarity=similarity, matched_tokens=matched, mode=mode, guard=guard)
    summary = evaluate.summarise(records)
    assert summary["similarity"] == pytest.approx(0.625) and summary["rougeL_gptcache"] == pytest.approx(0.3)
    assert summary["tokens_reused"] == pytest.approx(13.0) and summary["prompt_tokens"] == pytest.approx(33.0)
    assert summary["fallbacks"] == 1 and summary["repairs"] == 1


def test_summarise_of_no_pairs():
    summary = evaluate.summarise([])
    assert summary["pairs"] == 0 and summary["recompute_ratio"] is None and summary["rougeL"] is None
    assert summary["fallbacks"] == 0 and summary["rougeL_minus_floor"] is None


def test_format_eval_rows_per_set_then_all():
    """One row per set and ratio, then the "all" rows; a metric nobody measured (no baselines) shows as "-"."""
    with_floor = [_record(0.5, 0.9, True, False), _record(0.8, 0.6, False, True, ttft_full=12.0, ttft=6.0)]
    without = [_record(0.3, None, True, True)]
    result = {"sets": {"edit": [evaluate.summarise(with_floor)], "plain": [evaluate.summarise(without)]},
              "sweep": [evaluate.summarise(with_floor + without)]}
    lines = evaluate.format_eval(result).split("\n")
    assert len(lines) == 5 and lines[1] == "-" * len(lines[0])
    assert lines[0].split() == ["set", "r", "pairs", "reuse", "ROUGE-L", "floor", "gptcache", "tok1", "tok1-8", "KL",
                                "TTFT", "full", "reuse"]
    assert lines[2].split() == ["edit", "0.20", "2", "0.80", "0.650", "0.750", "0.100", "0.50", "0.50", "0.010",
                                "11", "5"]
    assert lines[3].split() == ["plain", "0.20", "1", "0.80", "0.300", "-", "-", "1.00", "1.00", "0.010", "10", "4"]
    assert lines[4].split() == ["all", "0.20", "3", "0.80", "0.533", "0.750", "0.100", "0.67", "0.67", "0.010",
                                "11", "5"]


def test_first_token_kl():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 50, generator=gen)
    b = a + 0.5 * torch.randn(1, 50, generator=gen)
    assert evaluate.first_token_kl((a,), (a.clone(),)) == pytest.approx(0.0, abs=1e-6)
    kl = evaluate.first_token_kl((a,), (b,))
    p, q = torch.softmax(a[0].double(), -1), torch.softmax(b[0].double(), -1)
    assert kl == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4) and kl > 0
    assert evaluate.first_token_kl(None, (a,)) is None
    assert evaluate.first_token_kl((a,), None) is None and evaluate.first_token_kl((a,), ()) is None
    # only the first step counts, whatever the later ones are
    assert evaluate.first_token_kl((a, b), (b, a)) == pytest.approx(kl, rel=1e-6)


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


def _out(text, token_ids, logits=(), **stats):
    return types.SimpleNamespace(text=text, token_ids=token_ids, logits=logits, stats=stats)


class _Engine:
    """What evaluate_pair and run_eval use of a ReuseEngine; generate hands out `outputs` in order (a default output
    when they run out) and every call is kept."""

    def __init__(self, outputs=()):
        self.config, self.tokenizer, self.outputs = ReuseConfig(), None, list(outputs)
        self.generated, self.prefilled, self.ratios = [], [], []

    def prefill(self, prompt):
        self.prefilled.append(prompt)
        return ("entry", prompt)

    @contextlib.contextmanager
    def using(self, config):
        self.ratios.append(config.recompute_ratio)
        yield self

    def generate(self, prompt, reference=None, max_new_tokens=64, **kwargs):
        self.generated.append((prompt, reference, max_new_tokens))
        if self.outputs:
            return self.outputs.pop(0)
        return _out("a b c", [5, 6, 7], (torch.zeros(1, 4),), prompt_tokens=3, ttft_ms=1.0, mode="reuse",
                    similarity=1.0, reuse_ratio=0.5, matched_tokens=2, kv_bytes=8)


def test_evaluate_pair_record_from_each_output():
    """Every field of a record comes from the right output: the full prefill's, each ratio's reuse, the noise floor's
    and the reference's own; first8 compares 8 tokens only, the KL is KL(full || reuse) of the first step."""
    gen = torch.Generator().manual_seed(3)
    full_logits = tuple(torch.randn(1, 20, generator=gen) for _ in range(2))
    reuse_logits = (full_logits[0] + 2 * torch.randn(1, 20, generator=gen), torch.randn(1, 20, generator=gen))
    full = _out("the cat sat on the mat", list(range(10, 22)), full_logits, prompt_tokens=40, ttft_ms=9.5)
    reused = _out("the cat sat", list(range(10, 18)) + [1, 2, 3, 4], reuse_logits, mode="reuse", similarity=0.9,
                  reuse_ratio=0.7, matched_tokens=28, ttft_ms=3.0, kv_bytes=1234, guard={"repaired_at": 5})
    fallback = _out("the cat sat on the mat", [10, 99] + list(range(12, 22)), full_logits, mode="full",
                    similarity=0.4, reuse_ratio=0.0, matched_tokens=0, ttft_ms=9.0, kv_bytes=0)
    engine = _Engine([full, reused, fallback, _out("the cat sat on a mat", []), _out("dogs bark loudly", [])])
    record = evaluate.evaluate_pair(engine, "ref", "tgt", [0.25, 0.5], max_new_tokens=12)
    assert engine.prefilled == ["ref"] and engine.ratios == [0.25, 0.5]
    assert engine.generated == [("tgt", None, 12), ("tgt", ("entry", "ref"), 12), ("tgt", ("entry", "ref"), 12),
                                (" tgt", None, 12), ("ref", None, 12)]
    p = torch.softmax(full_logits[0][0].double(), -1)
    q = torch.softmax(reuse_logits[0][0].double(), -1)
    kl, kl_back = float((p * (p / q).log()).sum()), float((q * (q / p).log()).sum())
    assert abs(kl - kl_back) > 0.05 * kl  # the two directions differ by far more than the tolerance below
    first, second = record["reuse"]
    assert first.pop("kl_first_token") == pytest.approx(kl, rel=1e-4)
    assert first == {"recompute_ratio": 0.25, "mode": "reuse", "similarity": 0.9, "reuse_ratio": 0.7,
                     "matched_tokens": 28, "ttft_ms": 3.0, "kv_bytes": 1234, "rougeL": pytest.approx(2 * 0.5 / 1.5),
                     "first_token_equal": True, "first8_equal": True, "guard": {"repaired_at": 5},
                     "text": "the cat sat"}
    assert second.pop("kl_first_token") == pytest.approx(0.0, abs=1e-6)
    assert second == {"recompute_ratio": 0.5, "mode": "full", "similarity": 0.4, "reuse_ratio": 0.0,
                      "matched_tokens": 0, "ttft_ms": 9.0, "kv_bytes": 0, "rougeL": 1.0, "first_token_equal": True,
                      "first8_equal": False, "guard": None, "text": "the cat sat on the mat"}
    del record["reuse"]
    # floor: LCS 5 of 6 words each way; the reference's answer shares no word with the target's
    assert record == {"prompt_tokens": 40, "ttft_ms_full": 9.5, "full_text": "the cat sat on the mat",
                      "rougeL_noise_floor": pytest.approx(5 / 6), "rougeL_gptcache": 0.0}


def test_evaluate_pair_defaults():
    """48 new tokens for every generation, the baselines on, and the noise floor the target with one leading space."""
    engine = _Engine()
    record = evaluate.evaluate_pair(engine, "ref", "tgt", [0.0])
    assert engine.generated == [("tgt", None, 48), ("tgt", ("entry", "ref"), 48), (" tgt", None, 48),
                                ("ref", None, 48)]
    assert record["rougeL_noise_floor"] == 1.0 and record["rougeL_gptcache"] == 1.0
    evaluate._generate(engine, "abc")
    assert engine.generated[-1] == ("abc", None, 48)


def test_run_eval_defaults_chat_48_tokens_and_baselines(monkeypatch):
    """By default the prompts are chat-wrapped (the floor's space inside the template), every generation asks for 48
    new tokens, and the baselines run; the result says so."""
    monkeypatch.setattr(evaluate, "as_chat", lambda tokenizer, text: "<turn>" + text + "</turn>")
    engine = _Engine()
    result = evaluate.run_eval(engine, [{"reference": "ref", "target": "tgt"}], ratios=[0.2])
    assert result["max_new_tokens"] == 48 and result["chat_template"] is True
    assert engine.prefilled == ["<turn>ref</turn>"]
    reference, target = "<turn>ref</turn>", "<turn>tgt</turn>"
    assert engine.generated == [(target, None, 48), (target, ("entry", reference), 48), ("<turn> tgt</turn>", None, 48),
                                (reference, None, 48)]
    assert "rougeL_noise_floor" in result["records"][0] and result["rougeL_gptcache"] == 1.0
    # pairs without a set are summarised as the set "pairs"
    assert list(result["sets"]) == ["pairs"] and result["sets"]["pairs"][0]["pairs"] == 1


def test_progress_gets_each_pair_index_and_record():
    """progress(i, record) after each pair, in order; records keep the pair's set, kind and id; each set has one
    summary per ratio."""
    seen = []
    pairs = [{"reference": "r1", "target": "t1", "id": "a", "set": "s", "kind": "name"},
             {"reference": "r2", "target": "t2", "id": "b", "set": "s", "kind": "number"}]
    result = evaluate.run_eval(_Engine(), pairs, ratios=[0.0, 0.5], chat=False,
                               progress=lambda i, record: seen.append((i, record)))
    assert [i for i, _ in seen] == [0, 1] and all(record is result["records"][i] for i, record in seen)
    assert [(r["set"], r["kind"], r["id"]) for r in result["records"]] == [("s", "name", "a"), ("s", "number", "b")]
    assert [(s["recompute_ratio"], s["pairs"]) for s in result["sets"]["s"]] == [(0.0, 2), (0.5, 2)]


def test_run_eval_of_no_pairs():
    result = evaluate.run_eval(_Engine(), [], ratios=[0.2, 0.4], chat=False)
    assert result["pairs"] == 0 and result["recompute_ratio"] is None and result["records"] == []
    assert result["sets"] == {} and [s["pairs"] for s in result["sweep"]] == [0, 0]
