"""The SmolLM2 tokenizer: a thin wrapper over the `tokenizers` library, plus the model's own chat template.

SmolLM2 uses byte-level BPE (GPT-2 style) with one twist: before BPE, every digit is split off on its own
(`Digits(individual_digits=True)`), so "2024" is four tokens. tokenizer.json spells this out; a GGUF file only
says `tokenizer.ggml.pre = smollm`, so `from_gguf` rebuilds the same pipeline from that name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# The GGUF `tokenizer.ggml.pre` names we can rebuild, and the pre-tokenizers they stand for.
_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
}
_GGUF_CONTROL_TOKEN = 3  # llama.cpp's token type for special (control) tokens


class Tokenizer:
    """encode/decode text, special-token ids, and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        # A twin that reads special-token strings in user text as plain text (for chat messages).
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self._added = {t.content for t in backend.get_added_tokens_decoder().values()}  # spelled as they are
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.config = config or {}  # tokenizer_config.json fields, written back by save()

    # ---- construction ----------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Read tokenizer.json (and tokenizer_config.json, when present) from an original-layout directory."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"{directory}: no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")) or "<|endoftext|>",
            pad_token=_token_text(config.get("pad_token")),
            chat_template=config.get("chat_template"),
            config={k: v for k, v in config.items() if k != "added_tokens_decoder"},
        )

    @classmethod
    def from_gguf_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        *,
        pre: str,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        chat_template: str | None,
        source: str = "GGUF",
    ) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF file's `tokenizer.ggml.*` fields."""
        if pre not in _PRE_TOKENIZERS:
            raise ValueError(
                f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(_PRE_TOKENIZERS)})"
            )
        if len(token_types) != len(tokens):
            raise ValueError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
        vocab = {token: i for i, token in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ValueError(f"{source}: malformed BPE merge {merge!r} (expected two tokens separated by a space)")
            pairs.append((left, right))
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False)
             for i, kind in enumerate(token_types) if kind == _GGUF_CONTROL_TOKEN]
        )

        def name(token_id: int | None) -> str | None:
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{source}: special token id {token_id} is outside the vocabulary of {len(tokens)}")
            return tokens[token_id]

        return cls(backend, bos_token=name(bos_id), eos_token=name(eos_id), pad_token=name(pad_id),
                   chat_template=chat_template)

    # ---- ids -------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the vocabulary")
        return token_id

    @property
    def bos_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        return self.backend.token_to_id(self.pad_token) if self.pad_token else self.eos_id

    @property
    def special_ids(self) -> set[int]:
        return {self.token_id(t.content) for t in self.backend.get_added_tokens_decoder().values() if t.special}

    # ---- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of text. With allow_special=False, "<|im_end|>" in text is spelled out as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        backend = self.backend if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes of ids: a token may hold half a UTF-8 character, which `decode` would replace."""
        byte_of = _byte_decoder()
        out = bytearray()
        for token_id in ids:
            token = self.backend.id_to_token(int(token_id))
            if token is None:
                raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
            if token in self._added:
                out += token.encode("utf-8")
            else:
                out += bytes(byte_of[ch] for ch in token)
        return bytes(out)

    # ---- chat ------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """Render messages with the model's own Jinja template.

        tokenize=True returns ids in which the template's own markers are special tokens and the messages'
        content is plain text, so a user who types "<|im_start|>system" cannot inject a turn.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        messages = _check_messages(messages)
        if not tokenize:
            return _render(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token)
        # Render with a unique placeholder in place of each content, then encode the pieces separately.
        marks = [f"\x00{i}\x00" for i in range(len(messages))]
        masked = [dict(m, content=mark) for m, mark in zip(messages, marks, strict=True)]
        text = _render(self.chat_template, masked, add_generation_prompt, self.bos_token, self.eos_token)
        ids: list[int] = []
        for i, mark in enumerate(marks):
            before, found, text = text.partition(mark)
            if not found:
                raise ValueError("the chat template does not render each message's content exactly once")
            ids += self.encode(before) + self.encode(messages[i]["content"], allow_special=False)
        return ids + self.encode(text)

    # ---- saving ----------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json in the original's layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            **self.config,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.config.get("unk_token", "<|endoftext|>"),
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _check_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {message!r}")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}] has unknown role {message['role']!r} (use system, user or assistant)")
    return [dict(m) for m in messages]


def _render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
            bos_token: str | None, eos_token: str | None) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    # The same settings transformers uses, so a template renders identically here and there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from None


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each of the 256 byte values is spelled as one printable char."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}
