"""Mining the built-in evaluation set (``semshare_ops/eval/data/eval_set.json``) from ShareGPT: near-duplicate first
turns found by MiniLM similarity and checked word by word, and controlled edits of long real answers. Used by
``tools/make_eval_set.py`` only; ``semshare_ops.eval.pairs`` reads the recipes back."""
from __future__ import annotations

import difflib
import random
import re
from typing import Iterable

import torch

from semshare_ops.eval.pairs import (_ABBREVIATION_END, _NAME_RE, _NEGATABLE_RE, _NEGATION_RE, _NUMBER_RE, EDIT_KINDS,
                                     FIRST_NAMES, REGIONS, apply_splices, check_edit)
from semshare_ops.eval.sharegpt import base_id, first_human_turn, text_sha1
from semshare_ops.store.embedder import SentenceEmbedder


def token_count(text: str, tokenizer=None) -> int:
    """Tokens of ``text`` by ``tokenizer`` (no special tokens added), or the ~4 characters/token proxy."""
    if tokenizer is None:
        return len(text) // 4
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def word_ratio(a: str, b: str) -> float:
    """difflib similarity of the two word sequences (autojunk off: it would drop frequent words)."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def mine_near_duplicates(conversations: Iterable[dict], embedder: SentenceEmbedder, tokenizer=None, n: int = 20,
                         min_tokens: int = 300, max_tokens: int = 1500, min_cosine: float = 0.9,
                         min_word_ratio: float = 0.7, seed: int = 0, log=None) -> list[dict]:
    """Pick ``n`` near-duplicate pairs of first human turns; return their recipes.

    A pair qualifies when the cosine of the MiniLM embeddings is at least ``min_cosine`` (MiniLM sees only the
    first 256 tokens) and the word-level difflib ratio over the whole texts is at least ``min_word_ratio``
    (below ~0.7 the pairs are mostly logs whose every line differs by a timestamp). Texts identical up to
    whitespace count as one. Qualifying pairs link texts into clusters; each cluster gives one of its pairs,
    clusters are drawn in a seeded order, and no chat (``base_id``) appears in two chosen pairs, so a long
    chat that re-sends the same prompt many times does not fill the set.
    """
    log = log or (lambda *a: None)
    texts, refs, seen = [], [], set()
    for conv in conversations:
        turn = first_human_turn(conv)
        if turn is None:
            continue
        text = conv["conversations"][turn]["value"]
        # The character window is a cheap pre-filter, wide enough for 2.5 to 5.5 characters a token.
        if not (min_tokens * 2.5 <= len(text) <= max_tokens * 5.5):
            continue
        key = " ".join(text.split())
        if key in seen or not (min_tokens <= token_count(text, tokenizer) <= max_tokens):
            continue
        seen.add(key)
        texts.append(text)
        refs.append({"id": conv["id"], "turn": turn, "sha1": text_sha1(text)})
    log(f"near-duplicates: {len(texts)} distinct first human turns of {min_tokens}-{max_tokens} tokens; embedding")
    emb = embedder.embed(texts)
    sim = emb @ emb.T
    ii, jj = torch.triu_indices(len(texts), len(texts), 1)
    close = (sim[ii, jj] >= min_cosine).nonzero().flatten().tolist()
    pairs = []  # (i, j, cosine, word ratio), i < j: i comes first in the file
    for k in close:
        i, j = ii[k].item(), jj[k].item()
        ratio = word_ratio(texts[i], texts[j])
        if ratio >= min_word_ratio:
            pairs.append((i, j, sim[i, j].item(), ratio))
    log(f"near-duplicates: {len(close)} pairs at cosine >= {min_cosine}, {len(pairs)} of them at word ratio >= "
        f"{min_word_ratio}")

    parent = list(range(len(texts)))  # union-find over the qualifying pairs

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _, _ in pairs:
        parent[root(j)] = root(i)
    members: dict[int, list[tuple]] = {}
    for p in pairs:
        members.setdefault(root(p[0]), []).append(p)
    # One pair per cluster, drawn at random: taking the closest pair would make the set easier than the pairs
    # that qualify are (mostly one word apart).
    rng = random.Random(seed)
    clusters = [rng.choice(members[r]) for r in sorted(members)]
    rng.shuffle(clusters)
    log(f"near-duplicates: {len(clusters)} clusters")

    chosen, used = [], set()
    for i, j, cos, ratio in clusters:
        chats = {base_id(refs[i]["id"]), base_id(refs[j]["id"])}
        if chats & used:
            continue
        used |= chats
        chosen.append({"id": f"nd-{len(chosen):02d}", "reference": refs[i], "target": refs[j],
                       "cosine": round(cos, 4), "word_ratio": round(ratio, 4)})
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise RuntimeError(f"only {len(chosen)} near-duplicate pairs qualify; {n} wanted")
    return chosen


def prose_sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the sentences in ``text``'s prose paragraphs: lines starting with a capital letter
    (not list items, headings or code), split after . ! ? before a capital; only sentences of 40-300
    characters and 6+ words ending in . or ! that occur once in the text, so an edit names them unambiguously.
    """
    spans = []
    line_start = 0
    for line in text.split("\n"):
        if line[:1].isupper():
            piece_start = 0
            for m in re.finditer(r"(?<=[.!?])\s+(?=[A-Z\"'])|$", line):
                s, e = line_start + piece_start, line_start + m.start()
                sentence = text[s:e]
                piece_start = m.end()
                if (40 <= len(sentence) <= 300 and len(sentence.split()) >= 6 and sentence[0].isupper()
                        and sentence[-1] in ".!" and not _ABBREVIATION_END.search(sentence)
                        and text.count(sentence) == 1):
                    spans.append((s, e))
                if m.end() == len(line):
                    break
        line_start += len(line) + 1
    return spans


def region_of(position: float) -> str:
    return REGIONS[min(int(position * 3), 2)]


def _sentence_removal(text: str, s: int, e: int) -> tuple[int, int]:
    """Span to delete so that removing sentence [s, e) leaves the layout intact: the spaces after it when the
    line goes on, else the spaces before it when the line has text before it, else the whole paragraph."""
    line_start = text.rfind("\n", 0, s) + 1
    line_end = text.find("\n", e)
    line_end = len(text) if line_end < 0 else line_end
    if text[e:line_end].strip():
        return s, e + len(text[e:line_end]) - len(text[e:line_end].lstrip())
    if text[line_start:s].strip():
        return s - (len(text[line_start:s]) - len(text[line_start:s].rstrip())), e
    after = len(text[e:]) - len(text[e:].lstrip())
    if e + after < len(text):
        return s, e + after
    return s - (len(text[:s]) - len(text[:s].rstrip())), e


def _new_number(old: str, rng: random.Random) -> str:
    """A different number of the same shape: years move by a few years, other numbers by up to about half."""
    if "." in old:
        whole, frac = old.split(".")
        new = old
        while new == old:
            new = f"{max(0, int(whole) + rng.choice([-1, 1]) * rng.randint(0, max(1, int(whole) // 2)))}." \
                  f"{rng.randint(0, 10 ** len(frac) - 1):0{len(frac)}d}"
        return new
    n = int(old)
    if 1900 <= n <= 2100:
        candidates = [y for y in range(n - 9, n + 10) if y != n and y <= 2100]
    elif n < 10:
        candidates = [k for k in range(1, 10) if k != n]
    else:
        candidates = [k for k in range(max(1, n // 2), n + n // 2 + 1) if k != n]
    return str(rng.choice(candidates))


def make_edit(kind: str, text: str, rng: random.Random, region: str, donors: list[tuple[dict, str]]):
    """Splices for one ``kind`` edit of ``text`` placed in ``region``, or ``None`` when the text offers none.

    ``donors`` are ``(ref, sentence)`` pairs from other texts, the material of insertions and replacements,
    with ``ref = {"id", "turn", "sha1", "start", "end"}``; such a splice carries ``"from": ref`` and ``"sep"``
    (what follows the sentence) beside ``new``.
    """
    def in_region(at: int) -> bool:
        return region_of(at / len(text)) == region

    if kind == "name_swap":  # a first name whose first mention is in the region, replaced everywhere
        firsts = {}
        for m in _NAME_RE.finditer(text):
            firsts.setdefault(m.group(), m.start())
        names = sorted(name for name, at in firsts.items() if in_region(at))
        if not names:
            return None
        old = rng.choice(names)
        new = rng.choice([n for n in FIRST_NAMES if not re.search(rf"\b{n}\b", text)])
        return [{"at": m.start(), "old": old, "new": new} for m in re.finditer(rf"\b{old}\b", text)]
    # The edit's place (its first splice) must lie in the region; the sentences may start before it.
    sentences = prose_sentences(text)
    if kind == "number_change":  # the numbers of one prose sentence, up to three: like a corrected figure
        options = [nums[:3] for s, e in sentences
                   if (nums := list(_NUMBER_RE.finditer(text, s, e))) and in_region(nums[0].start())]
        if not options:
            return None
        return [{"at": n.start(), "old": n.group(), "new": _new_number(n.group(), rng)} for n in rng.choice(options)]
    if kind == "negation":  # one auxiliary of a statement without a negation: "is" -> "is not", "can" -> "cannot"
        options = [(s + m.start(), m.group()) for s, e in sentences if not _NEGATION_RE.search(text[s:e])
                   for m in _NEGATABLE_RE.finditer(text[s:e]) if in_region(s + m.start())]
        if not options:
            return None
        at, verb = rng.choice(options)
        return [{"at": at, "old": verb, "new": "cannot" if verb == "can" else f"{verb} not"}]
    if kind == "sentence_delete":
        spans = [span for s, e in sentences if in_region((span := _sentence_removal(text, s, e))[0])]
        if not spans:
            return None
        a, b = rng.choice(spans)
        return [{"at": a, "old": text[a:b], "new": ""}]
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}")
    sentences = [(s, e) for s, e in sentences if in_region(s)]
    donors = [d for d in donors if d[1] not in text]
    if not sentences or not donors:
        return None
    s, e = rng.choice(sentences)
    ref, sentence = rng.choice(donors)
    if kind == "sentence_insert":  # before the chosen sentence, as a sentence of its own
        return [{"at": s, "old": "", "new": sentence + " ", "from": ref, "sep": " "}]
    return [{"at": s, "old": text[s:e], "new": sentence, "from": ref, "sep": ""}]


def _prose_enough(text: str) -> bool:
    """English prose: nearly all ASCII, and at least 8 prose sentences covering half the text."""
    if sum(c.isascii() for c in text) < 0.98 * len(text):
        return False
    spans = prose_sentences(text)
    return len(spans) >= 8 and sum(e - s for s, e in spans) >= 0.5 * len(text)


def build_controlled_edits(conversations: Iterable[dict], tokenizer=None, per_kind: int = 4,
                           min_tokens: int = 400, max_tokens: int = 800, seed: int = 0, log=None) -> list[dict]:
    """``per_kind`` edits of each of ``EDIT_KINDS`` on long real gpt answers; return their recipes.

    Sources are gpt turns of ``min_tokens``-``max_tokens`` tokens of English prose, each from a different chat.
    Each kind gets the regions start, middle, end in turn (the rest of ``per_kind`` drawn at random), in a
    shuffled order; for each edit the sources are tried in a seeded order until one offers that kind of edit
    in that region. Inserted and replacing sentences are prose sentences of other sources.
    """
    log = log or (lambda *a: None)
    rng = random.Random(seed)
    sources = []  # (ref, text)
    for conv in conversations:
        for turn, t in enumerate(conv["conversations"]):
            text = t.get("value")
            if (t.get("from") == "gpt" and isinstance(text, str)
                    and min_tokens * 2.5 <= len(text) <= max_tokens * 5.5 and _prose_enough(text)):
                sources.append(({"id": conv["id"], "turn": turn, "sha1": text_sha1(text)}, text))
    rng.shuffle(sources)
    log(f"controlled edits: {len(sources)} gpt answers of English prose in the character window")

    donors = []  # sentences for insertions and replacements, drawn from the sources' tail (not used as targets)
    for ref, text in sources[-200:]:
        for s, e in prose_sentences(text):
            donors.append(({**ref, "start": s, "end": e}, text[s:e]))
    candidates = sources[:-200]

    plan = []
    for kind in EDIT_KINDS:
        regions = list(REGIONS) * (per_kind // 3) + [rng.choice(REGIONS) for _ in range(per_kind % 3)]
        rng.shuffle(regions)
        plan += [(kind, region) for region in regions]
    recipes, used_chats = [], set()
    for kind, region in plan:
        for ref, text in candidates:
            chat = base_id(ref["id"])
            if chat in used_chats or not (min_tokens <= token_count(text, tokenizer) <= max_tokens):
                continue
            splices = make_edit(kind, text, rng, region, donors)
            if splices is None:
                continue
            check_edit(kind, text, apply_splices(text, splices), splices)
            used_chats.add(chat)
            # A donated sentence is stored as where it comes from, not as text.
            splices = [{k: v for k, v in sp.items() if not (k == "new" and "from" in sp)} for sp in splices]
            recipes.append({"id": f"ce-{len(recipes):02d}", "kind": kind, "where": region,
                            "position": round(min(sp["at"] for sp in splices) / len(text), 3),
                            "source": ref, "splices": splices})
            break
        else:
            raise RuntimeError(f"no source offers a {kind} edit in the {region} region")
    return recipes
