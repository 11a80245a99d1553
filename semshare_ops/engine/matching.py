"""Token matching between a target prompt and a reference prompt.

- Edit alignment (KVShare): a longest common subsequence of the two token-id sequences (bit-parallel, below);
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
from typing import Callable, Sequence

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

    def breaks(self) -> torch.Tensor:
        """int64: the matched target positions whose predecessor is unmatched or maps to a reference position other
        than theirs minus one, position 0 where it maps to another than 0 (the reference had text before it): where
        the reused context starts to differ from the target's own."""
        follows = torch.zeros(self.matched, dtype=torch.bool)
        follows[1:] = (self.dst[1:] == self.dst[:-1] + 1) & (self.src[1:] == self.src[:-1] + 1)
        if self.matched:
            follows[0] = bool(self.dst[0] == 0) and bool(self.src[0] == 0)
        return self.dst[~follows]


# Above this many DP cells (reference x target tokens) the bit-parallel LCS would keep too many rows for its
# traceback (one bit per cell: 32 MiB here); difflib's longest-block diff takes over.
_LCS_MAX_CELLS = 1 << 28


def edit_opcodes(reference_ids: Sequence[int], target_ids: Sequence[int]) -> list[tuple[str, int, int, int, int]]:
    """The edit script turning `reference_ids` into `target_ids`, as difflib's opcodes (tag, i1, i2, j1, j2), tag one
    of "equal", "insert", "delete", "replace"; i indexes the reference, j the target.

    The one token alignment of the package: the engine keeps the "equal" runs (`edit_pairs`), the store records the
    whole script between an entry and its parent. The kept tokens are a longest common subsequence (`lcs_pairs`),
    less its runs shorter than `_MIN_TRUSTED_RUN` between the common prefix and suffix: as many tokens reused as any
    alignment keeps, stray coincidences left out. difflib's longest-block-first diff is not that: when the prompt
    repeats a passage longer than the stretches between edits (a quoted paragraph, a list pasted twice), it anchors
    on the repeat crosswise and gives up everything on either side (measured: 3135 of 4152 tokens kept for 10%
    scattered edits of a ShareGPT text, where this keeps 3859). difflib (autojunk off) remains for prompts past
    `_LCS_MAX_CELLS` cells between the common prefix and suffix.
    """
    a, b = list(reference_ids), list(target_ids)
    n, m = len(a), len(b)
    # The common prefix and suffix are aligned as they stand (an optimal LCS keeps both whole), and only what lies
    # between them is aligned by LCS: an identical prompt, or one that extends its reference, costs no DP at all.
    head = common_prefix(a, b)
    tail = common_prefix(a[head:][::-1], b[head:][::-1])
    mid_a, mid_b = a[head:n - tail], b[head:m - tail]
    if len(mid_a) * len(mid_b) > _LCS_MAX_CELLS:
        blocks = difflib.SequenceMatcher(None, mid_a, mid_b, autojunk=False).get_matching_blocks()
        middle = [[i, j, size] for i, j, size in blocks]
    else:
        middle = []  # (i, j, length) of the LCS's runs of consecutive pairs
        for i, j in lcs_pairs(mid_a, mid_b):
            if middle and middle[-1][0] + middle[-1][2] == i and middle[-1][1] + middle[-1][2] == j:
                middle[-1][2] += 1
            else:
                middle.append([i, j, 1])
    middle = [run for run in middle if run[2] >= _MIN_TRUSTED_RUN]  # stray coincidences out
    runs = ([[0, 0, head]] if head else []) + [[i + head, j + head, size] for i, j, size in middle] + \
        ([[n - tail, m - tail, tail]] if tail else [])
    opcodes = []
    i = j = 0
    for i_next, j_next, length in runs + [[n, m, 0]]:
        if i < i_next or j < j_next:
            tag = "replace" if i < i_next and j < j_next else ("delete" if i < i_next else "insert")
            opcodes.append((tag, i, i_next, j, j_next))
        if length:
            opcodes.append(("equal", i_next, i_next + length, j_next, j_next + length))
        i, j = i_next + length, j_next + length
    return opcodes


# An LCS also pairs stray tokens of unrelated text (a common word here, a comma there), which would make unrelated
# prompts look similar to the similarity gate and carry K/V computed in another context. So a run of the LCS is kept
# only when it is at least this long, or when it starts both prompts (a common prefix: the very same K/V) or ends
# both (a common suffix, anchored as firmly).
# Measured: unrelated sentences keep 0-3 of 61 tokens (difflib: 11-17); 10% scattered edits of a 4k-token ShareGPT
# text keep 3790 of 4057 (difflib 3797) and, where the text repeats a passage, 3859 of 4152 (difflib 3135).
_MIN_TRUSTED_RUN = 3


def lcs_pairs(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int]]:
    """(i, j) pairs, ascending in both, of a longest common subsequence of `a` and `b`.

    Bit-parallel (Hyyro 2004, after Allison and Dix): row i of the DP table is one integer V_i with bit j clear
    where L[i][j+1] - L[i][j] = 1, so L[i][j] = j - popcount(V_i & (2^j - 1)), and one row costs a few operations on
    len(b)-bit integers. The table is built over both sequences reversed, so that the traceback, which takes a
    diagonal match whenever it keeps the optimum, takes each match as early as possible in `b` (the target): where
    a token repeats at an edit, a common prefix stays whole (its K/V are exact) rather than the run after the edit.
    Which of two copies in `a` a run lands on, where both give as long an alignment, is not chosen: after a
    change, a passage `a` holds twice and `b` once may go to `a`'s later copy.
    """
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    a, b = list(a)[::-1], list(b)[::-1]
    full = (1 << m) - 1
    masks: dict = {}
    for j, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << j)
    rows = [full]
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
        rows.append(v)

    def lcs(i: int, j: int) -> int:
        return j - (rows[i] & ((1 << j) - 1)).bit_count()

    pairs = []
    i, j = n, m
    here = lcs(i, j)
    while i > 0 and j > 0 and here > 0:
        if a[i - 1] == b[j - 1] and lcs(i - 1, j - 1) == here - 1:
            pairs.append((i - 1, j - 1))
            i, j, here = i - 1, j - 1, here - 1
        elif lcs(i - 1, j) == here:
            i -= 1
        else:
            j -= 1
    return [(n - 1 - i, m - 1 - j) for i, j in pairs]  # built backwards over reversed sequences: ascending here


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


def exact_prefix_match(n: int, target_tokens: int) -> Match:
    """The first `n` target positions taking the reference's K/V at the same positions, every token equal: an exact
    common prefix taken alone (the store's and the vLLM connector's serving under the similarity gate)."""
    pairs = torch.arange(n)
    return Match(pairs, pairs.clone(), torch.ones(n, dtype=torch.bool), target_tokens)


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


def rotate_embeddings(embeddings: torch.Tensor, base: float = 10000.0,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """Row t rotated by angle p_t * base^(-2k/d) in each pair (2k, 2k+1), p_t its position (`positions`, default
    the row's index): position folded into the hashed vector.

    The rotation is the one rope_reuse_ applies (oracle.rotate), with each row's delta its own position.
    """
    tokens, dim = embeddings.shape
    inv_freq = float(base) ** (-torch.arange(dim // 2, dtype=torch.float32, device=embeddings.device) * 2 / dim)
    if positions is None:
        positions = torch.arange(tokens, device=embeddings.device)
    return oracle.rotate(embeddings.float()[:, None, :], positions.to(embeddings.device), inv_freq,
                         neox=False)[:, 0, :]


def lsh_planes(dim: int, bits: int, seed: int) -> torch.Tensor:
    """The random hyperplanes of one engine: deterministic from (dim, bits, seed)."""
    gen = torch.Generator().manual_seed(seed)
    # fp32 whatever torch's default dtype (simhash takes fp32 planes; a bf16 default would also change the planes)
    return torch.randn(dim, bits, generator=gen, dtype=torch.float32)


def embedding_codes(embeddings: torch.Tensor, planes: torch.Tensor, base: float = 10000.0,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """SimHash codes of embeddings rotated by their positions (`rotate_embeddings`)."""
    return ops.simhash(rotate_embeddings(embeddings, base, positions), planes.to(embeddings.device))


def lsh_pairs(candidates: torch.Tensor, candidate_codes: torch.Tensor, target_ids: torch.Tensor,
              reference_codes: torch.Tensor, reference_ids: torch.Tensor, max_distance: int,
              neighbours: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuzzy matches for the target positions `candidates` (`candidate_codes`: their codes, one row each):
    (dst, src, exact), dropping those too far away."""
    if candidates.numel() == 0 or reference_codes.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.empty(0, dtype=torch.bool)
    if candidate_codes.shape[0] != candidates.numel():
        raise ValueError(f"candidate_codes: expected one row per candidate ({candidates.numel()}), got "
                         f"{candidate_codes.shape[0]}")
    k = min(neighbours, reference_codes.shape[0])
    dist, idx = ops.hamming_topk(candidate_codes, reference_codes, k)
    # An exact token match within range wins over nearer codes; out of range it does not shadow them.
    same = (reference_ids[idx] == target_ids[candidates][:, None]) & (dist <= max_distance)
    choice = torch.where(same.any(1), same.float().argmax(1), torch.zeros_like(candidates))
    best = idx.gather(1, choice[:, None])[:, 0]
    best_dist = dist.gather(1, choice[:, None])[:, 0]
    keep = best_dist <= max_distance
    return candidates[keep], best[keep], same.any(1)[keep]


def match_tokens(reference_ids: torch.Tensor, target_ids: torch.Tensor, method: str,
                 reference_codes: torch.Tensor | None = None,
                 target_codes: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 max_distance: int = 24) -> Match:
    """Pairs target positions with reference positions by `method`: "edit", "lsh", "hybrid", "prefix", "chunk".

    `target_codes` (for "lsh" and "hybrid") are the codes of every target token, or a function giving the codes of
    the target positions it is handed: then only the tokens edit alignment left unmatched are hashed (none for an
    identical prompt)."""
    exact_pairs = {"edit": edit_pairs, "hybrid": edit_pairs, "prefix": prefix_pairs, "chunk": chunk_pairs}
    if method not in (*exact_pairs, "lsh"):
        raise ValueError(f"method: expected one of {', '.join(map(repr, (*exact_pairs, 'lsh')))}, got {method!r}")
    if method in ("lsh", "hybrid"):
        for name, codes in (("reference_codes", reference_codes), ("target_codes", target_codes)):
            if codes is None:
                raise ValueError(f"{name}: method {method!r} needs the LSH codes of the tokens")
    n = int(target_ids.numel())
    dst = src = torch.empty(0, dtype=torch.long)
    exact = torch.empty(0, dtype=torch.bool)
    if method in exact_pairs:
        d, s = exact_pairs[method](reference_ids.tolist(), target_ids.tolist())
        dst, src = torch.tensor(d, dtype=torch.long), torch.tensor(s, dtype=torch.long)
        exact = torch.ones(len(d), dtype=torch.bool)
    left = torch.ones(n, dtype=torch.bool)
    left[dst] = False
    candidates = torch.nonzero(left)[:, 0]
    if method in ("lsh", "hybrid") and candidates.numel():
        codes = target_codes(candidates) if callable(target_codes) else target_codes[candidates]
        d, s, e = lsh_pairs(candidates, codes, target_ids, reference_codes, reference_ids, max_distance)
        dst, src, exact = torch.cat([dst, d]), torch.cat([src, s]), torch.cat([exact, e])
    order = torch.argsort(dst)
    return Match(dst[order], src[order], exact[order], n)
