"""Continuous batching: the requests in flight decode together, one token each per model call.

The server hands each request to `Engine.submit` and gets its text back through a callback. One thread owns
the model and loops: it prefills waiting requests (at most prefill_chunk prompt tokens per turn, so a long
prompt does not stall the others for long), then runs one decode step for every active request at once.
On a CPU a decode step at batch 1 reads every weight for one token; at batch 16 it reads them once for
sixteen, so N clients get far more tokens per second in total than one (vLLM's "continuous batching";
Yu et al. 2022, "Orca", for the iteration-level scheduling idea).

How rows of different lengths share one static KV cache (kv_cache.py): the cache has one row per slot and a
shared timeline of columns; every decode step writes column T for all rows and then T += 1. A request's
prompt is prefilled on its own into a batch-1 scratch cache, then its keys/values are copied into a free row
so that they end at column max(T, prompt length), and the timeline moves there. Each row attends only to its
own columns (`attention_mask`, 1 = this row's token), and its RoPE positions count its own tokens
(`positions`), so a row computes what it would compute alone: the columns are only storage. Hence:
  * rows are kept packed at 0..n-1 (a finished row is replaced by the last one), so a step runs n rows only;
  * the timeline is reset to 0 when the batch drains, and shifted left (compacted) when the columns before
    every row's first one are free and the room is needed; the cache grows (doubling its rows up to
    max_batch and its columns up to the context length) only when that is not enough, so memory follows
    the load; and once the engine has been idle (no request active or waiting) for idle_release_s seconds,
    the cache is freed, so a burst's memory goes back to the system when the load goes;
  * a request is placed only when every active row, itself included, can run to its max_new_tokens within
    the cache, so a step never runs out of room; otherwise it waits for rows to finish.

A prompt that begins as an earlier one did (the same system prompt, a conversation re-sent with one more
turn) starts its prefill after the longest cached run of blocks of that beginning: prefix_cache.py keeps the
keys/values of the prompts prefilled, within a memory bound (prefix_cache_mb).

Each request is a `stopping.SequenceState`, as each row of `generate` is: the same stop tokens, stop strings,
length limit, streamed text and repetition penalty. Greedy (temperature 0) results equal those of
`generate.generate` for the same request alone, up to float rounding of batched matmuls (tests check
token-for-token equality). Sampling draws from one torch.Generator per request, seeded like generate's, so a
seed reproduces a sampled reply.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFIX_CACHE_MB
from ..kv_cache import KVCache, LayerCache
from .config import GenerationConfig, check_int
from .generate import StepFn, step_for, stop_token_ids
from .prefix_cache import PrefixCache
from .stopping import SequenceState, next_tokens

if TYPE_CHECKING:
    from ..model import SmolLM2
    from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Seconds without any request after which the KV cache is freed (a burst of 32 long requests grows it to GBs).
IDLE_RELEASE_S = 5.0

def _return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim). The cache's tensors are allocated on the
    engine thread, from its own malloc arena, which glibc does not shrink by itself: without this the RSS stays
    at the burst's peak although the memory is free. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# on_event(kind, value): ("text", str) a piece of the reply; ("done", "stop" | "length") the end;
# ("error", str) generation failed. Called on the engine's thread: it must return quickly and not block.
OnEvent = Callable[[str, object], None]

# Requests decoded together (DEFAULT_MAX_BATCH) and waiting for a row before new ones get 429 (DEFAULT_MAX_QUEUE),
# in defaults.py. On the shared 2-core dev machine, 64 streams of 64 tokens (benchmarks/load_test.py) ran at 41
# tokens/s in total with 16 rows, 53 with 32 and 66 with 64; but each row costs KV-cache memory (46 KB per token
# in fp32), so 32 full 8k contexts would take 12 GB.


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full: the server answers 429."""


class Job(SequenceState):
    """One request: its SequenceState (prompt, new ids, text, finish reason), its consumer and its timing.

    The state belongs to the engine thread; read it after "done". `cancelled` may be set from any thread
    (Engine.cancel): the engine drops the job at its next step, and its finish_reason stays None.
    """

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, on_event: OnEvent, *,
                 stop_ids: frozenset[int], tokenizer: Tokenizer, device: torch.device, vocab_size: int) -> None:
        super().__init__(prompt_ids, config, stop_ids, tokenizer, device, vocab_size)
        self.on_event = on_event
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.begin = 0  # the cache column of the first prompt token, once the job has a row
        self.cached_tokens = 0  # prompt tokens whose keys/values came from the prefix cache

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled


@dataclass
class _Prefill:
    """The request being prefilled, chunk by chunk, into a batch-1 scratch cache."""

    job: Job
    cache: KVCache
    filled: int = 0  # prompt tokens already in the scratch cache


class Engine:
    """Runs many generation requests together on one model, in a background thread.

    max_batch: requests decoded together (cache rows). max_queue: requests that may wait for a row; beyond
    that `submit` raises QueueFull at once. context_length: the longest prompt + max_new_tokens accepted
    (default: the model's). prefill_chunk: prompt tokens prefilled per turn, between two decode steps.
    step: the decode step (a generate.StepFn); None = the model's compiled step where `load(compile=True)` made
    one, else `generate.decode_step`. prefix_cache_mb: memory for the keys/values of prompt beginnings already
    prefilled, which later prompts that begin the same way reuse (prefix_cache.py); 0 = off. The cache assumes
    the model's weights do not change while the engine runs. idle_release_s: seconds idle after which the
    KV cache (sized by the last burst) is freed; the next request allocates a small one again.
    """

    def __init__(
        self,
        model: SmolLM2,
        tokenizer: Tokenizer,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        context_length: int | None = None,
        prefill_chunk: int = 256,
        step: StepFn | None = None,
        prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB,
        idle_release_s: float = IDLE_RELEASE_S,
    ) -> None:
        limit = model.config.max_position_embeddings
        for name, value, minimum in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                                     ("prefill_chunk", prefill_chunk, 1), ("prefix_cache_mb", prefix_cache_mb, 0)):
            check_int(name, value, minimum=minimum)
        if context_length is not None and not 2 <= context_length <= limit:
            raise ValueError(f"context_length must be between 2 and the model's {limit}, got {context_length}")
        self.model, self.tokenizer, self.step = model, tokenizer, step_for(model, step)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.context_length = context_length or limit
        if not idle_release_s > 0:
            raise ValueError(f"idle_release_s must be a positive number of seconds, got {idle_release_s!r}")
        self.idle_release_s = idle_release_s
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

        self._wake = threading.Condition()  # guards _waiting and _stopping; notified on submit/cancel/stop
        self._waiting: deque[Job] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Owned by the engine thread (read without the lock only for stats):
        self._prefill: _Prefill | None = None
        self._rows: list[Job] = []  # the active jobs; cache row i holds self._rows[i]
        self._cache: KVCache | None = None  # (rows, columns), allocated on first use and grown as needed
        self._views: dict[int, KVCache] = {}  # n -> the cache's first n rows
        self._mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)  # (rows, columns), True = the row's
        self._T = 0  # the next column every row writes
        self.counters = {"completed": 0, "cancelled": 0, "generated_tokens": 0, "peak_batch": 0}

    # ---- the caller's side (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smollm2-engine", daemon=True)
            self._thread.start()

    def warm_up(self) -> float:
        """Run the decode step once for one row and once for two, on a scratch cache, before any request. A
        compiled step (`smollm2 serve`'s default) then builds its graph (two for a float32 model: one row, one
        for every larger batch) here, so the first requests do not wait for a compile (minutes on 2 cores the
        first time, seconds from inductor's on-disk cache after). Nothing is kept; the eager step just runs.
        Returns the seconds."""
        if self._thread is not None:
            raise RuntimeError("warm_up() runs before start(): the engine thread owns the step once started")
        t0 = time.perf_counter()
        with torch.inference_mode():  # as on the engine thread: a compiled graph guards on the tensors' mode
            columns = min(self.context_length, 256)  # the engine's smallest cache (_grow)
            scratch = KVCache(self.model.config, 2, columns, self.dtype, self.device)
            for rows in (1, 2):  # the first rows of a bigger cache, as the engine's views are
                view = KVCache.from_layers([LayerCache(layer.k[:rows], layer.v[:rows]) for layer in scratch.layers])
                tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
                positions = torch.ones(rows, 1, dtype=torch.long, device=self.device)
                mask = torch.ones(rows, 2, dtype=torch.bool, device=self.device)
                self.step(self.model, tokens, view, 1, positions, mask)
        return time.perf_counter() - t0

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; jobs still waiting or running are cancelled (the server drains them first)."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig, on_event: OnEvent) -> Job:
        """Queue a request; raise QueueFull when max_batch + max_queue requests are already in."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: generation needs at least one token")
        if len(prompt) + config.max_new_tokens > self.context_length:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={config.max_new_tokens} exceeds "
                             f"the context length of {self.context_length}")
        job = Job(prompt, config, on_event, stop_ids=frozenset(stop_token_ids(config, self.model, self.tokenizer)),
                  tokenizer=self.tokenizer, device=self.device, vocab_size=self.model.config.vocab_size)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            in_flight = len(self._waiting) + len(self._rows) + (self._prefill is not None)
            if in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"all {self.max_batch} slots are busy and {len(self._waiting)} requests are "
                                "waiting; try again later")
            self._waiting.append(job)
            self._wake.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (its client went away); its slot is free after the engine's current step."""
        if job.finish_reason is None and not job.cancelled:
            job.cancelled = True
            with self._wake:
                self._wake.notify_all()

    def stats(self) -> dict[str, int]:
        return {"active": len(self._rows) + (self._prefill is not None), "waiting": len(self._waiting),
                "max_batch": self.max_batch, "max_queue": self.max_queue, **self.counters,
                **(self.prefix_cache.stats() if self.prefix_cache is not None else {})}

    # ---- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    for job in [j for j in self._waiting if j.cancelled]:
                        self._waiting.remove(job)
                        self.counters["cancelled"] += 1
                    while not (self._stopping or self._waiting or self._rows or self._prefill):
                        if self._cache is None:
                            self._wake.wait()
                        elif not self._wake.wait(timeout=self.idle_release_s):
                            self._free_cache()  # idle that long: the burst is over
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._rows:
                        self._decode_step()
                except Exception as e:  # a bug must not leave every client waiting forever
                    log.exception("generation failed")
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            self._fail_all("the server is shutting down", cancelled=True)

    def _admit(self) -> None:
        """Prefill waiting requests, up to prefill_chunk prompt tokens per engine step, and give them rows.

        The budget bounds how long the active rows wait for their next token; within it, several short
        prompts are prefilled back to back rather than one per decode step, so a burst of requests gets its
        first tokens sooner.
        """
        budget = self.prefill_chunk
        while budget > 0:
            if self._prefill is None:
                with self._wake:
                    if not self._waiting or len(self._rows) >= self.max_batch:
                        return
                    job = self._waiting.popleft()
                scratch = KVCache(self.model.config, 1, len(job.prompt_ids), self.dtype, self.device)
                self._prefill = _Prefill(job, scratch)
                if self.prefix_cache is not None:  # start after the longest cached beginning (one token left)
                    hit = self.prefix_cache.lookup(job.prompt_ids, limit=len(job.prompt_ids) - 1)
                    self.prefix_cache.restore(hit, scratch)
                    self._prefill.filled = job.cached_tokens = hit.tokens
            budget -= self._prefill_step(self._prefill, budget)
            if self._prefill is not None:  # its prompt is not done (the budget is spent), or it waits for room
                return

    def _prefill_step(self, p: _Prefill, budget: int) -> int:
        """Prefill up to budget more tokens of p's prompt; after the last, sample the first new token and give
        the job a row. Returns the number of prompt tokens run."""
        job = p.job
        if job.cancelled:
            self._prefill = None
            self.counters["cancelled"] += 1
            return 0
        P, start = len(job.prompt_ids), p.filled
        if start < P:
            # Chunks of prefill_chunk tokens from where the prefill starts, never cut shorter to fit what is left
            # of this turn's budget (a chunk that does not fit waits for the next turn): a chunk's length changes
            # the rounding of its attention, so a prompt is prefilled the same way whatever else is waiting, and
            # a reply does not depend on the other requests (the load test's twins).
            end = min(P, start + self.prefill_chunk)
            if end - start > budget:
                return 0
            ids = torch.tensor([job.prompt_ids[start:end]], device=self.device)  # (1, chunk)
            logits = self.model(ids, cache=p.cache, start=start, output="last_logits")  # (1, vocab)
            p.filled = end
            if end < P:
                return end - start
            if self.prefix_cache is not None:
                self.prefix_cache.insert(job.prompt_ids, p.cache)
            self._advance(job, job.next_token(logits))
            if job.done:
                self._prefill = None
                return end - start
        if self._place(job, p.cache):  # else: no room until some rows finish; try again after the next step
            self._prefill = None
        return p.filled - start

    def _place(self, job: Job, scratch: KVCache) -> bool:
        """Copy a prefilled job's keys/values into the next free row, ending at column max(T, prompt length)."""
        P, row = len(job.prompt_ids), len(self._rows)
        need = max([job.remaining] + [r.remaining for r in self._rows])  # decode steps until all may finish

        def fits() -> bool:
            rows, columns = (self._cache.batch_size, self._cache.max_len) if self._cache is not None else (0, 0)
            return row < rows and max(self._T, P) + need <= columns

        if not fits():
            self._compact()
        if not fits():
            self._grow(row + 1, max(self._T, P) + need)
        if not fits():
            return False
        end = max(self._T, P)
        for layer, new in zip(self._cache.layers, scratch.layers, strict=True):
            layer.k[row, :, end - P : end] = new.k[0]
            layer.v[row, :, end - P : end] = new.v[0]
        self._mask[row] = False
        self._mask[row, end - P : end] = True
        job.begin, self._T = end - P, end
        self._rows.append(job)
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(self._rows))
        return True

    def _decode_step(self) -> None:
        """One token for every active row."""
        n, T = len(self._rows), self._T
        tokens = torch.tensor([[job.new_ids[-1]] for job in self._rows], device=self.device)  # (n, 1)
        # RoPE position of the token fed now: the row's prompt plus the tokens generated before it.
        positions = torch.tensor([[len(job.prompt_ids) + len(job.new_ids) - 1] for job in self._rows],
                                 device=self.device)  # (n, 1)
        self._mask[:n, T] = True
        logits = self.step(self.model, tokens, self._view(n), T, positions, self._mask[:n, : T + 1])  # (n, V)
        self._T = T + 1
        for job, token in zip(self._rows, next_tokens(self._rows, logits), strict=True):
            if not job.cancelled:
                self._advance(job, token)
        for i in reversed(range(n)):
            if self._rows[i].done:
                if self._rows[i].cancelled:
                    self.counters["cancelled"] += 1
                self._release(i)

    def _advance(self, job: Job, token: int) -> None:
        """Record a job's new token (SequenceState.push): emit its text, and "done" when the job finished."""
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        kept = len(job.new_ids)
        text = job.push(token)
        self.counters["generated_tokens"] += len(job.new_ids) - kept
        self._emit(job, "text", text)
        if job.finish_reason is not None:
            self.counters["completed"] += 1
            self._emit(job, "done", job.finish_reason)

    def _emit(self, job: Job, kind: str, value: object) -> None:
        if kind == "text" and not value:
            return
        try:
            job.on_event(kind, value)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
            log.debug("dropping a job whose consumer failed", exc_info=True)
            job.cancelled = True

    def _fail_all(self, message: str, cancelled: bool = False) -> None:
        with self._wake:
            jobs = list(self._waiting) + self._rows + ([self._prefill.job] if self._prefill else [])
            self._waiting.clear()
        for job in jobs:
            if not job.done:
                job.cancelled = cancelled
                self._emit(job, "error", message)
        self._rows, self._prefill, self._T = [], None, 0
        self._mask.zero_()

    # ---- the cache rows and columns ------------------------------------------------------------------------

    def _view(self, n: int) -> KVCache:
        """The first n rows of the cache, as a KVCache whose writes land in the full one.

        Views are kept (until the cache is reallocated), so a step sees the same tensors for the same n: a
        compiled decode step can then reuse what it marked or captured for them.
        """
        if n not in self._views:
            self._views[n] = KVCache.from_layers([LayerCache(layer.k[:n], layer.v[:n]) for layer in self._cache.layers])
        return self._views[n]

    def _release(self, i: int) -> None:
        """Free row i by moving the last row into it, so that the active rows stay 0..n-1."""
        last = len(self._rows) - 1
        if i != last:
            begin, T = self._rows[last].begin, self._T
            for layer in self._cache.layers:
                layer.k[i, :, begin:T] = layer.k[last, :, begin:T]
                layer.v[i, :, begin:T] = layer.v[last, :, begin:T]
            self._mask[i] = self._mask[last]
            self._rows[i] = self._rows[last]
        self._rows.pop()
        self._mask[last] = False
        if not self._rows:
            self._T = 0  # the batch drained: the timeline starts over

    def _compact(self) -> None:
        """Shift every row left by the number of leading columns that no active row uses."""
        if not self._rows:
            self._T = 0
            return
        shift, n, T = min(job.begin for job in self._rows), len(self._rows), self._T
        if shift == 0:
            return
        for layer in self._cache.layers:
            layer.k[:n, :, : T - shift] = layer.k[:n, :, shift:T].clone()  # clone: the ranges overlap
            layer.v[:n, :, : T - shift] = layer.v[:n, :, shift:T].clone()
        self._mask[:n, : T - shift] = self._mask[:n, shift:T].clone()
        self._mask[:, T - shift : T] = False
        for job in self._rows:
            job.begin -= shift
        self._T = T - shift

    def _free_cache(self) -> None:
        """Drop the (empty) KV cache: its tensors are freed and a later request allocates what it needs."""
        rows, columns = self._cache.batch_size, self._cache.max_len
        self._cache, self._views, self._T = None, {}, 0
        self._mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        _return_freed_memory()
        log.debug("idle for %g s: KV cache of %d rows x %d columns freed", self.idle_release_s, rows, columns)

    def _grow(self, rows: int, columns: int) -> None:
        """Reallocate the cache with at least `rows` rows and `columns` columns.

        Each dimension doubles when it grows (at most max_batch rows and the context length in columns), so
        memory follows the load: a single long request holds one row, not max_batch rows, of the context.
        """
        old_rows, old_columns = (self._cache.batch_size, self._cache.max_len) if self._cache is not None else (0, 0)
        new_rows = min(self.max_batch, max(rows, 2 * old_rows)) if rows > old_rows else old_rows
        new_columns = (min(self.context_length, max(columns, 2 * old_columns, 256)) if columns > old_columns
                       else old_columns)
        if (new_rows, new_columns) == (old_rows, old_columns):
            return
        cache = KVCache(self.model.config, new_rows, new_columns, self.dtype, self.device)
        mask = torch.zeros(new_rows, new_columns, dtype=torch.bool, device=self.device)
        if self._cache is not None:
            for new, layer in zip(cache.layers, self._cache.layers, strict=True):
                new.k[:old_rows, :, :old_columns] = layer.k
                new.v[:old_rows, :, :old_columns] = layer.v
            mask[:old_rows, :old_columns] = self._mask
        self._cache, self._mask, self._views = cache, mask, {}
        log.debug("KV cache grown to %d rows x %d columns", new_rows, new_columns)
