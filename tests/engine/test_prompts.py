"""Prompt helpers (semshare_ops.engine.prompts): a text as one user turn of the chat template, tokenized by the
engine to the ids the template itself gives."""
import pytest

pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from semshare_ops.engine.prompts import as_chat  # noqa: E402

VOCAB = {"<unk>": 0, "<bos>": 1, "<eot>": 2, "<head>": 3, "</head>": 4, "user": 5, "assistant": 6, "hello": 7,
         "world": 8}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<head>{{ m['role'] }}</head> {{ m['content'] }}<eot>{% endfor %}"
            "{% if add_generation_prompt %}<head>assistant</head> {% endif %}")


def _tokenizer(adds_bos: bool):
    """A Llama-3-like tokenizer: a template that writes the BOS, and a tokenizer that adds one itself (or not)."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
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
