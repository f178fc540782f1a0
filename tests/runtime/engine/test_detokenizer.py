"""Incremental detokenization: multi-byte characters, held-back stop-string prefixes."""

from __future__ import annotations

from pathlib import Path

from berth.runtime.engine.detokenizer import Detokenizer
from berth.runtime.engine.tokenizer import Tokenizer


def _feed(tok: Tokenizer, text: str, stop: list[str]) -> tuple[list[str], bool]:
    d = Detokenizer(tok, stop)
    pieces, stopped = [], False
    for t in tok.encode(text, add_special_tokens=False):
        stopped = d.add(t)
        pieces.append(d.take(stopped))
        if stopped:
            break
    if not stopped:
        pieces.append(d.take(True))
    return pieces, stopped


def test_incremental_text_equals_the_full_decode_with_multibyte_characters(
    tiny_model: Path,
) -> None:
    tok = Tokenizer(tiny_model)
    text = "Café 東京の港 🚢 naïve"
    pieces, stopped = _feed(tok, text, [])
    assert "".join(pieces) == text and not stopped
    assert all("\ufffd" not in p for p in pieces)  # split UTF-8 is held, never garbled


def test_stop_string_cuts_the_text_and_a_possible_prefix_is_held_back(tiny_model: Path) -> None:
    tok = Tokenizer(tiny_model)
    pieces, stopped = _feed(tok, "The quick brown fox jumps over", ["fox j"])
    assert stopped and "".join(pieces) == "The quick brown "
    assert all("fox" not in p for p in pieces)


def test_ids_beyond_the_tokenizer_vocabulary_decode_to_nothing(tiny_model: Path) -> None:
    tok = Tokenizer(tiny_model)
    d = Detokenizer(tok, [])
    assert d.add(tok.vocab_size + 5) is False and d.take(True) == ""


def test_bytes_that_never_form_characters_do_not_grow_the_window(tiny_model: Path) -> None:
    """Random byte tokens: the decode window stays short and every byte shows up as text."""
    tok = Tokenizer(tiny_model)
    byte_tokens = [t for t in range(tok.vocab_size) if "\ufffd" in tok.decode([t])]
    assert byte_tokens, "the test tokenizer has lone UTF-8 continuation bytes"
    d = Detokenizer(tok, [])
    for i in range(300):
        d.add(byte_tokens[i % len(byte_tokens)])
        assert len(d.ids) - d.prefix_offset <= 2 * 4
    assert len(d.take(True)) > 0
