"""semshare_ops.matching (docs/contract.md section 4, step 2): edit alignment, position-rotated LSH matching, hybrid.

Everything here is plain torch on CPU: token ids and embedding matrices in, (target, reference) position pairs out.
The oracles are written independently of the implementation (python popcounts, float64 rotations).
"""

import math

import pytest
import torch

from semshare_ops.engine import matching

from engine_testutils import popcount_distance

VOCAB = 512
DIM = 64
BITS = 128


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tokens(n: int, seed: int, vocab: int = VOCAB) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen(seed)).tolist()


def new_tokens(n: int, seed: int) -> list[int]:
    """Random ids past VOCAB: tokens no reference of random_tokens holds."""
    return [VOCAB + t for t in random_tokens(n, seed)]


def assert_valid_pairs(dst, src, reference_ids, target_ids):
    """Edit pairs: strictly increasing in both sequences, and each pair joins equal tokens."""
    assert len(dst) == len(src)
    assert all(b > a for a, b in zip(dst, dst[1:])), f"target positions not strictly increasing: {dst}"
    assert all(b > a for a, b in zip(src, src[1:])), f"reference positions not strictly increasing: {src}"
    assert all(0 <= d < len(target_ids) for d in dst)
    assert all(0 <= s < len(reference_ids) for s in src)
    assert all(target_ids[d] == reference_ids[s] for d, s in zip(dst, src))


@pytest.fixture(scope="module")
def embedding_matrix():
    """A random (not constant) token embedding table, as a model's embed_tokens would hold."""
    return torch.randn(VOCAB, DIM, generator=gen(11))


@pytest.fixture(scope="module")
def planes():
    return matching.lsh_planes(DIM, BITS, 0)


def codes_of(ids, embedding_matrix, planes):
    return matching.embedding_codes(embedding_matrix[torch.tensor(ids, dtype=torch.long)], planes)


# ---- edit_pairs on hand-made sequences -------------------------------------------------------------------------


def test_edit_pairs_identical():
    ids = [5, 3, 8, 1, 9, 3]
    dst, src = matching.edit_pairs(ids, ids)
    assert dst == list(range(6)) and src == list(range(6))


def test_edit_pairs_insert():
    ref = [1, 2, 3, 4, 5]
    tgt = [1, 2, 90, 91, 3, 4, 5]
    dst, src = matching.edit_pairs(ref, tgt)
    assert dst == [0, 1, 4, 5, 6]
    assert src == [0, 1, 2, 3, 4]


def test_edit_pairs_delete():
    ref = [1, 2, 3, 4, 5, 6]
    tgt = [1, 2, 5, 6]
    dst, src = matching.edit_pairs(ref, tgt)
    assert dst == [0, 1, 2, 3]
    assert src == [0, 1, 4, 5]


def test_edit_pairs_replace():
    ref = [1, 2, 3, 4, 5]
    tgt = [1, 2, 70, 4, 5]
    dst, src = matching.edit_pairs(ref, tgt)
    assert dst == [0, 1, 3, 4]
    assert src == [0, 1, 3, 4]


@pytest.mark.parametrize("ref, tgt", [([], []), ([], [4, 5]), ([4, 5], []), ([1, 2, 3], [7, 8, 9])],
                         ids=["both-empty", "ref-empty", "target-empty", "disjoint"])
def test_edit_pairs_nothing_in_common(ref, tgt):
    assert matching.edit_pairs(ref, tgt) == ([], [])


def test_edit_pairs_accepts_any_sequence():
    ref = [4, 1, 4, 2]
    dst, src = matching.edit_pairs(tuple(ref), (4, 2))
    assert_valid_pairs(dst, src, ref, [4, 2])
    assert len(dst) == 2


def test_edit_pairs_keep_no_stray_coincidences():
    """Unrelated sequences share short runs by chance; inside the prompts, none shorter than 3 tokens is kept,
    while a common prefix or suffix is kept at any length."""
    ref = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    tgt = [30, 12, 31, 32, 15, 16, 33, 34, 35, 36]  # 12 and 15 16: stray
    assert matching.edit_pairs(ref, tgt) == ([], [])
    assert matching.edit_pairs(ref, [10, 12, 31, 19]) == ([0, 3], [0, 9])
    assert matching.edit_pairs(ref, [40, 13, 14, 15, 41]) == ([1, 2, 3], [3, 4, 5])


def test_edit_pairs_are_a_longest_common_subsequence_despite_a_repeated_passage():
    """A prompt that holds a passage twice, edited every 40 tokens (both copies included): the LCS keeps every
    untouched token, each where it was. (Where a copy is left untouched and longer than the stretches between edits,
    difflib would anchor on it crosswise: test_edit_opcodes_cell_budget_is_inclusive.)"""
    passage = random_tokens(60, seed=11)
    ref = random_tokens(100, seed=12) + passage + random_tokens(100, seed=13) + passage
    tgt = list(ref)
    for p in range(20, len(ref), 40):  # edits every 40 tokens: shorter than the repeat
        tgt[p] = (tgt[p] + 1) % VOCAB
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) == len(tgt) - len(range(20, len(ref), 40))
    assert dst == src  # nothing moved: every kept token stays where it was


@pytest.mark.parametrize("edit", ["replace", "insert", "delete", "scattered"])
def test_edit_pairs_random_edits_keep_the_untouched_tokens(edit):
    """A 300-token random sequence with one edit: every untouched token is kept, pairs are a valid alignment."""
    ref = random_tokens(300, seed=1)
    new = random_tokens(40, seed=2)
    if edit == "replace":
        tgt, kept = ref[:100] + new[:25] + ref[130:], 100 + 170
    elif edit == "insert":
        tgt, kept = ref[:50] + new[:15] + ref[50:], 300
    elif edit == "delete":
        tgt, kept = ref[:200] + ref[230:], 270
    else:
        tgt = list(ref)
        for p in (17, 88, 150, 222, 290):
            tgt[p] = (tgt[p] + 1) % VOCAB
        kept = 295
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) >= kept
    if edit == "insert":  # the inserted span is exactly what is left unmatched
        assert set(range(len(tgt))) - set(dst) == set(range(50, 65))
    if edit == "delete":
        assert set(range(len(ref))) - set(src) == set(range(200, 230))


def test_edit_pairs_with_repeated_tokens():
    """A small vocabulary (many repeats) still gives a valid, increasing alignment."""
    ref = random_tokens(200, seed=3, vocab=6)
    tgt = ref[:70] + random_tokens(12, seed=4, vocab=6) + ref[90:]
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) >= 70 + 110


def lcs_length(a, b) -> int:
    """The textbook O(n m) dynamic program: independent of the bit-parallel one."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


@pytest.mark.parametrize("seed", range(6))
def test_edit_pairs_are_an_lcs_with_the_common_prefix_and_suffix_aligned_first(seed, monkeypatch):
    """The common prefix and suffix are aligned as they stand and only the middle by LCS: still a longest common
    subsequence of the whole (every run trusted here), on a small vocabulary where tokens repeat at the edits."""
    monkeypatch.setattr(matching, "_MIN_TRUSTED_RUN", 1)
    ref = random_tokens(120, seed=40 + seed, vocab=5)
    tgt = ref[:30 + seed] + random_tokens(7, seed=50 + seed, vocab=5) + ref[45:90] + ref[95 + seed:]
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) == lcs_length(ref, tgt)
    head = matching.common_prefix(ref, tgt)
    assert dst[:head] == src[:head] == list(range(head))  # the exact prefix stays whole


def test_lcs_pairs_keep_a_common_prefix_whole_where_a_token_repeats_at_the_edit():
    """lcs_pairs takes each match as early as possible: where the target repeats the token at an edit, the two
    alignments are equally long, and the one kept pairs the common prefix with itself (K/V exact) rather than
    shifting its last token onto the repeat. A table built over the sequences as they stand (not reversed) takes the
    matches as late as possible and cuts the prefix short."""
    ref = random_tokens(40, seed=90)
    p = 17
    tgt = ref[:p] + [ref[p - 1]] + ref[p:]  # the prefix's last token repeated right after it
    pairs = matching.lcs_pairs(ref, tgt)
    assert len(pairs) == len(ref) == lcs_length(ref, tgt)
    assert pairs[:p] == [(i, i) for i in range(p)]
    assert pairs[p:] == [(i, i + 1) for i in range(p, len(ref))]


def test_edit_pairs_give_a_passage_the_target_repeats_to_its_first_copy():
    """The target quotes a passage of the reference twice: only one copy can take the reference's K/V, and it is
    the first, which stands where the reference has it (no shift), the second being left to recompute. The same
    length of alignment takes the second copy when the traceback gives up target tokens before reference ones."""
    head, tail = random_tokens(20, seed=91), random_tokens(20, seed=92)
    passage = random_tokens(12, seed=93)
    ref = head + new_tokens(5, 94) + passage + new_tokens(30, 95) + tail
    tgt = head + new_tokens(5, 96) + passage + new_tokens(7, 97) + passage + tail
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    first = list(range(25, 37))  # the passage's place in both prompts
    assert dst == list(range(20)) + first + list(range(len(tgt) - 20, len(tgt)))
    assert src == list(range(20)) + first + list(range(len(ref) - 20, len(ref)))


def test_edit_opcodes_of_an_identical_or_extended_prompt():
    ref = random_tokens(500, seed=60)
    assert matching.edit_opcodes(ref, ref) == [("equal", 0, 500, 0, 500)]
    more = random_tokens(40, seed=61)
    assert matching.edit_opcodes(ref, ref + more) == [("equal", 0, 500, 0, 500), ("insert", 500, 500, 500, 540)]
    assert matching.edit_opcodes(ref + more, ref) == [("equal", 0, 500, 0, 500), ("delete", 500, 540, 500, 500)]
    # Same suffix, new start: the suffix is aligned whole even when the LCS table would exceed its cell budget.
    head = random_tokens(30, seed=62)
    assert matching.edit_opcodes(ref, head + ref[10:]) == [("replace", 0, 10, 0, 30), ("equal", 10, 500, 30, 520)]


def test_edit_opcodes_past_the_cell_budget_use_difflib_on_the_middle(monkeypatch):
    monkeypatch.setattr(matching, "_LCS_MAX_CELLS", 100)
    ref = random_tokens(300, seed=63)
    tgt = ref[:100] + random_tokens(20, seed=64) + ref[120:200] + ref[210:]
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) == 100 + 80 + 90


def test_edit_opcodes_past_the_cell_budget_keep_frequent_tokens(monkeypatch):
    """difflib runs with autojunk off: with it on, every token that makes up more than 1% of a middle of 200 tokens
    or more counts as junk and anchors nothing, so a prompt of few distinct ids (digits, a table) would lose a long
    untouched stretch. Here every id is that frequent, and every target token but the 20 new ones is kept (where
    the deleted stretch starts or ends is left to chance: a token may equal its neighbour across the cut)."""
    monkeypatch.setattr(matching, "_LCS_MAX_CELLS", 100)
    ref = random_tokens(600, seed=80, vocab=16)
    tgt = ref[:100] + new_tokens(20, seed=81) + ref[120:500] + ref[510:]
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert set(range(len(tgt))) - set(dst) == set(range(100, 120)), "an untouched stretch was not kept"


def test_edit_opcodes_cell_budget_is_inclusive(monkeypatch):
    """The LCS runs up to and including `_LCS_MAX_CELLS` cells between the common prefix and suffix, difflib only
    above. A passage the prompt holds twice tells them apart: the target edits the first copy and leaves the
    second intact, so difflib's longest block pairs the reference's first copy with the target's second (a tie it
    gives to the earliest in the reference) and gives up what lies between; the LCS keeps every untouched token."""
    passage = random_tokens(60, seed=84)
    ref = random_tokens(100, seed=85) + passage + random_tokens(100, seed=86) + passage + random_tokens(40, seed=87)
    tgt = list(ref)
    edits = [20, 60, 100, 130, 180, 220, 259, 320, 340]  # no untouched stretch as long as the passage but its copy
    for p in edits:
        tgt[p] = (tgt[p] + 1) % VOCAB
    head, tail = edits[0], len(ref) - 1 - edits[-1]  # the common prefix and suffix stop at the first and last edit
    cells = (len(ref) - head - tail) * (len(tgt) - head - tail)
    monkeypatch.setattr(matching, "_LCS_MAX_CELLS", cells)
    dst, src = matching.edit_pairs(ref, tgt)
    assert len(dst) == len(tgt) - len(edits) and dst == src
    monkeypatch.setattr(matching, "_LCS_MAX_CELLS", cells - 1)
    dst, src = matching.edit_pairs(ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)
    assert len(dst) < len(tgt) - len(edits) - 100  # difflib: the crosswise anchor costs over 100 tokens


# ---- rotate_embeddings -----------------------------------------------------------------------------------------


def test_rotate_embeddings_takes_an_int_base_past_int64():
    """ReuseConfig takes an int embedding_rope_base; one past int64 (10**20) failed every request with an
    OverflowError, where the float 1e20 worked."""
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(matching.rotate_embeddings(x, 10**20), matching.rotate_embeddings(x, 1e20), rtol=0,
                               atol=0)


def test_rotate_embeddings_identity_at_position_zero_and_preserves_norms():
    x = torch.randn(50, DIM, generator=gen(5))
    out = matching.rotate_embeddings(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    pair_norms = lambda t: t.view(50, DIM // 2, 2).norm(dim=2)  # noqa: E731  each (2k, 2k+1) pair is rotated
    torch.testing.assert_close(pair_norms(out), pair_norms(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[1:], x[1:], atol=1e-3)  # positions > 0 really are rotated


def test_rotate_embeddings_matches_float64_oracle():
    base = 10000.0
    x = torch.randn(40, DIM, generator=gen(6))
    out = matching.rotate_embeddings(x, base)
    xd = x.double()
    k = torch.arange(DIM // 2, dtype=torch.float64)
    inv_freq = base ** (-2 * k / DIM)
    ang = torch.arange(40, dtype=torch.float64)[:, None] * inv_freq
    z = torch.complex(xd[:, 0::2], xd[:, 1::2]) * torch.polar(torch.ones_like(ang), ang)
    expected = torch.stack([z.real, z.imag], dim=-1).reshape(40, DIM)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_rotate_embeddings_at_given_positions_are_the_rows_of_the_full_rotation():
    x = torch.randn(40, DIM, generator=gen(9))
    rows = torch.tensor([3, 17, 18, 39])
    torch.testing.assert_close(matching.rotate_embeddings(x[rows], positions=rows), matching.rotate_embeddings(x)[rows],
                               rtol=0, atol=0)


def test_rotate_embeddings_same_position_keeps_dot_products():
    """Rotation by position: two rows at the same position keep their dot product."""
    x = torch.randn(30, DIM, generator=gen(7))
    y = torch.randn(30, DIM, generator=gen(8))
    rx, ry = matching.rotate_embeddings(x), matching.rotate_embeddings(y)
    torch.testing.assert_close((rx * ry).sum(1), (x * y).sum(1), rtol=1e-4, atol=1e-4)


def test_rotate_embeddings_odd_dim_leaves_last_feature():
    x = torch.randn(12, 7, generator=gen(9))
    out = matching.rotate_embeddings(x)
    torch.testing.assert_close(out[:, 6], x[:, 6], rtol=0, atol=0)
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)


# ---- LSH codes ---------------------------------------------------------------------------------------------------


def test_lsh_planes_deterministic_by_seed():
    a, b, c = matching.lsh_planes(DIM, BITS, 3), matching.lsh_planes(DIM, BITS, 3), matching.lsh_planes(DIM, BITS, 4)
    assert a.shape == (DIM, BITS)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_embedding_codes_are_simhash_of_rotated_embeddings(embedding_matrix, planes):
    ids = random_tokens(64, seed=10)
    codes = codes_of(ids, embedding_matrix, planes)
    assert codes.shape == (64, math.ceil(BITS / 64)) and codes.dtype == torch.int64
    proj = matching.rotate_embeddings(embedding_matrix[torch.tensor(ids)]).double() @ planes.double()
    for t in range(64):
        for b in range(BITS):
            if abs(proj[t, b]) < 1e-4:  # too close to the hyperplane to tell in fp32
                continue
            bit = (int(codes[t, b // 64]) >> (b % 64)) & 1
            assert bit == int(proj[t, b] >= 0), f"token {t} bit {b}"


def test_same_token_at_other_position_gets_other_code(embedding_matrix, planes):
    """Position is folded in: one token repeated at many positions gets distinct codes."""
    codes = codes_of([42] * 40, embedding_matrix, planes)
    assert len({tuple(c) for c in codes.tolist()}) > 30
    # ... but nearby positions stay nearer than far ones (the rotation is smooth)
    near = popcount_distance(codes[10], codes[11])
    far = popcount_distance(codes[10], codes[39])
    assert near < far


# ---- match_tokens ------------------------------------------------------------------------------------------------


def make_pair(edit: str):
    ref = random_tokens(240, seed=20)
    new = random_tokens(30, seed=21)
    if edit == "identical":
        tgt = list(ref)
    elif edit == "replace":
        tgt = ref[:90] + new[:20] + ref[110:]
    elif edit == "insert":
        tgt = ref[:30] + new[:12] + ref[30:]
    elif edit == "delete":
        tgt = ref[:150] + ref[175:]
    else:  # a few scattered token changes
        tgt = list(ref)
        for p in (5, 60, 61, 130, 200):
            tgt[p] = (tgt[p] + 7) % VOCAB
    return ref, tgt


EDITS = ["identical", "replace", "insert", "delete", "scattered"]


def run_match(method, ref, tgt, embedding_matrix, planes, max_distance=24):
    r, t = torch.tensor(ref), torch.tensor(tgt)
    rc, tc = codes_of(ref, embedding_matrix, planes), codes_of(tgt, embedding_matrix, planes)
    return matching.match_tokens(r, t, method, rc, tc, max_distance), rc, tc


def assert_match_well_formed(m, ref, tgt, rc=None, tc=None, max_distance=None):
    n = len(tgt)
    assert m.target_tokens == n
    assert m.dst.dtype == torch.long and m.src.dtype == torch.long and m.exact.dtype == torch.bool
    assert m.dst.shape == m.src.shape == m.exact.shape
    dst = m.dst.tolist()
    assert all(b > a for a, b in zip(dst, dst[1:])), "dst must be strictly ascending (one source per target)"
    assert all(0 <= d < n for d in dst) and all(0 <= s < len(ref) for s in m.src.tolist())
    equal = [tgt[d] == ref[s] for d, s in zip(dst, m.src.tolist())]
    assert m.exact.tolist() == equal, "exact must flag exactly the pairs of equal token ids"
    assert m.matched == len(dst)
    mask = m.unmatched_mask()
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert int(mask.sum()) == n - m.matched and not mask[m.dst].any()
    if max_distance is not None:  # every fuzzy (LSH) pair lies within the bit budget
        for d, s in zip(dst, m.src.tolist()):
            assert popcount_distance(tc[d], rc[s]) <= max_distance


@pytest.mark.parametrize("edit", EDITS)
def test_match_edit_equals_edit_pairs(edit, embedding_matrix, planes):
    ref, tgt = make_pair(edit)
    m, _, _ = run_match("edit", ref, tgt, embedding_matrix, planes)
    dst, src = matching.edit_pairs(ref, tgt)
    assert m.dst.tolist() == dst and m.src.tolist() == src
    assert bool(m.exact.all())
    assert_match_well_formed(m, ref, tgt)
    assert_valid_pairs(dst, src, ref, tgt)


@pytest.mark.parametrize("method", ["lsh", "hybrid"])
@pytest.mark.parametrize("edit", EDITS)
def test_match_with_codes_on_demand_hashes_only_the_unmatched(method, edit, embedding_matrix, planes):
    """Target codes as a function: the same match as with every code given, and only the positions edit alignment
    left unmatched are hashed (none of an identical prompt)."""
    ref, tgt = make_pair(edit)
    full, rc, _ = run_match(method, ref, tgt, embedding_matrix, planes)
    asked = []

    def codes(positions):
        asked.append(positions.clone())
        return matching.embedding_codes(embedding_matrix[torch.tensor(tgt)[positions]], planes, positions=positions)

    lazy = matching.match_tokens(torch.tensor(ref), torch.tensor(tgt), method, rc, codes)
    for name in ("dst", "src", "exact"):
        assert torch.equal(getattr(lazy, name), getattr(full, name)), name
    kept = set(matching.edit_pairs(ref, tgt)[0]) if method == "hybrid" else set()
    hashed = torch.cat(asked).tolist() if asked else []
    assert sorted(hashed) == sorted(set(range(len(tgt))) - kept)
    assert len(asked) == (1 if hashed else 0)  # one call, none when everything is matched
    if edit == "identical" and method == "hybrid":
        assert asked == []


def test_match_edit_needs_no_codes():
    ref, tgt = make_pair("replace")
    m = matching.match_tokens(torch.tensor(ref), torch.tensor(tgt), "edit")
    assert m.matched == len(matching.edit_pairs(ref, tgt)[0])


@pytest.mark.parametrize("edit", EDITS)
def test_match_lsh_well_formed(edit, embedding_matrix, planes):
    ref, tgt = make_pair(edit)
    m, rc, tc = run_match("lsh", ref, tgt, embedding_matrix, planes, max_distance=24)
    assert_match_well_formed(m, ref, tgt, rc, tc, max_distance=24)


def test_match_lsh_identical_recovers_positions(embedding_matrix, planes):
    ref, tgt = make_pair("identical")
    m, rc, tc = run_match("lsh", ref, tgt, embedding_matrix, planes)
    same_place = (m.dst == m.src).sum().item()
    assert m.matched == len(tgt)
    assert same_place >= 0.95 * len(tgt), f"only {same_place}/{len(tgt)} positions recovered"
    assert bool(m.exact.all())


def test_match_lsh_scattered_edit_mostly_in_place(embedding_matrix, planes):
    """Tokens untouched by a few scattered substitutions (no shift) are matched at their own position."""
    ref, tgt = make_pair("scattered")
    m, _, _ = run_match("lsh", ref, tgt, embedding_matrix, planes)
    pairs = dict(zip(m.dst.tolist(), m.src.tolist()))
    untouched = [p for p in range(len(tgt)) if p not in (5, 60, 61, 130, 200)]
    in_place = sum(pairs.get(p) == p for p in untouched)
    assert in_place >= 0.95 * len(untouched)


@pytest.mark.parametrize("edit", EDITS)
def test_match_hybrid_extends_edit(edit, embedding_matrix, planes):
    ref, tgt = make_pair(edit)
    hyb, rc, tc = run_match("hybrid", ref, tgt, embedding_matrix, planes, max_distance=24)
    edit_m, _, _ = run_match("edit", ref, tgt, embedding_matrix, planes)
    assert_match_well_formed(hyb, ref, tgt)
    hp = dict(zip(hyb.dst.tolist(), hyb.src.tolist()))
    for d, s in zip(edit_m.dst.tolist(), edit_m.src.tolist()):
        assert hp.get(d) == s, f"hybrid lost the edit pair ({d}, {s})"
    edit_dst = set(edit_m.dst.tolist())
    for d, s in hp.items():  # what LSH added lies within the bit budget
        if d not in edit_dst:
            assert popcount_distance(tc[d], rc[s]) <= 24
    assert hyb.matched >= edit_m.matched


def test_match_empty_target(embedding_matrix, planes):
    ref = random_tokens(20, seed=30)
    rc = codes_of(ref, embedding_matrix, planes)
    empty_codes = torch.empty(0, rc.shape[1], dtype=torch.int64)
    for method in ("edit", "lsh", "hybrid"):
        m = matching.match_tokens(torch.tensor(ref), torch.tensor([], dtype=torch.long), method, rc, empty_codes)
        assert m.matched == 0 and m.target_tokens == 0 and m.unmatched_mask().numel() == 0


def test_breaks_are_where_the_reused_context_stops_following_the_target():
    # Position 0 maps to reference position 5 (whose K/V saw 5 tokens before it; here it has none), 3 unmatched,
    # then a jump in the reference positions at 6.
    m = matching.Match(dst=torch.tensor([0, 1, 2, 4, 5, 6, 7]), src=torch.tensor([5, 6, 7, 8, 9, 20, 21]),
                       exact=torch.ones(7, dtype=torch.bool), target_tokens=9)
    assert m.breaks().tolist() == [0, 4, 6]
    ids = torch.arange(50)
    assert matching.match_tokens(ids, ids, "edit").breaks().numel() == 0  # identical: the context follows throughout
    inserted = torch.cat([ids[:20], torch.tensor([99, 98]), ids[20:]])
    assert matching.match_tokens(ids, inserted, "edit").breaks().tolist() == [22]
    assert matching.match_tokens(ids, ids[7:], "edit").breaks().tolist() == [0]  # the reference's first 7 cut
    assert matching.match_tokens(ids, torch.cat([torch.tensor([99]), ids]), "edit").breaks().tolist() == [1]


@pytest.mark.parametrize("n", [1, 37])
def test_exact_prefix_match_is_the_edit_match_of_a_prompt_sharing_only_that_prefix(n):
    """exact_prefix_match(n, T) (what the engine serves when it reuses the exact common prefix alone): the first n
    target positions on the same reference positions, all exact, over a target of T tokens, the rest unmatched.
    Edit alignment of a prompt that shares exactly that prefix and nothing else must give the very same Match."""
    ref = random_tokens(80, seed=70)
    tgt = ref[:n] + new_tokens(50, seed=71)  # nothing after the prefix is in the reference
    m = matching.exact_prefix_match(n, len(tgt))
    edit = matching.match_tokens(torch.tensor(ref), torch.tensor(tgt), "edit")
    for name in ("dst", "src", "exact"):
        assert torch.equal(getattr(m, name), getattr(edit, name)), name
    assert m.target_tokens == edit.target_tokens == len(tgt)
    assert m.unmatched_mask().tolist() == [False] * n + [True] * 50
    assert m.breaks().numel() == 0  # the reused context follows the target's own throughout


# ---- lsh_pairs on hand-made codes ------------------------------------------------------------------------------


def codes(*values):
    return torch.tensor([[v] for v in values], dtype=torch.int64)


def lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, candidates, max_distance):
    """`matching.lsh_pairs` handed the candidates' own rows of a whole target's codes."""
    return matching.lsh_pairs(candidates, tgt_codes[candidates], tgt_ids, ref_codes, ref_ids, max_distance)


def test_exact_token_match_wins_over_nearer_code():
    # target 0 (id 30): nearest ref code is index 0 (distance 0, id 10); index 2 has its id at distance 3.
    ref_codes = codes(0b0000, 0b0001, 0b0111, 0b1111_0000)
    ref_ids = torch.tensor([10, 20, 30, 40])
    tgt_codes = codes(0b0000, 0b0011)
    tgt_ids = torch.tensor([30, 99])
    dst, src, exact = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, torch.tensor([0, 1]), 8)
    assert dst.tolist() == [0, 1]
    assert src.tolist() == [2, 1]  # target 1 has no same-id candidate: nearest code (0b0001 at 1, ties -> lower)
    assert exact.tolist() == [True, False]


def flip_bits(code: int, count: int, seed: int) -> int:
    """`code` with `count` of its low 62 bits flipped, chosen at random: a code at Hamming distance `count`."""
    for b in torch.randperm(62, generator=gen(seed))[:count].tolist():
        code ^= 1 << b
    return code


def random_code(seed: int) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen(seed)))


def test_exact_token_match_out_of_range_does_not_shadow_a_nearer_code():
    """A reference token with the target's id wins only within max_distance: out of range it must not displace the
    nearer code with another id (which is within range), else the target token goes unmatched."""
    base = random_code(100)
    ref_codes = codes(flip_bits(base, 5, 101), flip_bits(base, 1, 102))  # same id at distance 5, other id at 1
    ref_ids = torch.tensor([30, 10])
    tgt_codes, tgt_ids = codes(base), torch.tensor([30])
    dst, src, exact = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, torch.tensor([0]), 3)
    assert dst.tolist() == [0] and src.tolist() == [1] and exact.tolist() == [False]
    dst, src, exact = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, torch.tensor([0]), 5)  # in range (inclusive)
    assert dst.tolist() == [0] and src.tolist() == [0] and exact.tolist() == [True]


def test_nearest_of_several_same_id_candidates_wins():
    """Two reference tokens with the target's id within range: the nearer code is taken (its position is nearer
    the target's, the codes being position-rotated), not the farther one; a yet nearer code of another id loses."""
    base = random_code(103)
    ref_codes = codes(flip_bits(base, 6, 104), flip_bits(base, 2, 105), base)
    ref_ids = torch.tensor([30, 30, 10])
    dst, src, exact = lsh_pairs(codes(base), ref_codes, torch.tensor([30]), ref_ids, torch.tensor([0]), 8)
    assert dst.tolist() == [0] and src.tolist() == [1] and exact.tolist() == [True]


def test_same_id_is_sought_among_the_four_nearest_codes():
    """lsh_pairs looks for the target's id among its `neighbours` (4 by default) nearest reference codes: a same-id
    code 4th nearest is taken over the three nearer ones, one 5th nearest is not seen and the nearest code wins."""
    base = random_code(106)
    others = [flip_bits(base, d, 107 + d) for d in range(4)]  # distances 0, 1, 2, 3, ids 10..13
    ids = [10, 11, 12, 13]
    fourth = lsh_pairs(codes(base), codes(*others[:3], flip_bits(base, 4, 111)), torch.tensor([30]),
                       torch.tensor(ids[:3] + [30]), torch.tensor([0]), 8)
    assert fourth[1].tolist() == [3] and fourth[2].tolist() == [True]
    fifth = lsh_pairs(codes(base), codes(*others, flip_bits(base, 4, 111)), torch.tensor([30]),
                      torch.tensor(ids + [30]), torch.tensor([0]), 8)
    assert fifth[1].tolist() == [0] and fifth[2].tolist() == [False]


def test_max_distance_zero_only_identical_codes():
    ref_codes = codes(0b1010, 0b0110, 0b1111_1111)
    ref_ids = torch.tensor([1, 2, 3])
    tgt_codes = codes(0b1010, 0b0111, 0b1111_1111)  # identical, 1 bit off, identical
    tgt_ids = torch.tensor([1, 2, 7])
    cand = torch.tensor([0, 1, 2])
    dst, src, exact = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, cand, 0)
    assert dst.tolist() == [0, 2] and src.tolist() == [0, 2] and exact.tolist() == [True, False]
    dst, src, _ = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, cand, 1)
    assert dst.tolist() == [0, 1, 2] and src.tolist() == [0, 1, 2]


def test_max_distance_zero_on_real_codes(embedding_matrix, planes):
    ref, tgt = make_pair("replace")
    m, rc, tc = run_match("lsh", ref, tgt, embedding_matrix, planes, max_distance=0)
    assert m.matched > 0
    for d, s in zip(m.dst.tolist(), m.src.tolist()):
        assert torch.equal(tc[d], rc[s])
    loose, _, _ = run_match("lsh", ref, tgt, embedding_matrix, planes, max_distance=BITS)
    assert loose.matched == len(tgt)  # no budget: every target token takes its nearest reference token
    assert loose.matched > m.matched


def test_lsh_pairs_only_candidates_and_empty_inputs():
    ref_codes = codes(1, 2, 4, 8)
    ref_ids = torch.tensor([1, 2, 3, 4])
    tgt_codes = codes(1, 2, 4, 8)
    tgt_ids = torch.tensor([1, 2, 3, 4])
    dst, src, _ = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, torch.tensor([1, 3]), 0)
    assert dst.tolist() == [1, 3] and src.tolist() == [1, 3]
    dst, src, exact = lsh_pairs(tgt_codes, ref_codes, tgt_ids, ref_ids, torch.tensor([], dtype=torch.long), 0)
    assert dst.numel() == src.numel() == exact.numel() == 0
    dst, _, _ = lsh_pairs(tgt_codes, codes()[:0].reshape(0, 1), tgt_ids, ref_ids[:0], torch.tensor([0]), 64)
    assert dst.numel() == 0
    with pytest.raises(ValueError, match="candidate_codes"):
        matching.lsh_pairs(torch.tensor([1, 3]), tgt_codes, tgt_ids, ref_codes, ref_ids, 0)


# ---- baselines of the benchmarks: prefix blocks and verbatim chunks ---------------------------------------------


@pytest.mark.parametrize("common", [0, 15, 16, 47, 48, 100])
def test_prefix_pairs_whole_blocks_of_the_common_prefix(common):
    ref = random_tokens(120, seed=1)
    tgt = ref[:common] + [(t + 1) % VOCAB for t in ref[common:common + 5]] + ref[common + 5:]
    dst, src = matching.prefix_pairs(ref, tgt, block=16)
    n = common - common % 16
    assert dst == src == list(range(n))


def test_prefix_pairs_stop_at_the_shorter_prompt():
    ref = random_tokens(40, seed=2)
    assert matching.prefix_pairs(ref, ref[:35], block=16)[0] == list(range(32))
    assert matching.prefix_pairs(ref[:20], ref, block=16)[0] == list(range(16))


def test_chunk_pairs_find_moved_chunks_at_any_offset():
    ref = random_tokens(200, seed=3)
    # target: 3 tokens of junk, then reference[50:114] (4 chunks worth, shifted), then an unrelated tail
    junk = [VOCAB + 1, VOCAB + 2, VOCAB + 3]
    tgt = junk + ref[50:114] + random_tokens(30, seed=4, vocab=7)
    dst, src = matching.chunk_pairs(ref, tgt, chunk=16)
    # target chunks are aligned at 0, 16, 32, ...: [0,16) holds junk; [16,32) .. [48,64) lie inside ref[50:114]
    assert dst == list(range(16, 64))
    assert src == [d - 3 + 50 for d in dst]
    for d, s in zip(dst, src):
        assert tgt[d] == ref[s]


def test_chunk_pairs_nothing_in_common():
    assert matching.chunk_pairs(random_tokens(64, seed=5), [VOCAB + 9] * 64) == ([], [])


def test_chunk_pairs_reach_both_ends():
    """The last reference offset (len - chunk) is searched too, and the target's last chunk counts when the target
    ends exactly on a chunk boundary: off-by-ones at either end lose a whole chunk."""
    ref = random_tokens(100, seed=120)
    junk = new_tokens(16, seed=121)
    assert matching.chunk_pairs(ref, ref[84:] + junk, chunk=16) == (list(range(16)), list(range(84, 100)))
    assert matching.chunk_pairs(ref, junk + ref[30:46], chunk=16) == (list(range(16, 32)), list(range(30, 46)))


def test_chunk_pairs_take_the_first_occurrence_in_the_reference():
    """A chunk the reference holds twice is taken from its first occurrence (as documented)."""
    passage = random_tokens(16, seed=122)
    ref = new_tokens(10, 123) + passage + new_tokens(25, 124) + passage + new_tokens(5, 125)
    tgt = passage + new_tokens(16, 126)
    assert matching.chunk_pairs(ref, tgt, chunk=16) == (list(range(16)), list(range(10, 26)))


@pytest.mark.parametrize("method", ["prefix", "chunk"])
def test_match_tokens_baseline_methods_are_exact(method):
    ref = torch.tensor(random_tokens(160, seed=6))
    tgt = torch.cat([ref[:70], torch.tensor(random_tokens(9, seed=7)), ref[70:]])
    m = matching.match_tokens(ref, tgt, method)
    assert m.matched > 0 and bool(m.exact.all())
    assert torch.equal(tgt[m.dst], ref[m.src])
    if method == "prefix":
        assert m.dst.tolist() == list(range(64))


def test_match_tokens_baselines_use_16_token_blocks():
    """match_tokens' "prefix" and "chunk" use the defaults of prefix_pairs and chunk_pairs: 16-token blocks (vLLM's
    block, CacheBlend's chunk). A common prefix of 56 gives 3 blocks (48 tokens); the 9 tokens inserted at 56 spoil
    the target chunks [48, 64) and [64, 80); the target's partial last chunk [160, 169) is not reused."""
    ref = torch.tensor(random_tokens(160, seed=127))
    tgt = torch.cat([ref[:56], torch.tensor(new_tokens(9, seed=128)), ref[56:]])
    m = matching.match_tokens(ref, tgt, "prefix")
    assert m.dst.tolist() == m.src.tolist() == list(range(48))
    m = matching.match_tokens(ref, tgt, "chunk")
    assert m.dst.tolist() == list(range(48)) + list(range(80, 160))
    assert m.src.tolist() == list(range(48)) + list(range(71, 151))


def test_match_refuses_an_unknown_method_or_missing_codes():
    """An unknown method matched nothing without a word (a typo served as full prefill), and "lsh" without codes
    failed with a bare TypeError: both are ValueErrors naming the argument."""
    ids = torch.tensor([5, 6, 7, 8, 9])
    with pytest.raises(ValueError, match=r"method: expected one of .* got 'Edit'"):
        matching.match_tokens(ids, ids, "Edit")
    with pytest.raises(ValueError, match="reference_codes"):
        matching.match_tokens(ids, torch.tensor([1, 2, 3]), "lsh")
    with pytest.raises(ValueError, match="target_codes"):
        matching.match_tokens(ids, torch.tensor([1, 2, 3]), "hybrid",
                              reference_codes=torch.zeros(5, 1, dtype=torch.long))
