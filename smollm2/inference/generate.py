"""Text generation: a prefill pass over the prompt, then one-token decode steps over a static KV cache.

    generate(model, prompt_ids, **options)          -> Stream[int]   token ids as they are produced
    generate_batch(model, prompts, **options)       -> list[list[int]]  prompts of any lengths, left-padded
    stream_text(model, tokenizer, prompt, **options) -> Stream[str]   text pieces, never broken UTF-8
    chat(model, tokenizer, messages, **options)      -> Stream[str]   a reply, with the model's chat template
    TextDecoder(tokenizer, stop).push(token_id)     -> str           stream_text's decoding, one id at a time

Options are the fields of `GenerationConfig` (each default lives there). Generation stops at an end-of-sequence
token, a stop token id, a stop string or after max_new_tokens; the stream's `finish_reason` then says "stop" or
"length", as OpenAI's API does. Stop tokens are not yielded; the token that completes a stop string is (it may
carry text before the stop string), and the text helpers cut the text at the stop string.

`speculative="prompt-lookup"` (one prompt at a time) drafts tokens by copying from the prompt and output and
verifies them in one forward of several positions (speculative.py); the tokens still go through the same
loop and the same SequenceState, one at a time, so stopping, penalties and streaming are unchanged.

Each row's state (its tokens, text, random generator, penalty and finish reason) is a `stopping.SequenceState`,
the same one the batching engine keeps per request. The per-token work is a `StepFn`: `decode_step`, the
model's forward for one token, or `compiled_step.DecodeStep`, the same forward compiled, which `load(compile=True)`
attaches to the model (`model.compiled_step`) and every function here then uses. Only the last position's
logits are computed: the output projection is the largest matmul of the model (576 x 49152), and a prefill
needs it for one position, not all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from ..config import Config
from ..kv_cache import KVCache
from .config import GenerationConfig, make_config
from .speculative import PromptLookup, SpeculationStats, accept, drafter_for, verify_forward
from .stopping import (
    SequenceState,
    TextDecoder,
    TokenLogprob,
    decode_text,
    make_generator,
    next_tokens,
    stop_prefix_length,
)

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

Item = TypeVar("Item")
__all__ = ["GenerationConfig", "Stream", "StepFn", "TextDecoder", "chat", "decode_step", "decode_text", "generate",
           "generate_batch", "make_generator", "prefill", "prompt_logprobs", "stop_prefix_length", "stream_text"]


def check_prompts(
    prompts: Sequence[Sequence[int]], config: GenerationConfig, model_config: Config, tokenizer: Tokenizer | None
) -> list[list[int]]:
    """The prompts as lists of ints, after checking them (and the ids in config) against the model."""
    if not prompts:
        raise ValueError("no prompts given")
    vocab = model_config.vocab_size
    checked = []
    for row, prompt in enumerate(prompts):
        where = f"prompts[{row}]" if len(prompts) > 1 else "the prompt"
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        if isinstance(prompt, str):
            raise ValueError(f"{where} must be token ids, got a string (encode it, or use stream_text)")
        prompt = list(prompt)
        if not prompt:
            raise ValueError(f"{where} is empty: generation needs at least one token")
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"{where} has token id {token!r} at index {i}, outside the vocabulary "
                                 f"(0..{vocab - 1})")
        checked.append(prompt)
    for name, ids in (("stop token id", config.stop_ids), ("eos_ids entry", config.eos_ids or ())):
        for token in ids:
            if token >= vocab:
                raise ValueError(f"{name} {token} is outside the vocabulary (0..{vocab - 1})")
    if config.stop_strings and tokenizer is None:
        raise ValueError(f"stop strings {list(config.stop_strings)} need a tokenizer: pass tokenizer=...")
    longest = max(len(p) for p in checked)
    limit = model_config.max_position_embeddings
    if longest + config.max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} = "
                         f"{longest + config.max_new_tokens} tokens exceeds the model's context length of {limit}")
    return checked


class Stream(Generic[Item]):
    """An iterator over generated items (token ids or text) that records how generation went.

    prompt_ids: the prompt's token ids. new_ids: the ids generated so far (stop and EOS tokens excluded).
    finish_reason: None while running (or if closed early), then "stop" (an EOS token, a stop token, a stop
    string or a constraint complete) or "length" (max_new_tokens reached). logprobs: a TokenLogprob per new id
    when `logprobs` was asked for. speculation: with speculative="prompt-lookup", the SpeculationStats (drafts
    verified, drafted, accepted), updated as generation goes; None otherwise.
    """

    def __init__(self, prompt_ids: list[int], new_ids: list[int] | None = None,
                 logprobs: list[TokenLogprob] | None = None, speculation: SpeculationStats | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.new_ids = new_ids if new_ids is not None else []
        self.logprobs = logprobs if logprobs is not None else []
        self.speculation = speculation
        self.finish_reason: str | None = None
        self._items: Iterator[Item] = iter(())

    def __iter__(self) -> Stream[Item]:
        return self

    def __next__(self) -> Item:
        return next(self._items)

    def close(self) -> None:
        """Stop generating (e.g. the client went away); finish_reason stays None."""
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


# ---- the model calls -----------------------------------------------------------------------------------


class StepFn(Protocol):
    """A decode step: one new token per row (B, 1) at cache position start -> logits (B, vocab) for the token
    after it. `decode_step` is the eager one; `compiled_step.DecodeStep` runs the same forward compiled.

    positions (B, 1) and attention_mask (B, start + 1) are needed only for left-padded batches; None means
    position `start` for every row and no padding.
    """

    def __call__(
        self,
        model: SmolLM2,
        token_ids: torch.Tensor,
        cache: KVCache,
        start: int,
        positions: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor: ...


@torch.no_grad()
def prefill(
    model: SmolLM2,
    input_ids: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompts (B, T) through the model, filling cache positions 0..T-1; logits (B, vocab) of the last."""
    return model(input_ids, cache=cache, positions=positions, attention_mask=attention_mask, output="last_logits")


@torch.no_grad()
def decode_step(
    model: SmolLM2,
    token_ids: torch.Tensor,
    cache: KVCache,
    start: int,
    positions: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The eager decode step (a StepFn): the model's forward for one token per row, exactly as loaded."""
    return model(token_ids, cache=cache, start=start, positions=positions, attention_mask=attention_mask,
                 output="last_logits")


PROMPT_LOGPROBS_CHUNK = 256  # positions projected onto the vocabulary at once: (256, 49152) fp32 logits = 50 MB


@torch.no_grad()
def prompt_logprobs(model: SmolLM2, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it (len(ids) - 1 records: the first token has
    none), with the `top` most likely tokens at each position: what a completion's `echo` reports and what
    lm-eval sums into a log-likelihood. One forward over the prompt; the output projection runs on a chunk of
    positions at a time, so a long prompt never holds all its (T, vocab) logits at once."""
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    device = next(model.parameters()).device
    hidden = model(torch.tensor([list(ids)], device=device), output="hidden")[0]  # (T, hidden)
    targets = torch.tensor(list(ids[1:]), device=device)
    records: list[TokenLogprob] = []
    for begin in range(0, len(targets), PROMPT_LOGPROBS_CHUNK):
        end = begin + PROMPT_LOGPROBS_CHUNK
        logprobs = torch.log_softmax(model.lm_head(hidden[begin:end]).float(), dim=-1)  # position t predicts t + 1
        chosen = logprobs.gather(1, targets[begin:end, None])[:, 0].tolist()
        best = torch.topk(logprobs, top) if top else None
        for i, token in enumerate(targets[begin:end].tolist()):
            alternatives = tuple(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best else ()
            records.append(TokenLogprob(token, chosen[i], alternatives))
    return records


def step_for(model: SmolLM2, step: StepFn | None) -> StepFn:
    """The decode step to use: the one passed, else the model's compiled one (`load(compile=True)`), else eager."""
    if step is not None:
        return step
    return model.compiled_step if getattr(model, "compiled_step", None) is not None else decode_step


# ---- the generation loop -------------------------------------------------------------------------------


def stop_token_ids(config: GenerationConfig, model: SmolLM2, tokenizer: Tokenizer | None) -> set[int]:
    """The ids that end generation (and are not output): the stop ids, and the EOS ids unless ignore_eos."""
    if config.ignore_eos:
        eos = set()
    elif config.eos_ids is not None:
        eos = set(config.eos_ids)
    else:
        eos = {model.config.eos_token_id, tokenizer.eos_id if tokenizer is not None else None} - {None}
    return eos | set(config.stop_ids)


def _left_pad(
    prompts: list[list[int]], pad_id: int, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """input_ids (B, T), RoPE positions (B, T) and attention mask (B, total) for prompts padded on the left.

    Left padding lines up every row's last token at T-1, so one decode step serves all rows. Positions count
    only a row's real tokens, so a padded row sees the positions it would see alone. Without padding, positions
    and mask are None: the model's defaults are then right, and cheaper.
    """
    T = max(len(p) for p in prompts)
    pads = [T - len(p) for p in prompts]
    input_ids = torch.tensor([[pad_id] * pad + p for pad, p in zip(pads, prompts, strict=True)], device=device)
    if not any(pads):
        return input_ids, None, None
    pad = torch.tensor(pads, device=device)[:, None]  # (B, 1)
    positions = (torch.arange(T, device=device)[None, :] - pad).clamp(min=0)  # (B, T); padding gets 0
    mask = (torch.arange(total, device=device)[None, :] >= pad).long()  # (B, total): 0 on padding
    return input_ids, positions, mask


def start_rows(
    model: SmolLM2, prompts: list[list[int]], config: GenerationConfig, tokenizer: Tokenizer | None
) -> list[SequenceState]:
    """One SequenceState per prompt, with the stop ids of config, the model and the tokenizer."""
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(config, model, tokenizer)
    return [SequenceState(p, config, stop_ids, tokenizer, device, model.config.vocab_size) for p in prompts]


def _decode_loop(
    model: SmolLM2, rows: list[SequenceState], step_fn: StepFn, drafter: PromptLookup | None = None
) -> Iterator[list[tuple[int, str]]]:
    """Generate for rows (left-padded into one batch) until all have finished; yield, per token chosen, each
    row's (token, text) pair, (-1, "") for a row that had already finished.

    A row's text is what `SequenceState.push` returned; its token is -1 too when it was a stop token (those are
    not output). Rows that finish early keep their place in the batch until all have finished.

    drafter (one row only): speculative decoding (speculative.py). Each forward then feeds the last chosen
    token and the drafted ones after it, and `speculative.accept` chooses and pushes from one to all of them
    plus one; with no draft the forward is the usual decode step, and choosing is plain decoding's.
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    prompts = [row.prompt_ids for row in rows]
    B, T = len(prompts), max(len(p) for p in prompts)
    assert drafter is None or B == 1, "speculative decoding runs one row"
    steps = max(row.config.max_new_tokens for row in rows)
    total = T + steps
    pad_id = model.config.pad_token_id or 0  # any id works: padded positions are masked out
    input_ids, positions, mask = _left_pad(prompts, pad_id, total, device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1): first new token's position
    cache = KVCache(model.config, B, total, dtype=dtype, device=device)

    logits = prefill(model, input_ids, cache, positions, mask[:, :T] if mask is not None else None)
    drafts: list[int] = []  # the drafted tokens fed after the last chosen one (speculation only)
    chosen = 0  # tokens chosen per row so far
    while True:
        if drafter is None:
            tokens = next_tokens(rows, logits)  # (a finished row's token is computed and ignored)
            out = []
            for row, token in zip(rows, tokens, strict=True):
                if row.done:
                    out.append((-1, ""))
                    continue
                kept = len(row.new_ids)
                text = row.push(token)
                out.append((token if len(row.new_ids) > kept else -1, text))
            chosen += 1
            yield out
        else:  # logits (len(drafts) + 1, vocab): one row's predictions after its last token and each draft
            for pair in accept(rows[0], drafter, logits, drafts):
                chosen += 1
                yield [pair]
            tokens = rows[0].new_ids[-1:]  # the last one chosen (a stop token would have finished the row)
        if all(row.done for row in rows):
            return
        start = T + chosen - 1  # the cache position of the last token chosen; rejected drafts lie after it
        drafts = drafter.draft(rows[0].remaining - 1) if drafter is not None else []
        if drafts:  # the last token and the drafts, in one forward (verify_forward says why it is eager)
            logits = verify_forward(model, [*tokens, *drafts], cache, start)
            continue
        logits = step_fn(model, torch.tensor(tokens, device=device)[:, None], cache, start,
                         lengths + chosen - 1 if mask is not None else None,
                         mask[:, : start + 1] if mask is not None else None)


def _generate_one(
    model: SmolLM2, prompt_ids: Sequence[int] | torch.Tensor, tokenizer: Tokenizer | None,
    config: GenerationConfig, step: StepFn | None,
) -> tuple[SequenceState, Iterator[tuple[int, str]], SpeculationStats | None]:
    """The state of one prompt's generation, the iterator of its (token, text) pairs and, when speculating,
    the drafting statistics; checked first."""
    (prompt,) = check_prompts([prompt_ids], config, model.config, tokenizer)
    (row,) = start_rows(model, [prompt], config, tokenizer)
    drafter = drafter_for(config, prompt)
    pairs = (pair for (pair,) in _decode_loop(model, [row], step_for(model, step), drafter))
    return row, pairs, drafter.stats if drafter is not None else None


def generate(
    model: SmolLM2,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    tokenizer: Tokenizer | None = None,
    config: GenerationConfig | None = None,
    step: StepFn | None = None,
    **options: object,
) -> Stream[int]:
    """Generate after prompt_ids, yielding each new token id as it is produced.

    Options are GenerationConfig fields (they override `config`). tokenizer is needed for stop strings and
    adds its EOS id to the model config's. step computes one decode step; None = the model's compiled step
    where `load(compile=True)` made one, else `decode_step`. Everything is checked here, before the first
    model call. speculative="prompt-lookup" (draft_tokens, draft_ngram) drafts and verifies several tokens per
    forward: the same tokens at temperature 0, the same distribution sampled; `stream.speculation` counts them.
    """
    config = make_config(config, **options)
    row, pairs, stats = _generate_one(model, prompt_ids, tokenizer, config, step)
    stream: Stream[int] = Stream(row.prompt_ids, row.new_ids, row.logprobs, stats)

    def items() -> Iterator[int]:
        for token, _ in pairs:
            stream.finish_reason = row.finish_reason
            if token >= 0:
                yield token

    stream._items = items()
    return stream


def generate_batch(
    model: SmolLM2,
    prompts: Sequence[Sequence[int]],
    *,
    tokenizer: Tokenizer | None = None,
    config: GenerationConfig | None = None,
    step: StepFn | None = None,
    **options: object,
) -> list[list[int]]:
    """Generate for several prompts at once (left-padded to the longest); the new ids of each prompt.

    Each row gets the tokens it would get alone: greedy, and also sampled with a seed (each row draws from
    its own generator, seeded alike). Rows that finish early keep their place in the batch until all have
    finished.
    """
    config = make_config(config, **options)
    if config.speculative is not None and len(prompts) > 1:
        raise ValueError(f"speculative={config.speculative!r} decodes one prompt at a time, got {len(prompts)} "
                         "prompts: use generate() per prompt, or speculative=None for a batch")
    checked = check_prompts(prompts, config, model.config, tokenizer)
    rows = start_rows(model, checked, config, tokenizer)
    drafter = drafter_for(config, checked[0])
    for _ in _decode_loop(model, rows, step_for(model, step), drafter):
        pass
    return [row.new_ids for row in rows]


def stream_text(
    model: SmolLM2,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    config: GenerationConfig | None = None,
    step: StepFn | None = None,
    **options: object,
) -> Stream[str]:
    """Generate after prompt (text, or token ids) and yield the new text in pieces, as it is produced."""
    config = make_config(config, **options)
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    row, pairs, stats = _generate_one(model, prompt_ids, tokenizer, config, step)
    stream: Stream[str] = Stream(row.prompt_ids, row.new_ids, row.logprobs, stats)

    def items() -> Iterator[str]:
        for _, text in pairs:
            stream.finish_reason = row.finish_reason
            if text:
                yield text

    stream._items = items()
    return stream


def chat(
    model: SmolLM2,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, str]],
    *,
    config: GenerationConfig | None = None,
    step: StepFn | None = None,
    **options: object,
) -> Stream[str]:
    """Stream the assistant's reply to messages ([{"role": "system"|"user"|"assistant", "content": ...}]).

    The messages are rendered with the model's own chat template. Their content is tokenized as plain text, so
    "<|im_end|>" typed by a user cannot end a turn or open a new one. The reply ends at "<|im_end|>".
    """
    config = make_config(config, **options)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    end_of_turn = tokenizer.token_id("<|im_end|>")
    config = dataclasses.replace(config, stop=(*config.stop, end_of_turn))
    return stream_text(model, tokenizer, prompt_ids, config=config, step=step)
