"""Prompt-lookup speculative decoding (inference/speculative.py): the n-gram drafter, the acceptance rule under
sampling (the accepted tokens are distributed as the target), stop conditions and the length limit exactly as
plain decoding, back-off, the options, and on the real weights: the same greedy tokens as plain decoding, with
drafts accepted.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import smollm2
from conftest import SHARED_DATA, require
from smollm2.config import Config
from smollm2.inference.compiled_step import DecodeStep
from smollm2.inference.config import GenerationConfig
from smollm2.inference.generate import generate, generate_batch, stream_text
from smollm2.inference.sampling import apply_repetition_penalty, probabilities
from smollm2.inference.speculative import NgramIndex, PromptLookup, accept_or_resample, choose
from smollm2.inference.stopping import SequenceState
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer

SPEC = "prompt-lookup"

# ---- the drafter -----------------------------------------------------------------------------------------


def test_lookup_copies_what_followed_the_most_recent_longest_match() -> None:
    index = NgramIndex([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], max_ngram=3)
    # Suffix [5, 2, 3] never occurred before; [2, 3] last occurred at 5..6, followed by 7, 8, 5, 2, 3.
    assert index.draft(3) == [7, 8, 5]
    index.append(7)  # suffix [2, 3, 7] occurred at 5..7: followed by 8, 5, 2, ...
    assert index.draft(4) == [8, 5, 2, 3]
    # Past the end of the text the copy goes on from its own start: the loop 8 5 2 3 7 repeats.
    assert index.draft(7) == [8, 5, 2, 3, 7, 8, 5]


def test_lookup_never_matches_the_suffix_itself() -> None:
    assert NgramIndex([4, 5, 6], max_ngram=3).draft(5) == []
    assert NgramIndex([4, 4], max_ngram=3).draft(5) == [4] * 5  # the earlier 4 was followed by a 4: a run
    index = NgramIndex([1, 2, 1], max_ngram=2)
    assert index.draft(2) == [2, 1]  # 1-gram [1] at 0, followed by 2, 1


def test_back_off_pauses_drafting_after_misses_and_recovers() -> None:
    drafter = PromptLookup([1, 2, 3, 1, 2], max_tokens=6, max_ngram=2)
    assert drafter.draft(10) == [3, 1, 2, 3, 1, 2]  # k = 6: the loop 3 1 2 continues
    drafter.record(3, 0)  # first miss: no pause, but shorter drafts
    assert drafter.k == 1 and drafter.draft(10) == [3]
    drafter.record(1, 0)  # second: pause 1 step
    assert drafter.draft(10) == [] and drafter.draft(10) == [3]
    drafter.record(1, 0)  # third: pause 3 steps
    assert [drafter.draft(10) for _ in range(4)] == [[], [], [], [3]]
    drafter.record(1, 1)  # an accepted draft resets the misses and grows the draft
    assert drafter.misses == 0 and drafter.k == 3 and drafter.draft(10) == [3, 1, 2]
    assert drafter.draft(0) == []  # nothing may be drafted past max_new_tokens
    assert (drafter.stats.verifies, drafter.stats.drafted, drafter.stats.accepted) == (4, 6, 1)


# ---- the acceptance rule under sampling -----------------------------------------------------------------

DRAWS = 40_000
TV_BOUND = 0.02  # total variation: sampling noise at 40k draws over 6 tokens is ~0.005; wrong rules give > 0.1


def tv(counts: collections.Counter, probs: torch.Tensor) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts.get(t, 0) / total - float(p)) for t, p in enumerate(probs))


@pytest.mark.parametrize("draft", [0, 2, 5])  # likely, middling, impossible (probability 0)
def test_accepted_tokens_are_distributed_as_the_target(draft: int) -> None:
    probs = torch.tensor([0.45, 0.05, 0.3, 0.12, 0.08, 0.0])
    generator = torch.Generator().manual_seed(0)
    counts = collections.Counter(accept_or_resample(probs, draft, generator) for _ in range(DRAWS))
    assert tv(counts, probs) < TV_BOUND, counts
    assert counts[5] == 0  # a token the target excludes never comes out
    # The rule's two halves matter: accepting with p(t) and then redrawing from p itself (t not removed) gives
    # t with probability p + (1 - p) p; always accepting gives a point mass. Both are far from the target.
    p = float(probs[draft])
    wrong = probs * (1 - p)
    wrong[draft] += p
    if p > 0:
        assert 0.5 * float((wrong - probs).abs().sum()) > 5 * TV_BOUND


def test_sampled_speculation_uses_plain_samplings_distribution(tiny_config: Config) -> None:
    """Penalty, temperature, top-k, top-p and min-p shape the target as plain sampling shapes it: the tokens
    `choose` gives with a draft are distributed as plain `SequenceState.next_token`'s draws."""
    V = tiny_config.vocab_size
    torch.manual_seed(1)
    logits = torch.randn(1, V) * 2
    config = GenerationConfig(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.5, seed=3)
    prompt = [int(i) for i in logits[0].topk(3).indices]  # the penalty falls on likely tokens: it matters
    plain = SequenceState(prompt, config, (), None, torch.device("cpu"), V)
    spec = SequenceState(prompt, config, (), None, torch.device("cpu"), V)
    target = probabilities(apply_repetition_penalty(logits, plain.seen[None], 1.5), temperature=0.8, top_k=6,
                           top_p=0.95)[0]
    draft = int(target.argsort()[-2])  # the second most likely token after the penalty
    plain_counts = collections.Counter(plain.next_token(logits) for _ in range(DRAWS))
    spec_counts = collections.Counter(choose(spec, logits, draft) for _ in range(DRAWS))
    assert tv(plain_counts, target) < TV_BOUND and tv(spec_counts, target) < TV_BOUND
    unpenalised = probabilities(logits, temperature=0.8, top_k=6, top_p=0.95)[0]
    assert 0.5 * float((unpenalised - target).abs().sum()) > 5 * TV_BOUND  # (so the penalty was tested)
    assert (target > 0).sum() <= 6  # (and top-k)


# ---- the loop: stop conditions and length as plain decoding ---------------------------------------------


class ScriptedModel(nn.Module):
    """A stand-in model whose next token depends only on the position: script[position - prompt_len + 1].
    It answers every output (last_logits and all positions' logits) and counts its forwards, so speculation's
    verify forwards run through it exactly as through the real model."""

    def __init__(self, config: Config, script: list[int]) -> None:
        super().__init__()
        self.config, self.script = config, script
        self.anchor = nn.Parameter(torch.zeros(1))
        self.prompt_len, self.calls = 0, 0

    def forward(self, input_ids: torch.Tensor, *, start: int = 0, output: str = "logits",
                **kwargs: object) -> torch.Tensor:
        B, T = input_ids.shape
        self.calls += 1
        if start == 0:
            self.prompt_len = T
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        for t in range(T):
            step = start + t + 1 - self.prompt_len  # which new token position start + t predicts
            if step >= 0:
                logits[:, t, self.script[step] if step < len(self.script) else 0] = 0.0
        return logits[:, -1] if output == "last_logits" else logits


def random_model(config: Config) -> SmolLM2:
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    return model.eval()


PROMPT = [10, 11, 12, 13, 14, 15, 16, 17, 10, 11]
COPY = [12, 13, 14, 15, 16, 17, 10, 11, 12, 13, 14, 15, 16, 17]  # the reply continues the repeat


def both(model: ScriptedModel, prompt: list[int], **options: object) -> tuple[list[int], list[int], object]:
    plain = generate(model, prompt, **options)
    plain_tokens = list(plain)
    model.calls = 0
    spec = generate(model, prompt, speculative=SPEC, **options)
    spec_tokens = list(spec)
    assert spec.finish_reason == plain.finish_reason
    return plain_tokens, spec_tokens, spec


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 9, 14])
def test_length_limit_is_never_passed_by_an_accepted_draft(tiny_config: Config, max_new_tokens: int) -> None:
    model = ScriptedModel(tiny_config, COPY)
    plain, spec, stream = both(model, PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True)
    assert spec == plain == COPY[:max_new_tokens] and stream.finish_reason == "length"
    if max_new_tokens >= 3:
        assert stream.speculation.accepted > 0 and model.calls < max_new_tokens  # drafting did the work


@pytest.mark.parametrize("stop_at", [1, 4, 7])
def test_eos_and_stop_ids_inside_a_draft_end_as_plain(tiny_config: Config, stop_at: int) -> None:
    script = COPY[:stop_at] + [tiny_config.eos_token_id] + COPY[stop_at:]
    model = ScriptedModel(tiny_config, script)
    plain, spec, stream = both(model, PROMPT, max_new_tokens=12)
    assert spec == plain == COPY[:stop_at] and stream.finish_reason == "stop"
    # A stop id that the drafts themselves propose (14 is in the prompt): the draft stops there too.
    model = ScriptedModel(tiny_config, COPY)
    plain, spec, stream = both(model, PROMPT, max_new_tokens=12, stop=[COPY[stop_at]])
    assert spec == plain == COPY[:stop_at] and stream.finish_reason == "stop"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(require(SHARED_DATA / "smollm2-135m-instruct" / "tokenizer.json").parent)


def test_stop_strings_and_streamed_text_as_plain(tokenizer: Tokenizer) -> None:
    config = Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2)
    text = "alpha beta gamma delta epsilon zeta eta theta. alpha beta gamma delta epsilon zeta eta theta."
    ids = tokenizer.encode(text)
    half = len(ids) // 2
    prompt, script = ids[: half + 2], ids[half + 2 :]
    for stop in (["zeta"], ["ta e"], ["nothing like it"]):
        model = ScriptedModel(config, script)
        plain = stream_text(model, tokenizer, prompt, max_new_tokens=40, stop=stop, ignore_eos=True)
        plain_text = "".join(plain)
        spec = stream_text(model, tokenizer, prompt, max_new_tokens=40, stop=stop, ignore_eos=True, speculative=SPEC)
        assert "".join(spec) == plain_text and spec.new_ids == plain.new_ids, stop
        assert spec.finish_reason == plain.finish_reason and spec.speculation.accepted > 0
        assert stop[0] not in plain_text


def test_drafts_that_keep_failing_cost_few_verifies(tiny_config: Config) -> None:
    """An open-ended reply: every lookup finds a match in the prompt, and every draft is wrong. Drafting backs
    off, so nearly every token comes from a plain one-token step."""
    prompt = list(range(20, 40)) * 2
    script = [(7 * i) % 19 + 40 for i in range(100)]  # tokens 40..58: never in the prompt, rarely repeating early
    script = [20 + (i % 20) if i % 2 else s for i, s in enumerate(script)]  # every other one re-enters the prompt
    model = ScriptedModel(tiny_config, script)
    plain, spec, stream = both(model, prompt, max_new_tokens=80, ignore_eos=True)
    assert spec == plain
    assert stream.speculation.verifies <= 16, stream.speculation  # of 80 tokens


def test_sampled_speculation_is_reproducible_and_stops(tiny_config: Config) -> None:
    model = ScriptedModel(tiny_config, COPY)
    runs = [list(generate(model, PROMPT, max_new_tokens=10, temperature=0.7, seed=5, speculative=SPEC))
            for _ in range(2)]
    assert runs[0] == runs[1] == COPY[:10]  # one-hot logits: every draw is the scripted token


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_recorded_for_drafted_tokens(tiny_config: Config, temperature: float) -> None:
    model = ScriptedModel(tiny_config, COPY)
    plain, spec, stream = both(model, PROMPT, max_new_tokens=8, ignore_eos=True, logprobs=2, seed=1,
                               temperature=temperature)
    assert spec == plain == COPY[:8] and stream.speculation.accepted > 0
    assert [r.token for r in stream.logprobs] == spec and all(r.logprob == 0.0 for r in stream.logprobs)
    assert all(len(r.top) == 2 and r.top[0] == (t, 0.0) for r, t in zip(stream.logprobs, spec, strict=True))


def test_repetition_penalty_greedy_as_plain(tiny_config: Config) -> None:
    """The penalty changes the target after every accepted draft (the drafted token is then 'seen'): choosing
    position by position, after pushing the tokens before, gives plain decoding's tokens."""
    model = random_model(tiny_config)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    for penalty in (0.7, 1.3):  # < 1 makes repeats likelier: drafts get accepted
        plain = list(generate(model, prompt, max_new_tokens=30, ignore_eos=True, repetition_penalty=penalty))
        stream = generate(model, prompt, max_new_tokens=30, ignore_eos=True, repetition_penalty=penalty,
                          speculative=SPEC)
        assert list(stream) == plain, penalty
        assert stream.speculation.verifies > 0


# ---- options, batches, the eager bucketed step ---------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"speculative": "medusa"}, "speculative must be None or one of 'prompt-lookup', got 'medusa'"),
    ({"speculative": SPEC, "draft_tokens": 0}, "draft_tokens must be an integer >= 1"),
    ({"speculative": SPEC, "draft_ngram": 0}, "draft_ngram must be an integer >= 1"),
    ({"draft_tokens": 2.5}, "draft_tokens must be an integer >= 1"),
])
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GenerationConfig(**options)


def test_batches_of_several_prompts_are_refused(tiny_config: Config) -> None:
    model = ScriptedModel(tiny_config, COPY)
    with pytest.raises(ValueError, match="speculative='prompt-lookup' decodes one prompt at a time, got 2"):
        generate_batch(model, [PROMPT, PROMPT], speculative=SPEC)
    assert generate_batch(model, [PROMPT], max_new_tokens=6, speculative=SPEC) == [COPY[:6]]


def test_cli_flag_maps_to_the_config() -> None:
    from smollm2.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "hi", "--speculative", "--draft-tokens", "5"])
    assert (args.speculative, args.draft_tokens, args.draft_ngram) == (SPEC, 5, 3)
    assert parser.parse_args(["generate", "hi"]).speculative is None
    with pytest.raises(ValueError, match="draft_ngram must be an integer >= 1"):
        args = parser.parse_args(["generate", "hi", "--speculative", "--draft-ngram", "0"])
        args.run(args)  # the config is checked before the model loads


def test_mixed_with_the_bucketed_decode_step(tiny_config: Config) -> None:
    """Plain steps by a DecodeStep (the compiled step's inputs, run eagerly here) between eager verify forwards:
    the stale keys of rejected drafts in its bucketed attention window are masked, so tokens equal plain's."""
    model = random_model(tiny_config)
    step = DecodeStep(model, compile=False)
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    plain = list(generate(model, prompt, max_new_tokens=40, ignore_eos=True))
    stream = generate(model, prompt, max_new_tokens=40, ignore_eos=True, step=step, speculative=SPEC)
    assert list(stream) == plain
    assert stream.speculation.verifies > 0 and stream.speculation.drafted > stream.speculation.accepted


# ---- the real weights -----------------------------------------------------------------------------------

GROUNDED = (
    "Repeat this text exactly: The Great Barrier Reef is the world's largest coral reef system, composed of over "
    "2,900 individual reefs and 900 islands stretching for over 2,300 kilometres.",
    "Rename the function `average` to `mean` and return the whole code:\n\n```python\ndef average(values):\n"
    "    total = 0\n    for value in values:\n        total = total + value\n    return total / len(values)\n```",
)


def chat_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True)


@pytest.mark.slow
def test_real_weights_greedy_tokens_identical_with_drafts_accepted(real) -> None:
    model, tokenizer = real
    for text in GROUNDED:
        ids = chat_ids(tokenizer, text)
        plain = list(smollm2.generate(model, ids, tokenizer=tokenizer, max_new_tokens=48))
        stream = smollm2.generate(model, ids, tokenizer=tokenizer, max_new_tokens=48, speculative=SPEC)
        assert list(stream) == plain, text
        stats = stream.speculation
        assert stats.accepted >= len(plain) // 3, (text, stats)  # most of the reply came from drafts


@pytest.mark.slow
def test_real_weights_int4(real_int4) -> None:
    model, tokenizer = real_int4
    ids = chat_ids(tokenizer, GROUNDED[0])
    plain = list(smollm2.generate(model, ids, tokenizer=tokenizer, max_new_tokens=40))
    stream = smollm2.generate(model, ids, tokenizer=tokenizer, max_new_tokens=40, speculative=SPEC)
    assert list(stream) == plain
    assert stream.speculation.accepted >= len(plain) // 3
