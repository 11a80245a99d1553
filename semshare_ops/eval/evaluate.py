"""Output quality of reuse against full prefill (`semshare eval`), beside a noise floor and a semantic-cache baseline.

For every pair (reference prompt, similar target prompt), with greedy decoding of the same number of new tokens:
- `full`: the target with a full prefill; every other output is compared with this one;
- `reuse`: the target served from the reference's KV (one run per recompute ratio asked for);
- noise floor: the target with one leading space, full prefill (the published baselines' floor: how far a change that
  should not matter moves the output);
- `gptcache`: GPTCache-style response reuse, the reference's own full-prefill answer returned for the target.
Metrics: ROUGE-L F1 (rouge-score, stemmed) against `full`; first-token agreement and first-8-tokens agreement;
KL(full || reuse) of the first-token distributions (nats); reuse_ratio, tokens reused (matched) and TTFT.
Prompts are wrapped in the model's chat template by default (the pairs are user prompts for an instruct model).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..engine import ReuseEngine
from ..engine.prompts import as_chat


def rouge_l(prediction: str, target: str) -> float:
    # rouge-score keeps only [a-z0-9] tokens: an output of code symbols or another script ("# \n# \n#") would score
    # 0 against itself. Equal outputs are equal whatever their tokens.
    if prediction == target or not prediction.strip() and not target.strip():
        return 1.0
    return _scorer().score(target, prediction)["rougeL"].fmeasure


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def first_token_kl(full_logits, reuse_logits) -> Optional[float]:
    """KL(p_full || p_reuse) of the first new token's distribution, in nats."""
    if not full_logits or not reuse_logits:
        return None
    p = torch.log_softmax(full_logits[0][0].float(), -1)
    q = torch.log_softmax(reuse_logits[0][0].float(), -1)
    # KL is never negative; a sum of fp32 terms of both signs can come out a few 1e-10 below 0 for equal logits.
    return max(0.0, float(torch.sum(p.exp() * (p - q))))


def _generate(engine: ReuseEngine, prompt: str, reference=None, max_new_tokens: int = 48):
    return engine.generate(prompt, reference=reference, max_new_tokens=max_new_tokens, output_logits=True,
                           return_dict_in_generate=True)


def floor_prompt(text: str, wrap: Callable[[str], str] = lambda text: text) -> str:
    """The noise floor's prompt: the text with one leading space, then wrapped (in the chat template, with --chat).

    The space goes into the user's text, inside the template, a change a user could make and that says nothing new;
    a space in front of the templated prompt (before its first special token) would be a prompt no chat client sends,
    and moves this model's outputs far more (ROUGE-L 0.70 against 0.87 on 12 near-duplicates)."""
    return wrap(" " + text)


def evaluate_pair(engine: ReuseEngine, reference: str, target: str, ratios: Sequence[float],
                  max_new_tokens: int = 48, baselines: bool = True, floor_target: Optional[str] = None) -> Dict:
    """All outputs and metrics of one pair; `reuse` has one entry per recompute ratio. `floor_target`: the noise
    floor's prompt (default `floor_prompt(target)`; with a chat template, `floor_prompt(text, wrap)` of the raw
    text)."""
    entry = engine.prefill(reference)
    full = _generate(engine, target, max_new_tokens=max_new_tokens)
    record: Dict = {"prompt_tokens": full.stats["prompt_tokens"], "ttft_ms_full": full.stats["ttft_ms"],
                    "full_text": full.text, "reuse": []}
    for ratio in ratios:
        with engine.using(dataclasses.replace(engine.config, recompute_ratio=ratio)):
            reuse = _generate(engine, target, entry, max_new_tokens)
        record["reuse"].append({
            "recompute_ratio": ratio, "mode": reuse.stats["mode"], "similarity": reuse.stats["similarity"],
            "reuse_ratio": reuse.stats["reuse_ratio"], "matched_tokens": reuse.stats["matched_tokens"],
            "ttft_ms": reuse.stats["ttft_ms"], "kv_bytes": reuse.stats["kv_bytes"],
            "rougeL": rouge_l(reuse.text, full.text),
            "first_token_equal": reuse.token_ids[:1] == full.token_ids[:1],
            "first8_equal": reuse.token_ids[:8] == full.token_ids[:8],
            "kl_first_token": first_token_kl(full.logits, reuse.logits), "guard": reuse.stats.get("guard"),
            "text": reuse.text})
    if baselines:
        noise = engine.generate(floor_target or floor_prompt(target), max_new_tokens=max_new_tokens)
        cached = engine.generate(reference, max_new_tokens=max_new_tokens)
        record.update(rougeL_noise_floor=rouge_l(noise.text, full.text), rougeL_gptcache=rouge_l(cached.text, full.text))
    return record


def _mean(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _stderr(values: List[Optional[float]]) -> Optional[float]:
    """Standard error of the mean over pairs: the spread a difference of means is read against."""
    values = [v for v in values if v is not None]
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


def summarise(records: List[Dict], ratio_index: int = 0) -> Dict:
    """docs/contract.md's `semshare eval --json` keys for one recompute ratio (plus ours). `rougeL_minus_floor` is the
    mean over pairs of (reuse's ROUGE-L - the floor's), each pair against itself, with its standard error."""
    reuse = [r["reuse"][ratio_index] for r in records]
    paired = [x["rougeL"] - r["rougeL_noise_floor"] for x, r in zip(reuse, records) if "rougeL_noise_floor" in r]
    return {
        "recompute_ratio": reuse[0]["recompute_ratio"] if reuse else None,
        "pairs": len(records),
        "rougeL": _mean([x["rougeL"] for x in reuse]),
        "rougeL_stderr": _stderr([x["rougeL"] for x in reuse]),
        "rougeL_minus_floor": _mean(paired), "rougeL_minus_floor_stderr": _stderr(paired),
        "rougeL_noise_floor": _mean([r.get("rougeL_noise_floor") for r in records]),
        "rougeL_gptcache": _mean([r.get("rougeL_gptcache") for r in records]),
        "first_token_agreement": _mean([float(x["first_token_equal"]) for x in reuse]),
        "first8_agreement": _mean([float(x["first8_equal"]) for x in reuse]),
        "kl_first_token": _mean([x["kl_first_token"] for x in reuse]),
        "reuse_ratio": _mean([x["reuse_ratio"] for x in reuse]),
        "similarity": _mean([x["similarity"] for x in reuse]),
        "tokens_reused": _mean([float(x["matched_tokens"]) for x in reuse]),
        "prompt_tokens": _mean([float(r["prompt_tokens"]) for r in records]),
        "fallbacks": sum(x["mode"] != "reuse" for x in reuse),
        "repairs": sum((x.get("guard") or {}).get("repaired_at") is not None for x in reuse),
        "mean_ttft_ms_full": _mean([r["ttft_ms_full"] for r in records]),
        "mean_ttft_ms_reuse": _mean([x["ttft_ms"] for x in reuse]),
    }


def run_eval(engine: ReuseEngine, pairs: List[Dict], ratios: Sequence[float], max_new_tokens: int = 48,
             chat: bool = True, baselines: bool = True,
             progress: Callable[[int, Dict], None] = lambda i, record: None) -> Dict:
    """Evaluate every pair; the result has docs/contract.md's top-level keys for the first ratio, `sweep` for all of them,
    `sets` per pair set, and `records` per pair."""

    wrap = (lambda text: as_chat(engine.tokenizer, text)) if chat else (lambda text: text)
    records = []
    for i, pair in enumerate(pairs):
        record = evaluate_pair(engine, wrap(pair["reference"]), wrap(pair["target"]), ratios, max_new_tokens,
                               baselines, floor_target=floor_prompt(pair["target"], wrap))
        record.update({k: pair[k] for k in ("set", "kind", "id") if k in pair})
        records.append(record)
        progress(i, record)
    sets = sorted({r.get("set", "pairs") for r in records})
    return {
        **summarise(records),
        "sweep": [summarise(records, i) for i in range(len(ratios))],
        "sets": {s: [summarise([r for r in records if r.get("set", "pairs") == s], i) for i in range(len(ratios))]
                 for s in sets},
        "max_new_tokens": max_new_tokens, "chat_template": chat,
        "records": records,
    }


def format_eval(result: Dict) -> str:
    head = (f"{'set':<16} {'r':>4} {'pairs':>5} {'reuse':>5} {'ROUGE-L':>7} {'floor':>6} {'gptcache':>8} "
            f"{'tok1':>5} {'tok1-8':>6} {'KL':>6} {'TTFT full':>9} {'reuse':>7}")
    lines = [head, "-" * len(head)]

    def row(name, s):
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)
        lines.append(f"{name:<16} {s['recompute_ratio']:>4.2f} {s['pairs']:>5} {f(s['reuse_ratio'], '.2f'):>5} "
                     f"{f(s['rougeL'], '.3f'):>7} {f(s['rougeL_noise_floor'], '.3f'):>6} "
                     f"{f(s['rougeL_gptcache'], '.3f'):>8} {f(s['first_token_agreement'], '.2f'):>5} "
                     f"{f(s['first8_agreement'], '.2f'):>6} {f(s['kl_first_token'], '.3f'):>6} "
                     f"{f(s['mean_ttft_ms_full'], '.0f'):>9} {f(s['mean_ttft_ms_reuse'], '.0f'):>7}")
    for name, sweep in result["sets"].items():
        for s in sweep:
            row(name, s)
    for s in result["sweep"]:
        row("all", s)
    return "\n".join(lines)
