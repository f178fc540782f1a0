"""Incremental detokenization: multi-byte characters, held-back stop-string prefixes, and the
byte-table path agreeing with the tokenizer's own full decode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine.detokenizer import MAX_PENDING, Detokenizer
from berth.runtime.engine.testmodels import pad_vocab, train_tokenizer
from berth.runtime.engine.tokenizer import Tokenizer


@pytest.fixture(params=["byte-table", "window"])
def tok(request: pytest.FixtureRequest, tiny_model: Path) -> Tokenizer:
    """The tiny model's tokenizer, detokenized through the byte table or through decode windows
    (the path of tokenizers whose decoder is not byte-level)."""
    tokenizer = Tokenizer(tiny_model)
    if request.param == "window":
        tokenizer.byte_level = False  # before token_bytes is first built
        assert tokenizer.token_bytes is None
    else:
        assert tokenizer.token_bytes is not None
    return tokenizer


def _feed(
    tok: Tokenizer, ids: list[int], stop: list[str], **options: Any
) -> tuple[list[str], bool]:
    d = Detokenizer(tok, stop, **options)
    pieces = []
    for t in ids:
        pieces.append(d.push(t))
        if d.stopped:
            return pieces, True
    pieces.append(d.flush())
    return pieces, False


def test_incremental_text_equals_the_full_decode_with_multibyte_characters(
    tok: Tokenizer,
) -> None:
    text = "Café 東京の港 🚢 naïve"
    pieces, stopped = _feed(tok, tok.encode(text, add_special_tokens=False), [])
    assert "".join(pieces) == text and not stopped
    assert all("\ufffd" not in p for p in pieces)  # split UTF-8 is held, never garbled
    assert sum(1 for p in pieces if p) > 3  # and the text streams, not all at the end


def test_stop_string_cuts_the_text_and_a_possible_prefix_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox jumps over", add_special_tokens=False)
    pieces, stopped = _feed(tok, ids, ["fox j"])
    assert stopped and "".join(pieces) == "The quick brown "
    assert all("fox" not in p for p in pieces)


def test_the_stop_string_is_kept_when_asked_and_the_earliest_one_ends_the_text(
    tok: Tokenizer,
) -> None:
    """vLLM's include_stop_str_in_output: the text ends after the stop string that matched
    first in the text (not the first listed), and nothing past it is sent."""
    ids = tok.encode("The quick brown fox jumps over the dog", add_special_tokens=False)
    pieces, stopped = _feed(tok, ids, ["over", "brown f"], keep_stop=True)
    assert stopped and "".join(pieces) == "The quick brown f"


def test_stop_strings_count_only_after_min_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("fox one fox two", add_special_tokens=False)
    early = len(tok.encode("fox", add_special_tokens=False))
    pieces, stopped = _feed(tok, ids, ["fox"], min_tokens=early)
    assert stopped and "".join(pieces) == "fox one "


def test_held_back_text_is_sent_when_no_stop_string_follows(tok: Tokenizer) -> None:
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    pieces, stopped = _feed(tok, ids, ["fox j"])
    assert not stopped and "".join(pieces) == "The quick brown fox"
    assert pieces[-1].endswith("fox")  # the possible prefix waited for the end


def test_ids_beyond_the_tokenizer_vocabulary_decode_to_nothing(tok: Tokenizer) -> None:
    d = Detokenizer(tok, [])
    assert d.push(tok.vocab_size + 5) == "" and d.flush() == "" and not d.stopped


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    special = min(tok.special_token_ids)
    ids = tok.encode("ab", add_special_tokens=False)
    pieces, _ = _feed(tok, [ids[0], special, *ids[1:]], [])
    assert "".join(pieces) == "ab"


def test_bytes_that_never_form_characters_still_come_out(tok: Tokenizer) -> None:
    """Lone UTF-8 continuation bytes: text keeps flowing (no ever-growing wait) and, through
    the byte table, matches the full decode exactly."""
    byte_tokens = [t for t in range(tok.vocab_size) if "\ufffd" in tok.decode([t])]
    assert byte_tokens, "the test tokenizer has lone UTF-8 continuation bytes"
    ids = [byte_tokens[i % len(byte_tokens)] for i in range(300)]
    pieces, _ = _feed(tok, ids, [])
    silent = max(len(run) for run in "".join("x" if p else "." for p in pieces).split("x"))
    assert silent < MAX_PENDING
    if tok.token_bytes is not None:
        assert "".join(pieces) == tok.decode(ids)


@pytest.fixture(scope="module")
def byte_level_tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer(tiny_model)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_byte_table_text_equals_the_full_decode(
    byte_level_tok: Tokenizer, data: st.DataObject
) -> None:
    tokenizer = byte_level_tok
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), min_size=1, max_size=24))
    stop = data.draw(st.sampled_from([[], ["e"], ["the", "\n"]]))
    pieces, stopped = _feed(tokenizer, ids, stop)
    full = tokenizer.decode(ids)
    text = "".join(pieces)
    if stopped:
        cut = min(i for s in stop if (i := full.find(s)) >= 0)
        assert text == full[:cut]
    else:
        assert text == full


def test_byte_table_of_a_padded_vocabulary_matches_decoding_each_token(tmp_path: Path) -> None:
    """Made-up multi-byte tokens (as in the benchmark's 128k vocabulary) decode the same way."""
    (tmp_path / "tokenizer.json").write_text(pad_vocab(train_tokenizer(512), 2048).to_str())
    tokenizer = Tokenizer(tmp_path)
    table = tokenizer.token_bytes
    assert table is not None and len(table) == 2048
    for i in range(tokenizer.vocab_size):
        assert table[i].decode("utf-8", "replace") == tokenizer.decode([i])
