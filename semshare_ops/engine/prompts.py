"""Prompt helpers: the built-in demo pair, and a text as one user turn of a model's chat template."""
from __future__ import annotations

DEMO_REFERENCE = """\
The Harbour Street library reopened on Monday after eight months of repairs. The old building had a leaking roof, \
cracked windows and a heating system that failed every winter, so the council voted last spring to close it and \
fix everything at once. Anna Petrova, who has run the library for eleven years, said the work cost 2.4 million \
euros, most of it paid by a regional grant. The new reading room on the first floor has forty seats, large tables \
and a wall of windows that look out over the harbour. Children now have their own room downstairs with picture \
books, a small stage for story time and a corner with computers for homework. The library also added a repair \
café: every second Saturday, volunteers help people fix lamps, toasters, bicycles and clothes instead of throwing \
them away. Opening hours are longer than before. From Tuesday to Friday the doors open at nine in the morning and \
close at eight in the evening, and on Saturdays the library is open from ten until four. On Sundays and Mondays it \
stays closed. Membership remains free for everyone who lives in the district, and visitors from elsewhere can join \
for twelve euros a year. Petrova hopes that the longer hours will bring back students, who often had nowhere quiet \
to work in the evening. The first week will include a book sale, a talk by a local historian about the old fishing \
fleet, and a concert by the school choir on Saturday afternoon.

Summarise the main changes at the library in three short sentences."""

# The same text with a name and two numbers changed, one sentence inserted and one deleted.
DEMO_TARGET = DEMO_REFERENCE.replace("Anna Petrova", "Maria Lindqvist").replace("Petrova hopes", "Lindqvist hopes") \
    .replace("2.4 million", "3.1 million").replace("forty seats", "sixty seats") \
    .replace(" The library also added a repair café:",
             " A lift now connects all three floors, so the building is finally accessible to wheelchair users."
             " The library also added a repair café:") \
    .replace(" On Sundays and Mondays it stays closed.", "")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS in front of every text it tokenizes with special tokens."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return bos_id is not None and tokenizer("")["input_ids"][:1] == [bos_id]


def as_chat(tokenizer, text: str) -> str:
    """The text as one user turn in the model's chat template (as a string: prompts are tokenized as given).

    The engine tokenizes a str with the tokenizer's special tokens, as a plain prompt needs; a template that writes
    the BOS itself (Llama 3, Gemma, Mistral) would then give two. The rendered BOS is dropped when the tokenizer adds
    one, so the ids are the template's own (`apply_chat_template(..., tokenize=True)`)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and chat.startswith(bos) and adds_bos(tokenizer):
        chat = chat[len(bos):]
    return chat
