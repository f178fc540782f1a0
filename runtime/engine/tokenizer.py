"""The model's tokenizer, chat template and end-of-sequence ids, read from its directory.

Built on the ``tokenizers`` library alone (no transformers import, which costs seconds), with
the chat template rendered by jinja2 the way Hugging Face renders it.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """Encodes prompts, decodes outputs and renders chat messages for one model."""

    def __init__(self, model_dir: str | Path) -> None:
        model_path = Path(model_dir)
        tokenizer_file = model_path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise FileNotFoundError(
                f"{tokenizer_file} is missing: Berth needs a fast tokenizer (tokenizer.json) "
                "in the model directory"
            )
        self.hf = HfTokenizer.from_file(str(tokenizer_file))
        # Byte-level BPE (Llama 3, Qwen): decoding is concatenation, which the detokenizer uses.
        self.byte_level = isinstance(self.hf.decoder, decoders.ByteLevel)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        config = _load_json(model_path / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self.hf.token_to_id(self.bos_token) if self.bos_token else None
        self.chat_template = self._find_chat_template(model_path, config)
        eos: list[int] = []
        for source in (
            _load_json(model_path / "generation_config.json").get("eos_token_id"),
            _load_json(model_path / "config.json").get("eos_token_id"),
        ):
            eos += _ids(source)
        if self.eos_token and (eos_id := self.hf.token_to_id(self.eos_token)) is not None:
            eos.append(eos_id)
        self.eos_token_ids: list[int] = sorted(set(eos))
        self.special_token_ids = frozenset(
            i for i, t in self.hf.get_added_tokens_decoder().items() if t.special
        )

    @cached_property
    def token_bytes(self) -> list[bytes] | None:
        """Each id's bytes as a byte-level decode concatenates them (special tokens: none), or
        None when the decoder is not byte-level. Built once, on first use (~0.1 s for 128k ids):
        with it the detokenizer turns a token into text without calling the tokenizer."""
        if not self.byte_level:
            return None
        to_byte = _byte_level_chars()
        table = [b""] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or i in self.special_token_ids:
                continue
            try:
                table[i] = bytes([to_byte[c] for c in token])
            except KeyError:  # not made of byte-level characters: its own UTF-8, as tokenizers does
                table[i] = token.encode()
        return table

    @cached_property
    def token_texts(self) -> list[str | None] | None:
        """``token_bytes`` as text where a token's bytes are whole UTF-8 characters (most
        tokens), else None; None for a decoder that is not byte-level."""
        if self.token_bytes is None:
            return None
        texts: list[str | None] = []
        for data in self.token_bytes:
            try:
                texts.append(data.decode())
            except UnicodeDecodeError:
                texts.append(None)
        return texts

    @staticmethod
    def _find_chat_template(model_path: Path, config: dict[str, Any]) -> str | None:
        jinja_file = model_path / "chat_template.jinja"
        if jinja_file.exists():
            return jinja_file.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a BOS that the text already starts with is not added twice."""
        return self._once_bos(self.hf.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` of each text, with the GIL released while the tokenizer works.

        ``tokenizers``' single ``encode`` holds the GIL throughout: run in a thread on a 7 MB
        text it still froze the server's event loop for 12 s. Its batch call releases the GIL
        (the loop then went on within 0.3 s), so a server tokenizes off its loop with this.
        """
        encodings = self.hf.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [self._once_bos(e.ids) for e in encodings]

    def _once_bos(self, ids: list[int]) -> list[int]:
        bos = self.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            return ids[1:]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        known = [t for t in token_ids if 0 <= t < self.vocab_size]
        return str(self.hf.decode(known, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render ``messages`` with the model's chat template, as Hugging Face would."""
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (tokenizer_config.json 'chat_template' or "
                "chat_template.jinja); send a plain prompt instead"
            )
        return _compile(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **extra,
        )


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


_compiled: dict[str, Any] = {}


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _compile(template: str) -> Any:
    """Compile once per template, in a sandbox, with Hugging Face's extra globals."""
    if template not in _compiled:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _compiled[template] = env.from_string(template)
    return _compiled[template]
