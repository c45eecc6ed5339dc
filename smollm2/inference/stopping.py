"""One sequence's decoding state: how its next token is picked and when it ends. The one place for it.

    row = SequenceState(prompt_ids, config, stop_ids, tokenizer, device, vocab_size)
    token = row.next_token(logits)     # (1, vocab): repetition penalty, then greedy or a seeded draw
    text = row.push(token)             # records it; the text that became final; row.finish_reason when done

`generate`, `generate_batch`, `stream_text` and `chat` (generate.py) keep one per row of their batch, and the
batching engine (engine.py) one per request, so end-of-sequence and stop tokens, stop strings, the length
limit, streamed text, the repetition penalty, a constraint's token mask (constraints.py) and recorded
log-probabilities behave the same everywhere. Stop tokens are not recorded; the token that completes a stop
string is (it may carry text before the stop string), and the text is cut before the stop string, as OpenAI's
API does.
"""

from __future__ import annotations

import codecs
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .sampling import apply_repetition_penalty, sample

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .config import GenerationConfig


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log_softmax of its logits, before any penalty,
    temperature or constraint) and the `top` most likely tokens there, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The random generator of one sequence: seeded with seed, or freshly when it is None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class SequenceState:
    """A sequence being generated: its prompt, new tokens, text decoder, random generator and finish reason.

    prompt_ids, new_ids: the prompt and the ids generated so far (stop and end-of-sequence tokens excluded).
    finish_reason: None while running, then "stop" (a stop or end-of-sequence token, a stop string, or a
    constraint's grammar complete) or "length" (max_new_tokens reached).
    logprobs: one TokenLogprob per new id when the config asks for them (config.logprobs), else empty.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        stop_ids: Iterable[int],
        tokenizer: Tokenizer | None,
        device: torch.device,
        vocab_size: int,
    ) -> None:
        self.prompt_ids, self.config = prompt_ids, config
        self.stop_ids = frozenset(stop_ids)
        self.new_ids: list[int] = []
        self.finish_reason: str | None = None
        self.decoder = TextDecoder(tokenizer, config.stop_strings) if tokenizer is not None else None
        # One generator per sequence: a seed reproduces a sampled reply alone, in a batch or in the server.
        self.generator = make_generator(config.seed, device)
        self.seen: torch.Tensor | None = None  # (vocab,) bool: the tokens so far, for the repetition penalty
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[prompt_ids] = True
        self.mask = None  # a constraint's TokenMask: which tokens may come next
        if config.constraint is not None:
            if tokenizer is None:
                raise ValueError("a constraint needs the tokenizer (its grammar is over text)")
            self.mask = config.constraint.matcher(tokenizer, vocab_size, self.stop_ids)
        self.logprobs: list[TokenLogprob] = []
        self._logprob: TokenLogprob | None = None  # of the token next_token picked, until push records it

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        """Tokens this sequence may still generate."""
        return self.config.max_new_tokens - len(self.new_ids)

    @property
    def greedy(self) -> bool:
        """Whether the next token is the plain argmax of the logits (no penalty, mask, sampling or logprobs)."""
        return self.config.temperature == 0 and self.seen is None and self.mask is None and self.config.logprobs is None

    def next_token(self, logits: torch.Tensor) -> int:
        """The next token for this sequence's logits (1, vocab)."""
        c, raw = self.config, logits
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[None], c.repetition_penalty)
        if self.mask is not None:
            logits = self.mask.apply(logits)
        token = int(sample(logits, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p,
                           generator=self.generator)[0])
        if c.logprobs is not None:
            logprobs = torch.log_softmax(raw[0].float(), dim=-1)  # (vocab,)
            top = torch.topk(logprobs, c.logprobs) if c.logprobs else None
            self._logprob = TokenLogprob(token, float(logprobs[token]), tuple(
                zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ())
        return token

    def push(self, token: int) -> str:
        """Record the next token; return the text that became final (always "" without a tokenizer)."""
        if self.done:
            raise RuntimeError("push() after the sequence finished")
        logprob, self._logprob = self._logprob, None
        if token in self.stop_ids:  # not recorded, not shown
            return self._finish("stop")
        self.new_ids.append(token)
        if logprob is not None and logprob.token == token:
            self.logprobs.append(logprob)
        if self.seen is not None:
            self.seen[token] = True
        if self.mask is not None:
            self.mask.consume(token)
        text = self.decoder.push(token) if self.decoder is not None else ""
        if (self.decoder is not None and self.decoder.stopped) or (self.mask is not None and self.mask.complete):
            return text + self._finish("stop")
        if self.remaining == 0:
            return text + self._finish("length")
        return text

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self.decoder.flush() if self.decoder is not None else ""


def next_tokens(rows: Sequence[SequenceState], logits: torch.Tensor) -> list[int]:
    """Each row's next token for logits (len(rows), vocab): one argmax call for all the greedy rows. A row that
    has finished gets token 0 (a batch keeps its place; nothing reads it)."""
    greedy = logits.argmax(dim=-1).tolist() if any(row.greedy for row in rows) else None
    return [0 if row.done else greedy[i] if row.greedy else row.next_token(logits[i : i + 1])
            for i, row in enumerate(rows)]


# ---- text ----------------------------------------------------------------------------------------------


class TextDecoder:
    """Token ids in, text out as soon as it is whole: `push(token)` returns the text that became final.

    Byte-level BPE splits characters across tokens ("😀" is three tokens here), so bytes go through an
    incremental UTF-8 decoder that holds an incomplete character until its last byte arrives. Text that could
    be the start of a stop string is held back too, until it either completes the stop string (and is
    dropped) or cannot. `stopped` turns True when a stop string appears: the text before it has then been
    returned, and nothing after it ever is. `flush()` returns the held-back text once generation has ended.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # only truly invalid bytes: U+FFFD
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.utf8.decode(self.tokenizer.decode_bytes([token]))
        cuts = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            text, self.pending = self.pending[: min(cuts)], ""
            return text
        keep = stop_prefix_length(self.pending, self.stop)
        text = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return text

    def flush(self) -> str:
        """The held-back text that never became a stop string. Bytes of a character that never completed
        (generation ended mid-character) are dropped rather than shown as U+FFFD."""
        text, self.pending = self.pending, ""
        return "" if self.stopped else text


def decode_text(tokenizer: Tokenizer, ids: Iterable[int], stop: Sequence[str] = ()) -> Generator[str, None, bool]:
    """Text pieces (never empty) for a stream of token ids: whole characters only, cut before the first stop
    string (see TextDecoder). Returns True (the generator's return value) when a stop string ended the text."""
    decoder = TextDecoder(tokenizer, stop)
    for token in ids:
        text = decoder.push(token)
        if text:
            yield text
        if decoder.stopped:
            return True
    text = decoder.flush()
    if text:
        yield text
    return False


def stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of text that is the beginning of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
