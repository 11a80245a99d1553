"""`ReuseConfig`: every knob of the reuse path, with the defaults measured best (docs/design.md says why)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

MATCHING_METHODS = ("edit", "lsh", "hybrid", "prefix", "chunk")
SELECTIONS = ("deviation", "attention", "blend", "lookahead")
BUDGETS = ("fixed", "adaptive")


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class ReuseConfig:
    """Knobs of the reuse path. Defaults are our own choices where the papers leave them open (docs/design.md).

    Every field is type- and range-checked when the config is made: TypeError or ValueError naming the field."""

    matching: str = "hybrid"  # "edit" | "lsh" | "hybrid"; baselines: "prefix" | "chunk" (see matching.py)
    recompute_ratio: float = 0.2  # share of prompt tokens recomputed, averaged over layers (see budget below)
    retain_ratio: Optional[float] = None  # KV kept, averaged over layers; None keeps everything
    min_similarity: float = 0.5  # share of target tokens matched below which a request takes a full prefill
    rope_correction: bool = True  # re-rotate reused keys by the position delta
    check_layers: int = 2  # leading layers recomputed in full; deviation is measured at the last of them
    # Per-layer factor of the recompute count past the check layers. 1.0 (the same count in every layer):
    # benchmarks/ablate_selection.py measured it best or tied at ratios 0.1-0.3 on both sets, with and without the
    # chat template (teacher-forced KL against full prefill; docs/design.md). Near-duplicates differ in scattered
    # places, so deep layers need recomputed tokens as much as shallow ones.
    recompute_decay: float = 1.0
    recompute_tail: int = 0  # last prompt tokens recomputed in every layer (the question, the chat template's end)
    # Matched tokens right after each alignment break (`Match.breaks`: after an unmatched run, or where the donor
    # positions jump), the tokens whose nearest context changed: ranked above the other matched rows, so the budget
    # recomputes them first in every layer; they never raise it (the same reuse and time). 4 on the 60 raw
    # near-duplicates at ratio 0.2: teacher-forced KL 0.0030 against 0.0067 for 0 at reuse 0.780, both confident
    # divergences repaired; 8 no better (docs/design.md). 0: left to the ranking.
    recompute_boundary: int = 4
    # How rows are ranked for recompute (rows.selection_scores): "deviation" of reused from fresh K/V, "attention"
    # the last `query_window` prompt tokens pay them at the check layer, "blend" (their product), or "lookahead"
    # (ProphetKV's two stages: those tokens first run through every layer over the reused cache, and the attention
    # they pay in the layers past the check layers multiplies the deviation; their rows come out of the budget).
    selection: str = "deviation"
    # Last prompt tokens whose attention ranks rows: recomputed in every layer for "attention" and "blend", run
    # through every layer once before the recompute for "lookahead".
    query_window: int = 16
    # Rank again at every layer that shrinks the set (CacheBlend's gradual filtering), not once at the last check
    # layer: better at recompute_decay 0.95, the same at 1.0 (a flat count shrinks no set past the check layers).
    progressive: bool = True
    # "adaptive": the unmatched rows (no reusable K/V) on top of recompute_ratio of the others, so a worse match
    # recomputes more; the matched rows the tail makes mandatory are the first of that share, more only where they
    # exceed it (rows.recompute_counts); "fixed": recompute_ratio of the prompt, every mandatory row included.
    # Adaptive measured better on the 60 built-in near-duplicates at equal or higher reuse (raw prompts: ROUGE-L 0.73
    # at reuse 0.78 against 0.67 for fixed at 0.74; docs/design.md): under "fixed" a prompt whose unmatched rows take
    # the whole budget recomputes none of its stale matched rows.
    budget: str = "adaptive"
    # Ceiling of the adaptive budget, as a multiple of recompute_ratio: where many tokens changed, the extra rows stop
    # there (the rows without reusable K/V are recomputed whatever it says: they count against it first). Bounds what
    # a heavily edited prompt costs (TTFT grows about in proportion to the rows recomputed). None: no ceiling.
    budget_cap: Optional[float] = None
    # Decode guard (HF engine): from a reused cache that kept stale rows, a greedy step whose best token leads the
    # second by less than this many logits is not taken from it; the prompt and the tokens so far are prefilled in
    # full and decoding goes on exact (stats["guard"]). Reuse moves logits a little; it flips a greedy output only
    # where the lead is small. 0 turns the guard off.
    guard_margin: float = 0.0
    # Decode-time recompute (HF engine; KVShare v2's decode stage): from the second decode step on, the next this
    # many prompt rows that the prefill left reused in some layer, in position order, run through every
    # layer between steps, their K/V overwritten fresh (stats["decode_recomputed_tokens"]). The first token's time
    # is untouched; each later step costs about one more pass over the weights until no stale row is left. 0: off.
    decode_recompute: int = 0
    retain_decay: float = 0.9  # per-layer factor of the KV kept, when retain_ratio is set
    lsh_bits: int = 128
    lsh_max_distance: int = 24  # fuzzy matches farther than this many bits stay unmatched
    lsh_seed: int = 0
    embedding_rope_base: float = 10000.0

    def __post_init__(self):
        # Types first (a str "0.2" or a float 1.5 for an int would otherwise fail later, or pass a comparison),
        # then ranges. bool is an int to Python but never a number here.
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL or name in _CHOICES:
                continue
            if isinstance(value, bool) != (kinds == (bool,)) or not isinstance(value, kinds):
                raise TypeError(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got "
                                f"{type(value).__name__} {value!r}")
            if float in kinds and not math.isfinite(_as_float(value)):  # an int past a float's range is too
                raise ValueError(f"{name}: expected a finite number, got {value}")
        if not isinstance(self.matching, str) or self.matching not in MATCHING_METHODS:
            raise ValueError(f"matching: expected one of {', '.join(map(repr, MATCHING_METHODS))}, "
                             f"got {self.matching!r}")
        if not isinstance(self.selection, str) or self.selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {', '.join(map(repr, SELECTIONS))}, "
                             f"got {self.selection!r}")
        if not isinstance(self.budget, str) or self.budget not in BUDGETS:
            raise ValueError(f"budget: expected one of {', '.join(map(repr, BUDGETS))}, got {self.budget!r}")
        if self.query_window < 1:
            raise ValueError(f"query_window: expected >= 1, got {self.query_window}")
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio: expected a value in [0, 1], got {self.recompute_ratio}")
        if self.retain_ratio is not None and not 0.0 < self.retain_ratio <= 1.0:
            raise ValueError(f"retain_ratio: expected None or a value in (0, 1], got {self.retain_ratio}")
        if not 0.0 <= self.min_similarity <= 1.0:
            raise ValueError(f"min_similarity: expected a value in [0, 1], got {self.min_similarity}")
        if self.budget_cap is not None and self.budget_cap < 1.0:
            raise ValueError(f"budget_cap: expected None or a multiple of recompute_ratio >= 1, got {self.budget_cap}")
        if self.guard_margin < 0:
            raise ValueError(f"guard_margin: expected >= 0 (0 turns the guard off), got {self.guard_margin}")
        for name in ("recompute_tail", "recompute_boundary", "decode_recompute"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.decode_recompute and self.retain_ratio is not None:
            raise ValueError("decode_recompute: not with retain_ratio (a compacted layer has no slot for a dropped "
                             "row to be recomputed into)")
        if self.check_layers < 1:
            raise ValueError(f"check_layers: expected >= 1, got {self.check_layers}")
        for name in ("recompute_decay", "retain_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1], got {getattr(self, name)}")
        # No bits, or a non-positive or huge rotation base, makes every code alike: unrelated prompts would "match".
        if not 1 <= self.lsh_bits <= 1024:  # hamming_topk takes codes of up to 16 words (csrc/checks.h)
            raise ValueError(f"lsh_bits: expected 1..1024 bits, got {self.lsh_bits}")
        if not 0 <= self.lsh_max_distance < self.lsh_bits:
            raise ValueError(f"lsh_max_distance: expected 0 <= distance < lsh_bits ({self.lsh_bits}), "
                             f"got {self.lsh_max_distance}")
        if not -(1 << 63) <= self.lsh_seed < (1 << 64):  # what a torch.Generator takes
            raise ValueError(f"lsh_seed: expected a seed in [-2**63, 2**64), got {self.lsh_seed}")
        if not self.embedding_rope_base > 1.0:
            raise ValueError(f"embedding_rope_base: expected a rotation base > 1, got {self.embedding_rope_base}")


_INT, _REAL = (int,), (int, float)
_FIELD_TYPES = {"matching": (str,), "recompute_ratio": _REAL, "retain_ratio": _REAL, "min_similarity": _REAL,
                "rope_correction": (bool,), "check_layers": _INT, "recompute_decay": _REAL, "recompute_tail": _INT,
                "recompute_boundary": _INT,
                "selection": (str,), "query_window": _INT, "progressive": (bool,), "budget": (str,),
                "budget_cap": _REAL, "guard_margin": _REAL, "decode_recompute": _INT,
                "retain_decay": _REAL, "lsh_bits": _INT, "lsh_max_distance": _INT, "lsh_seed": _INT,
                "embedding_rope_base": _REAL}
_OPTIONAL = ("retain_ratio", "budget_cap")
_CHOICES = ("matching", "selection", "budget")  # checked against their lists of names
