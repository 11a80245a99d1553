"""Prompt helpers (semshare_ops.engine.prompts): a text as one user turn of the chat template, tokenized by the
engine to the ids the template itself gives."""
import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from semshare_ops.engine.prompts import DEMO_REFERENCE, DEMO_TARGET, adds_bos, as_chat  # noqa: E402

VOCAB = {"<unk>": 0, "<bos>": 1, "<eot>": 2, "<head>": 3, "</head>": 4, "user": 5, "assistant": 6, "hello": 7,
         "world": 8}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<head>{{ m['role'] }}</head> {{ m['content'] }}<eot>{% endfor %}"
            "{% if add_generation_prompt %}<head>assistant</head> {% endif %}")


def _tokenizer(adds_bos: bool, adds_eos: bool = False):
    """A Llama-3-like tokenizer: a template that writes the BOS, and a tokenizer that adds one itself (or not), and
    an EOS after the text (or not)."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        single = "<bos> $A <eot>" if adds_eos else "<bos> $A"
        special = [("<bos>", 1), ("<eot>", 2)] if adds_eos else [("<bos>", 1)]
        tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eot>", unk_token="<unk>",
                                  additional_special_tokens=["<head>", "</head>"])
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("adds_bos", [True, False])
def test_chat_prompt_tokenizes_to_the_templates_own_ids(adds_bos):
    tok = _tokenizer(adds_bos)
    ids = tok(as_chat(tok, "hello world"))["input_ids"]  # what ReuseEngine.tokenize does with a str
    expected = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True,
                                       tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert ids == expected and ids.count(1) == 1, (ids, expected)


def test_text_without_a_template_is_left_as_it_is():
    tok = _tokenizer(True)
    tok.chat_template = None
    assert as_chat(tok, "hello world") == "hello world"


def test_a_tokenizer_that_also_appends_an_eos_still_adds_bos():
    """Only the first id of an empty text says whether the tokenizer adds a BOS: one that also appends an EOS
    ([bos, eos]) adds it too, and the template's rendered BOS is dropped."""
    tok = _tokenizer(True, adds_eos=True)
    assert tok("")["input_ids"] == [1, 2]
    assert adds_bos(tok)
    assert not as_chat(tok, "hello world").startswith("<bos>")


def test_demo_target_carries_every_edit():
    """DEMO_TARGET is DEMO_REFERENCE with a name and two numbers changed, one sentence inserted and one deleted: each
    `replace` must have found its text (one that finds nothing leaves the reference's words in place)."""
    for old, new in (("Anna Petrova", "Maria Lindqvist"), ("Petrova hopes", "Lindqvist hopes"),
                     ("2.4 million", "3.1 million"), ("forty seats", "sixty seats")):
        assert old in DEMO_REFERENCE and new not in DEMO_REFERENCE, old
        assert old not in DEMO_TARGET and new in DEMO_TARGET, old
    inserted = " A lift now connects all three floors, so the building is finally accessible to wheelchair users."
    deleted = " On Sundays and Mondays it stays closed."
    assert inserted not in DEMO_REFERENCE and DEMO_TARGET.count(inserted) == 1
    assert deleted in DEMO_REFERENCE and deleted not in DEMO_TARGET
    renamed = len("Maria Lindqvist") - len("Anna Petrova") + len("Lindqvist") - len("Petrova")  # the numbers: as long
    assert len(DEMO_TARGET) == len(DEMO_REFERENCE) + renamed + len(inserted) - len(deleted)  # nothing else changed
