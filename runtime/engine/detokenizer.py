"""Incremental detokenization with stop strings, one ``Detokenizer`` per request.

Text is produced token by token through the tokenizers library's ``DecodeStream`` (it holds back
incomplete UTF-8 sequences). When stop strings are set, the last ``max(len(stop)) - 1``
characters are held back until it is known that they do not begin a stop string, so a streamed
client never sees text that a stop string later removes.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from berth.runtime.engine.tokenizer import Tokenizer


class Detokenizer:
    """Turns one request's output tokens into text, and finds its stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.hf = tokenizer.hf
        self.vocab_size = tokenizer.vocab_size
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all text so far, stop string removed
        self.emitted = 0  # characters of ``text`` already returned

    def add(self, token_id: int) -> bool:
        """Append one token's text; True when a stop string appeared (text cut before it)."""
        if not 0 <= token_id < self.vocab_size:
            return False
        piece = self.stream.step(self.hf, token_id)
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

    def take(self, finished: bool) -> str:
        """The text not yet returned (all of it once finished, else minus the held-back tail)."""
        if self.emitted == len(self.text):
            return ""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
