"""Incremental detokenization with stop strings, one ``Detokenizer`` per request.

Each new token is decoded together with a short window of the tokens before it (so merges and
leading-space rules apply as in a full decode), and only the text beyond the window's is new.
The engine decodes the windows of a whole batch in one ``decode_batch`` call (``push`` then
``accept``), which costs far less per sequence than one call each.
Text that ends in an incomplete UTF-8 sequence waits for the next token, but never for more
than ``MAX_PENDING`` tokens: a model may emit bytes that never form a character, and waiting
forever would make every step decode an ever longer window. When stop strings are set, the last
``max(len(stop)) - 1`` characters are held back until it is known that they do not begin a stop
string, so a streamed client never sees text that a stop string later removes.
"""

from __future__ import annotations

from berth.runtime.engine.tokenizer import Tokenizer

MAX_PENDING = 4  # tokens; a UTF-8 character has at most 4 bytes
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Turns one request's output tokens into text, and finds its stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decode = tokenizer.hf.decode
        self.vocab_size = tokenizer.vocab_size
        self.concatenative = tokenizer.byte_level
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is the context window
        self.read_offset = 0
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text so far, stop string removed
        self.emitted = 0  # characters of ``text`` already returned

    def push(self, token_id: int) -> list[int] | None:
        """Append a token; return the ids whose decode ``accept`` needs (None: no new text)."""
        if not 0 <= token_id < self.vocab_size:
            return None
        self.ids.append(token_id)
        return self.ids[self.prefix_offset :]

    def accept(self, full: str) -> bool:
        """Take ``full`` (the decode of ``push``'s ids); True when a stop string appeared (the
        text is cut before it)."""
        ids = self.ids
        waiting = len(full) <= len(self.prefix_text) or full.endswith(REPLACEMENT)
        if waiting and len(ids) - self.read_offset < MAX_PENDING:
            return False
        piece = full[len(self.prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        if self.concatenative and not waiting:
            self.prefix_text = piece  # byte-level decoding: the window decodes to the new piece
        else:
            self.prefix_text = self.decode(ids[self.prefix_offset :], skip_special_tokens=True)
        if not piece:
            return False
        start = len(self.text)
        self.text += piece
        if self.stop:
            window = max(0, start - self.hold)
            cut = -1
            for s in self.stop:
                i = self.text.find(s, window)
                if i >= 0 and (cut < 0 or i < cut):
                    cut = i
            if cut >= 0:
                self.text = self.text[:cut]
                return True
        return False

    def add(self, token_id: int) -> bool:
        """``push`` and ``accept`` one token on its own (the engine batches the decodes)."""
        window = self.push(token_id)
        return window is not None and self.accept(self.decode(window, skip_special_tokens=True))

    def take(self, finished: bool) -> str:
        """The text not yet returned (all of it once finished, else minus the held-back tail)."""
        if self.emitted == len(self.text):
            return ""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
