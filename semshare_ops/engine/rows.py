"""Which rows a reuse request recomputes in which layer (step 3 of docs/contract.md section 4): the budget per layer
(`recompute_counts`), the rows every layer takes (`recompute_rows`), the exact common prefix that needs none
(`exact_prefix`), and the nested, ranked sets layer by layer (`RowSchedule`).

Shared by every front end, so that they recompute the same rows: the HF engine (engine.py) and the vLLM connector
(vllm/scheduler.py plans, vllm/worker.py runs the layers). They run the layers; this chooses the rows. Nothing here
touches a model.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch

from . import matching
from .config import ReuseConfig


def decaying_counts(total: int, layers: int, lead: int, floor: int, target_mean: float, decay: float) -> List[int]:
    """Per-layer counts: `total` for the first `lead` layers, then base * decay^i clamped to [floor, total],
    with base chosen (by bisection) so that the mean over all layers is as close to `target_mean` as allowed."""
    lead = min(lead, layers)
    step, top = math.log(decay), math.log(total + 1.0)

    def counts(log_base: float) -> List[int]:  # base * decay^i as exp(log_base + i log decay): no under/overflow
        tail = [min(total, max(floor, round(math.exp(min(top, log_base + i * step))))) for i in range(layers - lead)]
        return [total] * lead + tail

    # Bisection on log(base): below 0.25 every tail count rounds to 0, at the top even the deepest is `total`. On
    # base itself, a small decay made the top total / decay^layers, past what 60 halvings resolve (or a float).
    lo, hi = math.log(0.25), top - step * max(layers, 1)
    for _ in range(80):
        mid = (lo + hi) / 2
        if sum(counts(mid)) / layers < target_mean:
            lo = mid
        else:
            hi = mid
    return counts(hi)


def recompute_counts(prefill: int, num_layers: int, num_unmatched: int, config: ReuseConfig,
                     exact: int = 0, num_mandatory: Optional[int] = None, lookahead: int = 0) -> List[int]:
    """Rows recomputed per layer among positions [exact, prefill) (the last prompt token not included; the first
    `exact` hold exact K/V already, `exact_prefix`): every row in the check layers, then a count decaying by
    `recompute_decay`, never below the `num_mandatory` rows that every layer recomputes (`recompute_rows`; default
    `num_unmatched`), with the mean over layers of (count + 1) meeting recompute_ratio * (prefill + 1), as far as the
    rows past `exact` allow ("adaptive" budget: plus (1 - recompute_ratio) * num_unmatched, so that the matched rows
    get their share whatever the `num_unmatched` rows without reusable K/V take, up to `budget_cap` times the fixed
    target; the matched rows made mandatory, the tail's, come first out of that share and raise it only where they
    exceed it). The budget is the whole prompt's: what an exact prefix saves goes to the rows whose context changed.
    Shared by every front end (the HF engine, the vLLM connector), so that they recompute the same rows. `lookahead`
    rows that a first pass runs through every layer (`lookahead_rows`) come out of the same budget: the work per
    request stays what recompute_ratio says."""
    rows = prefill - exact
    floor = num_unmatched if num_mandatory is None else num_mandatory
    target = max(0.0, config.recompute_ratio * (prefill + 1) - 1)
    if config.budget == "adaptive":  # the rows without reusable K/V on top of the ratio of the others
        extra = (1.0 - config.recompute_ratio) * num_unmatched
        if config.budget_cap is not None:  # ... up to the ceiling (>= 1: never below the fixed budget's target)
            extra = min(extra, (config.budget_cap - 1.0) * config.recompute_ratio * (prefill + 1))
        target += extra
    if target < rows:  # the lookahead ranks the rows a budget leaves reused: one that covers them all needs none
        target -= lookahead
    target = min(float(rows), target)
    lead = effective_check_layers(config)
    return decaying_counts(rows, num_layers, lead, floor, target, config.recompute_decay)


def exact_prefix(match: matching.Match, reference_exact: int, limit: int) -> int:
    """Leading target positions (at most `limit`) whose K/V the reference holds exactly as a full prefill of the
    target would compute them: the same token at the same position for every position before, within the
    reference's own exact prefix. They need no recompute in any layer (causal attention: a position's K/V depend
    only on the tokens up to it)."""
    n = min(limit, reference_exact, match.matched)
    if n <= 0:
        return 0
    position = torch.arange(n)
    same = (match.dst[:n] == position) & (match.src[:n] == position) & match.exact[:n]
    return n if bool(same.all()) else int(torch.nonzero(~same)[0, 0])


def kept_exact_prefix(exact: int, prompt_tokens: int) -> int:
    """The exact prefix of a served prompt's own K/V when `exact` of its positions before the last were taken as
    they are: the last token is computed over all of them, so it is exact too only when every one of them is."""
    return prompt_tokens if exact >= prompt_tokens - 1 else exact


def effective_check_layers(config: ReuseConfig) -> int:
    """Leading layers that recompute every row, the last of them ranking the rest by deviation. None for "prefix"
    matching: a prefix-cache hit holds exactly the K/V a full prefill would."""
    return 0 if config.matching == "prefix" else config.check_layers


def boundary_rows(match: matching.Match, prefill: int, config: ReuseConfig) -> torch.Tensor:
    """bool [prefill]: the first `recompute_boundary` positions after each alignment break (`Match.breaks`), the
    matched tokens whose nearest context changed: ranked first among the rows the budget chooses."""
    first = torch.zeros(prefill, dtype=torch.bool)
    if config.recompute_boundary:  # no more than the prompt: a huge setting would make a breaks x k table
        rows = (match.breaks()[:, None] + torch.arange(min(config.recompute_boundary, prefill))).flatten()
        first[rows[rows < prefill]] = True
    return first


def has_rows_to_choose(counts: List[int], num_mandatory: int, rows: int) -> bool:
    """Whether some layer's count lies strictly between the mandatory rows and all `rows`: only then does a ranking
    (or the lookahead's pass) decide anything."""
    return any(num_mandatory < c < rows for c in counts)


class RowPlan(NamedTuple):
    mandatory: torch.Tensor  # bool [prefill]: recomputed in every layer whatever the budget
    first: torch.Tensor  # bool [prefill]: `boundary_rows`, ranked first
    counts: List[int]  # rows recomputed per layer among [exact, prefill)
    lookahead: int  # rows the lookahead's first pass runs through every layer (0: no pass)


def recompute_rows(match: matching.Match, prefill: int, num_layers: int, config: ReuseConfig, exact: int = 0,
                   window: int = 0) -> RowPlan:
    """One request's rows to recompute, as every front end computes them: bool [prefill] of the reusable positions
    every layer recomputes whatever the budget (those no reference token maps to, the last `recompute_tail` and the
    last `window`), bool [prefill] of the `boundary_rows`, `recompute_counts` over [exact, prefill), and the rows of
    the lookahead's pass. The lookahead ranks the rows a budget leaves to choose: when, after paying for its pass, no
    layer has one (every count at the mandatory rows or at all of them), it does not run and costs nothing."""
    unmatched = match.unmatched_mask()[:prefill]
    mandatory = unmatched.clone()
    mandatory[max(0, prefill - max(tail_rows(config), window)):] = True
    num_unmatched, num_mandatory = int(unmatched[exact:].sum()), int(mandatory[exact:].sum())
    lookahead = lookahead_rows(config, prefill - exact)
    counts = recompute_counts(prefill, num_layers, num_unmatched, config, exact, num_mandatory, lookahead)
    if lookahead and not has_rows_to_choose(counts, num_mandatory, prefill - exact):
        lookahead, counts = 0, recompute_counts(prefill, num_layers, num_unmatched, config, exact, num_mandatory)
    return RowPlan(mandatory, boundary_rows(match, prefill, config), counts, lookahead)


# Selections that rank by the attention the last query_window prompt rows pay in the layer being ranked: those rows are
# recomputed in every layer, observed there, and such a layer runs whole (no K/V-only pass).
QUERY_SELECTIONS = ("attention", "blend")


def tail_rows(config: ReuseConfig) -> int:
    """Last prompt positions recomputed in every layer: `recompute_tail`, and the query window when the selection
    ranks by the attention those queries pay (their queries must be fresh in every layer that ranks)."""
    return max(config.recompute_tail, config.query_window if config.selection in QUERY_SELECTIONS else 0)


def lookahead_rows(config: ReuseConfig, rows: int) -> int:
    """Rows that selection="lookahead" runs through every layer before the recompute (the last `query_window` of
    the `rows` past the exact prefix; `ReuseEngine._lookahead`), 0 for the other selections."""
    return min(config.query_window, rows) if config.selection == "lookahead" else 0


def selection_scores(selection: str, reused: tuple, fresh: tuple, attention: Optional[torch.Tensor]) -> torch.Tensor:
    """How much recomputing each of n rows is worth at one layer (fp32 [n], >= 0): "deviation", ||dK|| + ||dV||
    between the rows' reused and fresh K/V (CacheBlend, SemShareKV); "attention", the attention the request's last
    prompt tokens pay them (ProphetKV: what the question needs); "blend" and "lookahead", their product (a stale row
    matters as much as it is attended to; "lookahead" reads the attention in every layer past the check layers, in a
    first pass over the reused cache: `ReuseEngine._lookahead`). `attention` is [n] or None for "deviation"."""
    deviation = ((fresh[0] - reused[0]).float().flatten(1).norm(dim=1)
                 + (fresh[1] - reused[1]).float().flatten(1).norm(dim=1))
    if selection == "deviation":
        return deviation
    if attention is None:
        raise RuntimeError(f"selection {selection!r}: no attention scores were recorded")
    if selection == "attention":
        return attention.float()
    return deviation * attention.float()


def mean_relative_deviation(reused: tuple, fresh: tuple, unmatched: torch.Tensor) -> Optional[float]:
    """Mean over the matched rows of (||dK|| + ||dV||) / (||K|| + ||V||), reused against fresh K/V of one layer: how
    stale the reused context is (0: exactly what a full prefill computes). None without matched rows."""
    matched = ~unmatched
    if not bool(matched.any()):
        return None
    k0, v0 = (t[matched].float().flatten(1) for t in reused)
    k1, v1 = (t[matched].float().flatten(1) for t in fresh)
    size = (k1.norm(dim=1) + v1.norm(dim=1)).clamp_min(1e-30)
    return float((((k1 - k0).norm(dim=1) + (v1 - v0).norm(dim=1)) / size).mean())


class RowSchedule:
    """Which of the n positions past the exact prefix each layer recomputes: nested sets that keep the mandatory rows,
    the others ranked (`selection_scores`) at the last check layer and again where a set shrinks (`progressive`), the
    `first` rows (`boundary_rows`) above the rest. Shared by every front end (the HF engine, the vLLM connector): they
    run the layers, this chooses the rows.

        schedule = RowSchedule(counts, mandatory, config, num_layers, first)
        for idx in range(num_layers):  # while schedule.rows is not empty
            ranks = schedule.ranks(idx)        # keep the rows' reused K/V before the layer overwrites them
            ... run layer idx on schedule.rows ...
            if ranks: schedule.rank(idx, reused, fresh, attention)
            keep = schedule.advance(idx)       # indices into this layer's rows of the next layer's, or None
    """

    def __init__(self, counts: List[int], mandatory: torch.Tensor, config: ReuseConfig, num_layers: int,
                 first: Optional[torch.Tensor] = None, unmatched: Optional[torch.Tensor] = None):
        self.counts, self.mandatory, self.config = counts, mandatory, config
        # The rows without reused K/V (default: the mandatory ones): the check deviation is over all the others, the
        # matched rows made mandatory (the tail's, the observer window's) included.
        self.unmatched = mandatory if unmatched is None else unmatched.to(mandatory.device)
        self.n = len(mandatory)
        self.first = (torch.zeros_like(mandatory) if first is None else first.to(mandatory.device)) & ~mandatory
        self.check = min(effective_check_layers(config), num_layers) - 1
        tier = 2 - 2 * mandatory.to(torch.int8) - self.first.to(torch.int8)  # mandatory, first, the rest
        self.order = torch.argsort(tier, stable=True)  # until ranked
        self.rows = torch.arange(self.n, device=mandatory.device)  # sorted indices into the n positions
        if counts[0] < self.n:
            self.rows = self.order[: counts[0]].sort().values
        self.fused = torch.zeros(self.n, dtype=torch.float32, device=mandatory.device)  # not the default dtype
        self.deviation: Optional[float] = None  # the last check layer's mean_relative_deviation
        self.chooses = has_rows_to_choose(counts, int(mandatory.sum()), self.n)  # else `rank` has nothing to do

    def shrinks(self, idx: int) -> bool:
        """Whether the layer after idx recomputes fewer rows than idx."""
        return idx + 1 < len(self.counts) and self.counts[idx + 1] < len(self.rows)

    def ranks(self, idx: int) -> bool:
        """Whether layer idx ranks its rows: the caller keeps their reused K/V for `rank`."""
        return (idx == self.check and min(self.counts) < self.n
                or self.config.progressive and idx > self.check and self.shrinks(idx))

    def rank(self, idx: int, reused: tuple, fresh: tuple, attention: Optional[torch.Tensor] = None) -> None:
        """Rank this layer's rows by their scores here, summed over the layers ranked so far."""
        if idx == self.check:
            self.deviation = mean_relative_deviation(reused, fresh, self.unmatched[self.rows])
        if not self.chooses:  # every layer takes the mandatory rows (first in `order`) or all of them
            return
        scores = selection_scores(self.config.selection, reused, fresh, attention)
        # Only the rows that compete are scored: a mandatory row is recomputed anyway, and an unmatched one had no
        # reused K/V (its "reused" slot was never written: anything, NaN included, may be there). Each ranking layer
        # weighs the same.
        free = ~self.mandatory[self.rows]
        if bool(free.any()):
            scores = scores.masked_fill(~free, 0.0)
            self.fused[self.rows] += scores / scores[free].mean().clamp_min(1e-30)
        # The first rows above every other (by their own scores among themselves), the mandatory ones above all.
        ranked = self.fused + self.first * (self.fused.max() + 1.0)
        ranked = ranked.masked_fill(self.mandatory, math.inf)
        self.order = self.rows[torch.argsort(ranked[self.rows], descending=True, stable=True)]

    def stale(self) -> torch.Tensor:
        """After the last layer: the rows (indices into the n positions, ascending) that some layer left reused,
        i.e. not in the deepest layer's set."""
        left = torch.ones(self.n, dtype=torch.bool, device=self.mandatory.device)
        left[self.rows] = False
        return left.nonzero().flatten()

    def advance(self, idx: int) -> Optional[torch.Tensor]:
        """After layer idx: indices into its rows of the next layer's (a prefix of one order: nested), or None when
        the next layer recomputes the same rows."""
        if not self.shrinks(idx):
            return None
        chosen = self.order[: self.counts[idx + 1]].sort().values
        keep = torch.searchsorted(self.rows, chosen)
        self.rows = chosen
        return keep
