"""Donors: finished prompts whose K/V later requests reuse.

The K/V live in the worker process, next to vLLM's paged cache (`DonorStore`: a byte budget, least recently used
evicted first). The scheduler process keeps only what choosing a donor needs (`DonorIndex`: token ids, namespace,
depth), learns of every donor stored or evicted from the worker's per-step report, and never holds model weights.

Choosing a donor (scheduler): the donors of the request's namespace are pre-ranked by shared token 4-grams (cheap,
one set intersection each), the best `candidates` are aligned token by token (engine.matching's edit alignment),
and the donor leaving the fewest target tokens unmatched wins; ties go to the shallower donor, then to the more
recently used one: the rule of `semshare_ops.store`.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..engine import matching

_NGRAM = 4


def ngrams(ids: Sequence[int], n: int = _NGRAM) -> frozenset:
    return frozenset(hash(tuple(ids[i:i + n])) for i in range(max(0, len(ids) - n + 1)))


# ---- scheduler side ------------------------------------------------------------------------------------------------


@dataclass
class DonorInfo:
    donor_id: str
    namespace: Optional[str]  # the request's cache_salt; None is the default (unsalted) namespace
    token_ids: List[int]
    depth: int
    exact_prefix: int = 0  # leading positions whose K/V are exactly a full prefill's (engine.ReferenceEntry's)
    grams: frozenset = field(default_factory=frozenset)
    used: int = 0  # recency stamp


@dataclass
class Choice:
    donor: DonorInfo
    match: matching.Match
    covered: int  # target tokens matched or inside the exact prefix hit


class DonorIndex:
    """Which donors exist, per namespace (scheduler process)."""

    def __init__(self):
        self._donors: Dict[str, DonorInfo] = {}
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self._donors)

    def __contains__(self, donor_id: str) -> bool:
        return donor_id in self._donors

    def get(self, donor_id: str) -> Optional[DonorInfo]:
        return self._donors.get(donor_id)

    def add(self, info: DonorInfo) -> None:
        info.grams = info.grams or ngrams(info.token_ids)
        info.used = next(self._clock)
        self._donors[info.donor_id] = info

    def remove(self, donor_id: str) -> None:
        self._donors.pop(donor_id, None)

    def touch(self, donor_id: str) -> None:
        if donor_id in self._donors:
            self._donors[donor_id].used = next(self._clock)

    def choose(self, namespace: Optional[str], target_ids: Sequence[int], prefix_hit: int,
               candidates: int) -> Optional[Choice]:
        """The best donor of `namespace` for `target_ids` (whose first `prefix_hit` tokens vLLM already holds), or
        None when the namespace has no donor."""
        pool = [d for d in self._donors.values() if d.namespace == namespace]
        if not pool:
            return None
        grams = ngrams(target_ids)
        pool.sort(key=lambda d: (-len(grams & d.grams), d.depth, -d.used))
        target = torch.tensor(list(target_ids), dtype=torch.long)
        best: Optional[Tuple[tuple, Choice]] = None
        for donor in pool[:candidates]:
            match = matching.match_tokens(torch.tensor(donor.token_ids, dtype=torch.long), target, "edit")
            covered = int((match.dst >= prefix_hit).sum()) + prefix_hit
            key = (-covered, donor.depth, -donor.used)
            if best is None or key < best[0]:
                best = (key, Choice(donor, match, covered))
        return best[1]


# ---- worker side ---------------------------------------------------------------------------------------------------


@dataclass
class Donor:
    donor_id: str
    token_ids: torch.Tensor  # int64 [T]
    keys: torch.Tensor  # [L, T, H, D], post-RoPE, token-major
    values: torch.Tensor  # [L, T, H, D]
    codes: Optional[torch.Tensor]  # int64 [T, W]: LSH codes of the token embeddings (lsh/hybrid matching only)

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()


class DonorStore:
    """Donors' K/V within a byte budget, least recently used evicted first (worker process)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._donors: "OrderedDict[str, Donor]" = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._donors)

    def get(self, donor_id: str) -> Optional[Donor]:
        donor = self._donors.get(donor_id)
        if donor is not None:
            self._donors.move_to_end(donor_id)
        return donor

    def put(self, donor: Donor) -> Tuple[bool, List[str]]:
        """Store a donor (replacing one of the same id); returns (stored, ids evicted to make room). A donor larger
        than the whole budget is not stored and evicts nothing."""
        evicted = []
        old = self._donors.pop(donor.donor_id, None)
        if old is not None:
            self.nbytes -= old.nbytes
        if donor.nbytes > self.capacity_bytes:
            if old is not None:
                evicted.append(donor.donor_id)
            return False, evicted
        while self._donors and self.nbytes + donor.nbytes > self.capacity_bytes:
            victim_id, victim = self._donors.popitem(last=False)
            self.nbytes -= victim.nbytes
            evicted.append(victim_id)
        self._donors[donor.donor_id] = donor
        self.nbytes += donor.nbytes
        return True, evicted
