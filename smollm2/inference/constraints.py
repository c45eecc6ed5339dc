"""Constrained decoding: generated text that always matches a JSON schema, a regular expression or a grammar.

    config = GenerationConfig(constraint=Constraint.json_schema({"type": "object", ...}))
    Constraint.json_object()                 any JSON object
    Constraint.regex(r"\\d{3}-\\d{4}")         text matching the expression
    Constraint.choice(["yes", "no"])         exactly one of the strings
    Constraint.lark(grammar)                 a context-free grammar in llguidance's Lark dialect

Before each token is picked, the tokens that cannot continue a match are masked out of the logits (set to
-inf), so greedy decoding and sampling (with every other option) choose among the allowed ones; a row ends when
the grammar is complete and can take nothing more. The grammar engine is llguidance (Microsoft's Rust library
behind guidance, also used by llama.cpp and vLLM; the `grammar` extra: `pip install llguidance`). It was chosen
over xgrammar by measuring both on our 49152-token vocabulary (BENCHMARKS.md): both compute a mask in
microseconds (37 and 5 here), far below a decode step, but xgrammar requires transformers and triton at install
time, and llguidance requires nothing. JSON is generated with the separators `json.dumps` uses (", " and ": "),
the form the model has seen most, and no other whitespace. A free-form string can still run on (the 135M model
sometimes writes digits without end): give schemas a maxLength where that matters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# compact JSON (llguidance's options): a model cannot ramble in whitespace
JSON_FORMAT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def _llguidance():  # the optional extra, imported where a constraint is used
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("constrained decoding needs llguidance: pip install 'smollm2[grammar]' "
                          "(or pip install llguidance)") from e
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """What the generated text must match. Build one with the class methods; `grammar` is llguidance's form."""

    kind: str  # one of KINDS
    grammar: str  # llguidance's grammar (JSON text), checked when the constraint is made

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Constraint:
        """JSON that validates against a JSON schema (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_FORMAT)
        except ValueError as e:
            raise ValueError(f"the JSON schema cannot be used: {e}") from None
        return cls._checked("json_schema", grammar)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls._checked("json_object", _llguidance().LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults=JSON_FORMAT))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text that matches the regular expression as a whole."""
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"a regex constraint needs a non-empty pattern, got {pattern!r}")
        return cls._checked("regex", _llguidance().LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """Exactly one of the strings."""
        if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"a choice constraint needs a list of non-empty strings, got {options!r}")
        return cls._checked("choice", _llguidance().LLMatcher.grammar_from_regex(
            "|".join(f"({re.escape(o)})" for o in options)))

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        """A context-free grammar in llguidance's Lark dialect (start rule `start`)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError(f"a lark constraint needs a grammar, got {grammar!r}")
        return cls._checked("lark", _llguidance().LLMatcher.grammar_from_lark(grammar))

    @classmethod
    def _checked(cls, kind: str, grammar: str) -> Constraint:
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ValueError(f"the {kind} constraint is not a valid grammar: {messages[0]}")
        return cls(kind, grammar)

    def matcher(self, tokenizer: Tokenizer, vocab_size: int, end_ids: Iterable[int]) -> TokenMask:
        """A fresh matcher for one sequence (end_ids: the tokens that end a sequence, allowed once complete)."""
        return TokenMask(self, tokenizer, vocab_size, end_ids)


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int):  # -> llguidance.LLTokenizer
    """llguidance's view of the vocabulary: seconds to build for 49152 tokens, so built once per tokenizer (kept
    on it) and size. The server builds it in a worker thread before the first constrained request runs."""
    cache = tokenizer.__dict__.setdefault("_llguidance_tokenizers", {})
    if vocab_size not in cache:
        cache[vocab_size] = _llguidance().LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                      eos_token=tokenizer.eos_id)
    return cache[vocab_size]


class TokenMask:
    """One sequence's position in a constraint's grammar: which tokens may come next, and consuming them."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, vocab_size: int, end_ids: Iterable[int]) -> None:
        llg = _llguidance()
        end = sorted(set(end_ids))  # allowed, besides the tokenizer's own end token, once the text is complete
        self._matcher = llg.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), constraint.grammar)
        if self._matcher.is_error():
            raise ValueError(f"the {constraint.kind} constraint cannot be used: {self._matcher.get_error()}")
        self.vocab_size = vocab_size
        self.end_ids = end

    @property
    def complete(self) -> bool:
        """The text so far matches and nothing may follow it: the sequence is over."""
        return self._matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that may come next (the sequence's end tokens once the text is complete)."""
        # One byte a token (0 or 200), straight into a tensor: a few hundred microseconds where unpacking
        # llguidance's bitmask with torch ops took several small kernels.
        allowed = torch.frombuffer(bytearray(self._matcher.compute_logit_bias()), dtype=torch.uint8)
        if self._matcher.is_error():
            raise RuntimeError(f"constrained decoding failed: {self._matcher.get_error()}")
        allowed = allowed[: self.vocab_size].bool()
        if self.end_ids and self._matcher.is_accepting():
            allowed[self.end_ids] = True
        return allowed

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, vocab) with every token that may not come next set to -inf."""
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"constrained decoding: token {token} does not continue the grammar "
                               f"({self._matcher.get_error()})")
