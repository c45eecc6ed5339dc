"""Every generation option in one frozen dataclass, checked on construction, and the checks it uses.

The defaults live in defaults.py, where `smollm2 --help` reads them without importing torch. `generate`, the
batching engine, the server's request parsing and the CLI all take a `GenerationConfig` (or its fields as
keyword options, which `make_config` turns into one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..defaults import (  # (--help shows them)
    DRAFT_NGRAM,
    DRAFT_TOKENS,
    MAX_NEW_TOKENS,
    MIN_P,
    REPETITION_PENALTY,
    SPECULATIVE_MODES,
    TEMPERATURE,
    TOP_K,
    TOP_P,
)

if TYPE_CHECKING:
    from .constraints import Constraint

MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation option. Invalid values raise ValueError on construction. (The defaults live in
    defaults.py, where `--help` reads them without importing torch.)"""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = TEMPERATURE  # 0 = greedy (argmax); otherwise logits are divided by it before sampling
    top_k: int = TOP_K  # keep the k most likely tokens; 0 = off
    top_p: float = TOP_P  # keep the most likely tokens up to this total probability; 1 = off
    min_p: float = MIN_P  # keep tokens at least min_p times as likely as the best one; 0 = off
    repetition_penalty: float = REPETITION_PENALTY  # > 1 discourages tokens already in the prompt or output; 1 = off
    seed: int | None = None  # the same seed gives the same tokens; None = a fresh random seed
    stop: tuple[int | str, ...] = ()  # token ids and strings that end generation (strings need a tokenizer)
    eos_ids: tuple[int, ...] | None = None  # None = the model config's eos_token_id and the tokenizer's eos
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks want exactly max_new_tokens)
    constraint: Constraint | None = None  # the text must match it: a JSON schema, regex, choice (constraints.py)
    logprobs: int | None = None  # record each new token's log-probability and this many top alternatives (0-20)
    # "prompt-lookup": draft tokens by copying from the prompt and output, verify them in one forward (the
    # same tokens at temperature 0, the same distribution sampled; speculative.py); None = off
    speculative: str | None = None
    draft_tokens: int = DRAFT_TOKENS  # speculative: tokens drafted at most per verify forward (k)
    draft_ngram: int = DRAFT_NGRAM  # speculative: the longest suffix looked up (n, then n - 1 ... 1)

    def __post_init__(self) -> None:
        # Normalise the forms a caller may reasonably pass: one stop string or id, lists instead of tuples.
        stop = () if self.stop is None else self.stop
        if isinstance(stop, (str, int)):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop))
        if self.eos_ids is not None:
            eos = (self.eos_ids,) if isinstance(self.eos_ids, int) else tuple(self.eos_ids)
            object.__setattr__(self, "eos_ids", eos)

        check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_number("temperature", self.temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
        check_int("top_k", self.top_k, minimum=0, hint=" (0 = off)")
        _check_number("top_p", self.top_p, "a number in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _check_number("min_p", self.min_p, "a number in [0, 1] (0 = off)", lambda v: 0 <= v <= 1)
        _check_number("repetition_penalty", self.repetition_penalty, "a finite number > 0 (1 = off)",
                      lambda v: v > 0)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0, hint=" or None")
        for item in self.stop:
            if isinstance(item, str):
                if not item:
                    raise ValueError("stop strings must be non-empty, got ''")
            else:
                check_int("stop token id", item, minimum=0, hint=" or a non-empty string")
        for item in self.eos_ids or ():
            check_int("eos_ids entry", item, minimum=0)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.constraint is not None:
            from .constraints import Constraint

            if not isinstance(self.constraint, Constraint):
                raise ValueError(f"constraint must be a Constraint (smollm2.inference.constraints), got "
                                 f"{type(self.constraint).__name__}")
            if self.ignore_eos:
                raise ValueError("ignore_eos cannot be combined with a constraint: the grammar decides the end")
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, minimum=0, hint=" (the number of top alternatives) or None")
            if self.logprobs > MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs must be at most {MAX_TOP_LOGPROBS} alternatives, got {self.logprobs}")
        if self.speculative is not None and self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be None or one of {', '.join(map(repr, SPECULATIVE_MODES))}, "
                             f"got {self.speculative!r}")
        check_int("draft_tokens", self.draft_tokens, minimum=1, hint=" (tokens drafted per verify forward)")
        check_int("draft_ngram", self.draft_ngram, minimum=1, hint=" (the longest suffix looked up)")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(s for s in self.stop if not isinstance(s, str))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))


def check_int(name: str, value: object, *, minimum: int, hint: str = "") -> None:
    """A ValueError naming `name` unless value is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")


def _check_number(name: str, value: object, what: str, ok: Callable[[float], bool]) -> None:
    # NaN fails every comparison and inf is excluded explicitly, so both end up here.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def make_config(config: GenerationConfig | None = None, **options: object) -> GenerationConfig:
    """config (or the defaults) with options replacing fields; an unknown option is a ValueError."""
    config = config if config is not None else GenerationConfig()
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(config, **options) if options else config
