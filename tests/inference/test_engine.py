"""The batching engine (smollm2/engine.py) without weights: a tiny random model and a byte tokenizer, so every
test runs in seconds and can choose its stop strings (nanochat's tests/test_engine.py does the same).

Every request the engine runs must come out as `generate` gives it alone: the engine's rows share one cache
and one decode step, and requests join, finish, are cancelled and move between rows while others run."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import pytest
import torch

from smollm2.config import Config
from smollm2.inference.engine import Engine, Job, QueueFull
from smollm2.inference.generate import GenerationConfig, generate, stream_text
from smollm2.model import SmolLM2

TIMEOUT = 60  # seconds a test waits for its requests before failing (they take well under one)


class ByteTokenizer:
    """Token id = byte value, for a 256-token vocabulary: every token is one byte of UTF-8 text."""

    eos_id = None

    def encode(self, text: str, **_: object) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(ids)

    def decode(self, ids: Sequence[int], **_: object) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture
def model(tiny_config: Config) -> SmolLM2:
    model = SmolLM2(tiny_config)
    model.init_weights()
    return model.eval()


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


class Result:
    """What one request's on_event callback saw."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.reason: str | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def on_event(self, kind: str, value: object) -> None:
        if kind == "text":
            self.pieces.append(str(value))
        elif kind == "done":
            self.reason = str(value)
            self.done.set()
        else:
            self.error = str(value)
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def run_all(engine: Engine, requests: list[tuple[list[int], GenerationConfig]],
            timeout: float = TIMEOUT) -> list[tuple[Job, Result]]:
    """Submit every request at once and wait until all are done."""
    results = []
    for prompt, config in requests:
        result = Result()
        results.append((engine.submit(prompt, config, result.on_event), result))
    for _, result in results:
        assert result.done.wait(timeout), "a request did not finish"
        assert result.error is None, result.error
    return results


@pytest.fixture
def engine_of(model: SmolLM2, tokenizer: ByteTokenizer):
    engines = []

    def make(**options: object) -> Engine:
        engine = Engine(model, tokenizer, **options)
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


def alone(model: SmolLM2, tokenizer: ByteTokenizer, prompt: list[int], config: GenerationConfig):
    """(new ids, text, finish reason) of the request run by itself through stream_text."""
    stream = stream_text(model, tokenizer, prompt, config=config)
    text = "".join(stream)
    return stream.new_ids, text, stream.finish_reason


def prompts_of(lengths: Sequence[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def test_more_requests_than_rows_each_as_alone(model, tokenizer, engine_of) -> None:
    """7 prompts of different lengths and lengths of reply through 2 rows: they wait, take freed rows (which
    moves the last row into the freed one) and the timeline is compacted and grown; each comes out as alone."""
    engine = engine_of(max_batch=2, context_length=96, prefill_chunk=8)
    requests = [(p, GenerationConfig(max_new_tokens=n, ignore_eos=True))
                for p, n in zip(prompts_of([3, 11, 1, 7, 20, 5, 2]), [9, 4, 17, 30, 6, 12, 25], strict=True)]
    for (prompt, config), (job, result) in zip(requests, run_all(engine, requests), strict=True):
        ids, text, reason = alone(model, tokenizer, prompt, config)
        assert job.new_ids == ids and result.text == text and result.reason == reason == "length"
    assert engine.stats()["peak_batch"] == 2 and engine.stats()["completed"] == len(requests)
    assert engine.stats()["generated_tokens"] == sum(c.max_new_tokens for _, c in requests)


def test_prompts_are_prefilled_in_the_same_chunks_whatever_else_waits(model, tokenizer, engine_of) -> None:
    """A prompt is prefilled in chunks of prefill_chunk tokens from its start, however much of a turn's
    budget the prompts before it used: a chunk's length changes the rounding of its attention, so cutting a
    chunk to fit the budget would make a reply depend on the other requests. (Before, a burst of 5-token
    prompts with a budget of 8 cut the second one into 3 + 2.)"""
    chunks: list[tuple[int, int]] = []

    def record(module, args, kwargs) -> None:
        if "attention_mask" not in kwargs:  # a prefill chunk (decode steps pass a mask)
            chunks.append((int(kwargs["start"]), args[0].shape[1]))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = prompts_of([5, 5, 5, 13, 3], seed=2)
        config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
        engine = engine_of(max_batch=5, prefill_chunk=8, prefix_cache_mb=0)
        done = run_all(engine, [(p, config) for p in prompts])
    finally:
        handle.remove()
    expected = sorted((start, min(8, len(p) - start)) for p in prompts for start in range(0, len(p), 8))
    assert sorted(chunks) == expected
    for prompt, (job, _) in zip(prompts, done, strict=True):
        assert job.new_ids == alone(model, tokenizer, prompt, config)[0]


def test_stop_strings_end_only_their_own_row(model, tokenizer, engine_of) -> None:
    """Each request has its own stop string, taken from the middle of what it generates alone: its text is
    cut there and it finishes with "stop", while the rows beside it run on."""
    prompts = prompts_of([4, 6, 9], seed=1)
    plain = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    texts = [alone(model, tokenizer, p, plain)[1] for p in prompts]
    requests = []
    for prompt, text in zip(prompts, texts, strict=True):
        stop = next((text[i : i + 2] for i in range(6, len(text) - 2) if text[i : i + 2].isprintable()), None)
        if stop is None:
            pytest.skip("the random model's text has no printable pair to stop at")
        requests.append((prompt, GenerationConfig(max_new_tokens=24, ignore_eos=True, stop=(stop,))))
    requests.append((prompts[0], plain))  # and one without a stop string
    engine = engine_of(max_batch=4)
    for (prompt, config), (job, result) in zip(requests, run_all(engine, requests), strict=True):
        ids, text, reason = alone(model, tokenizer, prompt, config)
        assert (job.new_ids, result.text, result.reason) == (ids, text, reason)
        if config.stop_strings:
            assert reason == "stop" and config.stop_strings[0] not in text
    assert requests[-1][1].stop == () and run_all(engine, [requests[-1]])[0][1].reason == "length"


def test_stop_tokens_are_not_output(model, tokenizer, engine_of) -> None:
    prompt = prompts_of([5], seed=2)[0]
    ids, _, _ = alone(model, tokenizer, prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True))
    stop_id = ids[5]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, stop=(stop_id,))
    (job, result), = run_all(engine_of(), [(prompt, config)])
    assert job.new_ids == ids[: ids.index(stop_id)] and result.reason == "stop"


def test_repetition_penalty_and_seeded_sampling_as_alone(model, tokenizer, engine_of) -> None:
    """The engine now takes repetition_penalty (it refused it before it shared generate's per-row state), and a
    seed reproduces a sampled reply, with other requests in the batch or not."""
    prompts = prompts_of([6, 3, 8], seed=3)
    configs = [GenerationConfig(max_new_tokens=16, ignore_eos=True, repetition_penalty=1.5),
               GenerationConfig(max_new_tokens=16, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7),
               GenerationConfig(max_new_tokens=16, ignore_eos=True, temperature=1.2, seed=11,
                                repetition_penalty=1.3)]
    requests = list(zip(prompts, configs, strict=True))
    for (prompt, config), (job, _) in zip(requests, run_all(engine_of(max_batch=3), requests), strict=True):
        assert job.new_ids == list(generate(model, prompt, config=config))
    penalised = list(generate(model, prompts[0], config=configs[0]))
    assert penalised != list(generate(model, prompts[0], max_new_tokens=16, ignore_eos=True))  # it does act


def test_cancelled_request_frees_its_row(model, tokenizer, engine_of) -> None:
    """A request cancelled while it runs stops within a step; the others' replies are not disturbed."""
    engine = engine_of(max_batch=2)
    prompts = prompts_of([5, 7, 4], seed=4)
    long = GenerationConfig(max_new_tokens=100, ignore_eos=True)
    short = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    victim, victim_result = Result(), threading.Event()

    def on_event(kind: str, value: object) -> None:
        victim.on_event(kind, value)
        if kind == "text" and len(victim.pieces) == 3:
            victim_result.set()

    job = engine.submit(prompts[0], long, on_event)
    assert victim_result.wait(TIMEOUT)
    engine.cancel(job)
    others = run_all(engine, [(prompts[1], short), (prompts[2], short)])
    for prompt, (other, result) in zip(prompts[1:], others, strict=True):
        assert other.new_ids == alone(model, tokenizer, prompt, short)[0] and result.reason == "length"
    assert job.cancelled and job.finish_reason is None and len(job.new_ids) < 100
    assert engine.stats()["cancelled"] == 1 and engine.stats()["active"] == 0


def test_queue_limit_and_bad_requests(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    config = GenerationConfig(max_new_tokens=4)
    engine.submit([5, 6], config, lambda kind, value: None)
    engine.submit([5, 6], config, lambda kind, value: None)
    with pytest.raises(QueueFull, match="slots are busy"):
        engine.submit([5, 6], config, lambda kind, value: None)
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit([], config, lambda kind, value: None)
    with pytest.raises(ValueError, match="exceeds the context length of 128"):
        engine.submit([5] * 126, config, lambda kind, value: None)
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Engine(model, tokenizer, max_batch=0)


def test_compiled_step_in_the_engine(model, tokenizer) -> None:
    """With the model's compiled step (load(compile=True) attaches it), the engine decodes through it: the
    same greedy tokens as the eager generate, for rows joining a running batch (batch sizes 1 to 3), with no
    compile after warm_up() (the server's start) built the step's graphs (one; two for the float32 model
    whose matrix-vector linears choose their kernel by the number of rows)."""
    from torch._dynamo.utils import counters

    from smollm2.inference.compiled_step import compile_decoding

    prompts = prompts_of([4, 9, 2], seed=5)
    config = GenerationConfig(max_new_tokens=20, ignore_eos=True)
    expected = [alone(model, tokenizer, p, config)[0] for p in prompts]
    compile_decoding(model)
    graphs = 1 if model.compiled_step.one_graph else 2
    requests = [(p, config) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=3)
    counters.clear()
    # (compiling takes ~20-60 s a graph, minutes on a busy machine)
    assert engine.warm_up() > 0
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    engine.start()
    try:
        got = [job.new_ids for job, _ in run_all(engine, requests, timeout=900)]
    finally:
        engine.shutdown()
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])  # no compile while serving
    assert model.compiled_step.compile_seconds is not None  # it did run
    assert got == expected


def test_quantised_compiled_engine_equals_generate_alone(tiny_config, tokenizer) -> None:
    """int4, compiled (the server's default): each request's tokens from the engine, whose batch grows from 1
    to 3 rows and shrinks as they finish, equal `generate`'s for it alone through the same step (one graph
    for every batch size: the same bits in any batch, tests/inference/test_compiled_step.py)."""
    from smollm2.inference.compiled_step import compile_decoding
    from smollm2.quant.quantize import quantize_model

    # 4 layers of 256 (head_dim 64, our attention kernel where built) and long replies: in a smaller model the
    # int8 activations absorb the rounding differences this test is for
    config = dataclasses.replace(tiny_config, hidden_size=256, num_hidden_layers=4, max_position_embeddings=512)
    torch.manual_seed(0)
    base = SmolLM2(config)
    base.init_weights()
    int4 = compile_decoding(quantize_model(base.eval(), "int4"))
    assert int4.compiled_step.one_graph
    prompts = prompts_of([4, 9, 2, 13], seed=6)
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (150, 40, 100, 200)]
    with torch.inference_mode():  # as on the engine's thread (the compiled graph guards on it)
        expected = [alone(int4, tokenizer, p, c)[0] for p, c in zip(prompts, configs, strict=True)]
    engine = Engine(int4, tokenizer, max_batch=3)
    engine.start()
    try:
        got = [job.new_ids for job, _ in run_all(engine, list(zip(prompts, configs, strict=True)), timeout=900)]
    finally:
        engine.shutdown()
    assert got == expected
