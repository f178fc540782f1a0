"""Incremental detokenization with stop strings, one ``Detokenizer`` per request.

The engine pushes every sampled token of every running request through here each step, so the
common case costs a few Python operations and no tokenizer call. For byte-level tokenizers
(Llama 3, Qwen) decoding is concatenation of each token's bytes, so a token's text is its bytes
(a table built once per tokenizer) fed to an incremental UTF-8 decoder: a character split across
tokens waits in the decoder, and bytes that never form a character come out as U+FFFD at once,
exactly as the full decode (``errors="replace"``) writes them. Other tokenizers (SentencePiece
with byte fallback, WordPiece) decode each new token together with a short window of the tokens
before it, so that merges and leading-space rules apply as in a full decode.

When stop strings are set, the last ``max(len(stop)) - 1`` characters are held back until it is
known that they do not begin a stop string, so a streamed client never sees text that a stop
string later removes. Without stop strings nothing is held back and no search runs.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable

from berth.runtime.engine.tokenizer import Tokenizer

MAX_PENDING = 4  # tokens a windowed decode waits for a character to complete
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turns one request's output tokens into text, and finds its stop strings."""

    __slots__ = ("_next_piece", "_rest", "hold", "keep_stop", "push", "stop", "stopped",
                 "unchecked", "unsent")  # fmt: skip

    def __init__(
        self, tokenizer: Tokenizer, stop: list[str], min_tokens: int = 0, keep_stop: bool = False
    ) -> None:
        self.stop = stop
        # vLLM's include_stop_str_in_output: the text ends after the stop string, not before
        self.keep_stop = keep_stop
        # min_tokens: the first tokens' text is not searched for stop strings (vLLM's rule).
        self.unchecked = min_tokens
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.unsent = ""  # text not yet returned: a possible stop-string prefix
        self.stopped = False  # a stop string appeared; the text ends before it
        table, texts = tokenizer.token_bytes, tokenizer.token_texts
        if table is not None and texts is not None:
            stream = _Utf8Stream(table, texts)
            self._next_piece, self._rest = stream.next_piece, stream.rest
        else:
            window = _Window(tokenizer)
            self._next_piece, self._rest = window.next_piece, window.rest
        # push(token_id) -> str: append a token, return the text now safe to send (and set
        # ``stopped`` on a stop string). Without stop strings that is the token's piece itself,
        # so the engine's per-token call goes straight to it.
        self.push: Callable[[int], str] = self._push_and_cut if stop else self._next_piece

    def _push_and_cut(self, token_id: int) -> str:
        if self.unchecked:
            self.unchecked -= 1
            return self._hold_back(self.unsent + self._next_piece(token_id))
        return self._cut(self._next_piece(token_id))

    def flush(self) -> str:
        """The rest of the text once the request ends: the held-back tail and any incomplete
        character (as U+FFFD, like a full decode)."""
        if self.stopped:
            return ""
        text = self._cut(self._rest()) if self.stop else self._rest()
        text += self.unsent
        self.unsent = ""
        return text

    def _cut(self, piece: str) -> str:
        """Search the new text (and the held tail before it) for stop strings."""
        if not piece or self.stopped:
            return ""
        start = len(self.unsent)
        text = self.unsent + piece
        window = max(0, start - self.hold)
        cut, end = -1, -1
        for s in self.stop:
            i = text.find(s, window)
            if i >= 0 and (cut < 0 or i < cut):
                cut, end = i, i + len(s)
        if cut >= 0:
            self.stopped = True
            self.unsent = ""
            return text[: end if self.keep_stop else cut]
        return self._hold_back(text)

    def _hold_back(self, text: str) -> str:
        """Send all but the last ``hold`` characters, which may begin a stop string."""
        send = max(0, len(text) - self.hold)
        self.unsent = text[send:]
        return text[:send]


class _Utf8Stream:
    """A token's text from its bytes through an incremental UTF-8 decoder. While no character
    is split across tokens (the usual case) that is the token's own text, looked up; ids beyond
    the tokenizer's vocabulary (a model's padded rows) add nothing."""

    __slots__ = ("buffer", "size", "table", "texts")

    def __init__(self, table: list[bytes], texts: list[str | None]) -> None:
        self.table = table
        self.texts = texts
        self.size = len(table)
        self.buffer = b""  # the start of a character split across tokens (at most 3 bytes)

    def next_piece(self, token_id: int) -> str:
        if token_id >= self.size:
            return ""
        if not self.buffer:
            text = self.texts[token_id]
            if text is not None:
                return text
        data = self.buffer + self.table[token_id]
        text, used = codecs.utf_8_decode(data, "replace", False)
        self.buffer = data[used:]
        return text

    def rest(self) -> str:
        text, _ = codecs.utf_8_decode(self.buffer, "replace", True)
        self.buffer = b""
        return text


class _Window:
    """Decodes each new token with the tokens before it; only the text beyond the window's own
    is new. Text that ends in an incomplete character waits for the next token, but never for
    more than ``MAX_PENDING`` tokens (bytes that never form a character must not make every
    step decode an ever longer window)."""

    __slots__ = ("decode", "ids", "prefix_offset", "prefix_text", "read_offset", "vocab_size")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.decode = tokenizer.hf.decode
        self.vocab_size = tokenizer.vocab_size
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the context window
        self.read_offset = 0
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset])

    def next_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return ""
        ids = self.ids
        ids.append(token_id)
        full = self.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        waiting = len(full) <= len(self.prefix_text) or full.endswith(REPLACEMENT)
        if waiting and len(ids) - self.read_offset < MAX_PENDING:
            return ""
        return self._advance(full)

    def rest(self) -> str:
        if self.read_offset == len(self.ids):
            return ""
        return self._advance(self.decode(self.ids[self.prefix_offset :], skip_special_tokens=True))

    def _advance(self, full: str) -> str:
        piece = full[len(self.prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.prefix_text = self.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        return piece
