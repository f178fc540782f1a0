"""``Tokenizer.encode_batch`` (the server's GIL-releasing path) gives exactly ``encode``'s ids."""

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine.tokenizer import Tokenizer


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(max_size=200), max_size=4))
def test_encode_batch_matches_encode_text_by_text(tiny_model: Path, texts: list[str]) -> None:
    tokenizer = Tokenizer(tiny_model)
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


def test_encode_batch_adds_no_second_bos(tiny_model: Path) -> None:
    """The tiny model's tokenizer adds a BOS, so a text that starts with one would get two."""
    tokenizer = Tokenizer(tiny_model)
    assert tokenizer.bos_token is not None
    text = tokenizer.bos_token + "harbour"
    assert tokenizer.hf.encode(text).ids[:2] == [tokenizer.bos_token_id] * 2
    (ids,) = tokenizer.encode_batch([text])
    assert ids == tokenizer.encode(text) and ids.count(tokenizer.bos_token_id) == 1
