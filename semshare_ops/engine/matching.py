"""Token matching between a target prompt and a reference prompt.

- Edit alignment (KVShare): the longest-matching-block diff of the two token-id sequences (Python's difflib);
  its "equal" runs are exact matches at possibly shifted positions. Insertions, deletions and replacements are
  what is left over.
- LSH matching (SemShareKV): input token embeddings, rotated by their own position (so a target token prefers a
  reference token that is alike *and* about as far into its prompt), hashed with `simhash`; each target token takes
  its nearest reference code by `hamming_topk`, preferring a candidate with the same token id, and is matched only
  within `max_distance` bits.
- Hybrid: edit alignment first, LSH for the target tokens it left unmatched.
- Baselines for the benchmarks, not for serving: "prefix" (the common prefix in whole 16-token blocks, what vLLM's
  prefix caching reuses) and "chunk" (target chunks of 16 tokens found verbatim anywhere in the reference, what a
  CacheBlend-style system reuses).
Knows nothing of HF types: token ids and embedding matrices in, position pairs out.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import ops
from ..ops import oracle


@dataclass(frozen=True)
class Match:
    """Target positions `dst` take the K/V of reference positions `src`; `exact` marks equal token ids."""

    dst: torch.Tensor  # int64 [P], ascending
    src: torch.Tensor  # int64 [P]
    exact: torch.Tensor  # bool [P]
    target_tokens: int

    @property
    def matched(self) -> int:
        return int(self.dst.numel())

    def unmatched_mask(self) -> torch.Tensor:
        mask = torch.ones(self.target_tokens, dtype=torch.bool)
        mask[self.dst] = False
        return mask


def edit_opcodes(reference_ids: Sequence[int], target_ids: Sequence[int]) -> list[tuple[str, int, int, int, int]]:
    """The edit script turning `reference_ids` into `target_ids`: difflib's opcodes (tag, i1, i2, j1, j2), tag one of
    "equal", "insert", "delete", "replace"; i indexes the reference, j the target.

    The one token alignment of the package: the engine keeps the "equal" runs (`edit_pairs`), the store records the
    whole script between an entry and its parent. autojunk stays off: from 200 target tokens on, it would stop
    difflib from anchoring a match on any id that makes up over 1% of the target, and frequent tokens would go
    unmatched.
    """
    matcher = difflib.SequenceMatcher(None, list(reference_ids), list(target_ids), autojunk=False)
    return matcher.get_opcodes()


def edit_pairs(reference_ids: Sequence[int], target_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(target positions, reference positions) of the tokens an edit script keeps."""
    dst, src = [], []
    for tag, i1, i2, j1, j2 in edit_opcodes(reference_ids, target_ids):
        if tag == "equal":
            dst.extend(range(j1, j2))
            src.extend(range(i1, i2))
    return dst, src


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_pairs(reference_ids: Sequence[int], target_ids: Sequence[int],
                 block: int = 16) -> tuple[list[int], list[int]]:
    """The common prefix, cut to whole blocks (a prefix cache hashes full blocks only)."""
    n = common_prefix(reference_ids, target_ids)
    n -= n % block
    return list(range(n)), list(range(n))


def chunk_pairs(reference_ids: Sequence[int], target_ids: Sequence[int],
                chunk: int = 16) -> tuple[list[int], list[int]]:
    """Target chunks [i*chunk, (i+1)*chunk) that occur verbatim at any offset of the reference (first occurrence)."""
    reference_ids, target_ids = list(reference_ids), list(target_ids)
    where = {}
    for i in range(len(reference_ids) - chunk + 1):
        where.setdefault(tuple(reference_ids[i:i + chunk]), i)
    dst, src = [], []
    for j in range(0, len(target_ids) - chunk + 1, chunk):
        i = where.get(tuple(target_ids[j:j + chunk]))
        if i is not None:
            dst.extend(range(j, j + chunk))
            src.extend(range(i, i + chunk))
    return dst, src


def rotate_embeddings(embeddings: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Row t rotated by angle t * base^(-2k/d) in each pair (2k, 2k+1): position folded into the hashed vector.

    The rotation is the one rope_reuse_ applies (oracle.rotate), with each row's delta its own index.
    """
    tokens, dim = embeddings.shape
    inv_freq = base ** (-torch.arange(dim // 2, dtype=torch.float32, device=embeddings.device) * 2 / dim)
    positions = torch.arange(tokens, device=embeddings.device)
    return oracle.rotate(embeddings.float()[:, None, :], positions, inv_freq, neox=False)[:, 0, :]


def lsh_planes(dim: int, bits: int, seed: int) -> torch.Tensor:
    """The random hyperplanes of one engine: deterministic from (dim, bits, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, bits, generator=gen)


def embedding_codes(embeddings: torch.Tensor, planes: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    return ops.simhash(rotate_embeddings(embeddings, base), planes.to(embeddings.device))


def lsh_pairs(target_codes: torch.Tensor, reference_codes: torch.Tensor, target_ids: torch.Tensor,
              reference_ids: torch.Tensor, candidates: torch.Tensor, max_distance: int,
              neighbours: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuzzy matches for the target positions `candidates`: (dst, src, exact), dropping those too far away."""
    if candidates.numel() == 0 or reference_codes.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.empty(0, dtype=torch.bool)
    k = min(neighbours, reference_codes.shape[0])
    dist, idx = ops.hamming_topk(target_codes[candidates], reference_codes, k)
    # An exact token match within range wins over nearer codes; out of range it does not shadow them.
    same = (reference_ids[idx] == target_ids[candidates][:, None]) & (dist <= max_distance)
    choice = torch.where(same.any(1), same.float().argmax(1), torch.zeros_like(candidates))
    best = idx.gather(1, choice[:, None])[:, 0]
    best_dist = dist.gather(1, choice[:, None])[:, 0]
    keep = best_dist <= max_distance
    return candidates[keep], best[keep], same.any(1)[keep]


def match_tokens(reference_ids: torch.Tensor, target_ids: torch.Tensor, method: str,
                 reference_codes: torch.Tensor | None = None, target_codes: torch.Tensor | None = None,
                 max_distance: int = 24) -> Match:
    """Pairs target positions with reference positions by `method`: "edit", "lsh", "hybrid", "prefix", "chunk"."""
    n = int(target_ids.numel())
    dst = src = torch.empty(0, dtype=torch.long)
    exact = torch.empty(0, dtype=torch.bool)
    exact_pairs = {"edit": edit_pairs, "hybrid": edit_pairs, "prefix": prefix_pairs, "chunk": chunk_pairs}
    if method in exact_pairs:
        d, s = exact_pairs[method](reference_ids.tolist(), target_ids.tolist())
        dst, src = torch.tensor(d, dtype=torch.long), torch.tensor(s, dtype=torch.long)
        exact = torch.ones(len(d), dtype=torch.bool)
    if method in ("lsh", "hybrid"):
        left = torch.ones(n, dtype=torch.bool)
        left[dst] = False
        d, s, e = lsh_pairs(target_codes, reference_codes, target_ids, reference_ids,
                            torch.nonzero(left)[:, 0], max_distance)
        dst, src, exact = torch.cat([dst, d]), torch.cat([src, s]), torch.cat([exact, e])
    order = torch.argsort(dst)
    return Match(dst[order], src[order], exact[order], n)
