"""The decode step: one new token per row through the model's own forward, optionally compiled.

    model, tokenizer = smollm2.load(quantize="int4", compile=True)   # the switch: see `compile_decoding`
    smollm2.generate(model, ids)                                      # decodes with model.compiled_step

There is one forward (`SmolLM2.forward`); this module only prepares its inputs so that one compiled graph
serves every step, and makes the speed choices that the model then runs through its own modules.

Decoding one token on a CPU costs three things: reading every weight once (see quantize.py), attending over
the cache, and the Python and dispatch overhead of ~400 small ops (30 layers x ~13). Eager PyTorch spends
~6.5 ms per token on the overhead alone, more than the int4 matmuls. `DecodeStep(model, compile=True)`:

* `torch.compile(fullgraph=True)` traces the model's forward for one token (30 blocks and the output
  projection) into one graph; inductor fuses the norms, rotary embedding and residual adds into a few C++
  loops per block and calls the matmul kernels directly.
* The step's inputs are tensors only: the cache slot is a one-element int64 tensor (gpt-fast's `input_pos`),
  never a Python int, so one graph serves every position and nothing calls `.item()`.
* Attention reads the cache only up to the current length rounded up to a bucket of 64 positions: the
  attention mask passed to the forward is that wide, and the forward reads as many cache positions as the
  mask is wide. Attending over the whole preallocated cache instead costs ~0.3 ms per layer at 512 positions
  and grows with the cache. The mask width is an "unbacked" dynamic size and the cache length is dynamic, so
  one compiled graph serves every bucket of every cache: no recompile every 64 tokens nor for a new prompt.
* The batch size is unbacked too: the same graph runs one row and sixty-four, so a row's logits are the same
  bits whatever batch it decodes in (`generate` alone, `generate_batch`, the server's batches that grow and
  shrink). Inductor's code for a batch of one, traced on its own, rounds differently (~1 logit in int4, where
  int8 activations turn float differences into rounding steps) and is a few % faster at one row (BENCHMARKS.md).
  The float32 model's matrix-vector linears choose their kernel by the number of rows, so that model keeps a
  graph for one row and a second for every larger batch (`one_graph` False).
* The compiled wrapper's per-call size and stride assertions are turned off (`size_asserts`): ~5% of an
  int4 step. The inputs' shapes are the ones traced: the step builds them itself.
* Dynamo's guards on the model's modules and parameters are skipped (`guard_filter_fn`): checking them costs
  ~1 ms per call. So the model must not be changed (reloaded, re-quantised) after the step is built.
* Compiling takes ~20-60 s for 30 layers the first time; inductor's caches (on by default, under
  /tmp/torchinductor_$USER) bring a repeat in a new process down to a few seconds (BENCHMARKS.md has the
  measured times). `compile_seconds` holds the time the first call took.

`compile_decoding(model)` also makes two speed choices through the model's modules, once: attention at one
token by our kernel (`kernels.decode_attention`, flash-decoding chunks; ~0.5-1 ms less per token than SDPA at
576 positions) where it is built and the shapes fit, and the float32 model's linears at one row by our
matrix-vector kernel (`kernels.f32_mv`, which takes inductor's zero-stride activations without ATen's copy:
~6% of an fp32 step). Both give the plain model's logits to float rounding, not to the bit, which is why a
model as loaded keeps SDPA and torch's linears: `compare` proves that one equal to transformers.

Threads: with torch's default 2+ threads, OpenMP workers spin between parallel regions. On a machine whose
cores are busy with other work that spinning can make every step many times slower; OMP_WAIT_POLICY=passive
(set before Python starts) or torch.set_num_threads(1) avoids it there. On an idle machine the default is fastest.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from ..kv_cache import KVCache, LayerCache
from ..model import Attention, SmolLM2, sdpa_attention
from ..quant import kernels

BUCKET = 64  # attention length granularity, in cache positions


def bucketed_length(filled: int, max_len: int, bucket: int = BUCKET) -> int:
    """filled rounded up to a multiple of bucket, at most max_len."""
    return min(-(-filled // bucket) * bucket, max_len)


# ---- the speed choices, made once through the model's modules --------------------------------------------


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention by our one-token kernel for a decode step with a mask (the compiled step's), SDPA otherwise."""
    if q.shape[2] == 1 and mask is not None:
        return torch.ops.smollm2.decode_attention(q, k, v, mask[:, 0, 0])  # mask (B, 1, 1, S) -> (B, S)
    return sdpa_attention(q, k, v, mask)


class MatVecLinear(nn.Linear):
    """A float32 nn.Linear (same parameter, same state-dict keys) that runs one row through our matrix-vector
    kernel: it reads the activations as inductor lays them out, where ATen's `mm` first copies them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return super().forward(x)
        return torch.ops.smollm2.f32_mv(x.reshape(1, -1), self.weight).view(*x.shape[:-1], self.out_features)


def use_fast_modules(model: SmolLM2) -> SmolLM2:
    """Our decode-attention kernel and (float32 model) matrix-vector linears, where they are built and fit."""
    param = next(model.parameters())
    config = model.config
    if kernels.decode_attention_supported(config.num_attention_heads, config.num_key_value_heads,
                                          config.head_dim, param.dtype, param.device):
        for module in model.modules():
            if isinstance(module, Attention):
                module.attention = kernel_attention
    if param.dtype == torch.float32 and param.device.type == "cpu" and kernels.available():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if (type(child) is nn.Linear and child.bias is None and child.weight.dtype == torch.float32
                        and kernels.f32_mv_fits(child.weight)):
                    fast = MatVecLinear(child.in_features, child.out_features, bias=False, device="meta")
                    fast.weight = child.weight  # the same Parameter: a tied output projection stays tied
                    setattr(parent, name, fast)
    return model


def compile_decoding(model: SmolLM2, *, max_autotune: bool = False) -> SmolLM2:
    """The fast path, in place: the speed choices above, then `model.compiled_step`, which `generate`,
    `generate_batch`, the engine and the server use. The first decode step compiles (see the docstring)."""
    use_fast_modules(model.eval())
    model.compiled_step = DecodeStep(model, compile=True, max_autotune=max_autotune)
    return model


# ---- the step --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _mkldnn_disabled() -> Iterator[None]:
    # (torch.backends.mkldnn.flags() would do, but it also sets a TF32 flag and warns about it every call.)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class DecodeStep:
    """`step(model, token_ids, cache, start, positions, attention_mask) -> logits (B, vocab)` for one new token
    per row (token_ids (B, 1)) at cache position start: a `generate.StepFn`.

    compile: torch.compile the step (the first call compiles; see `compile_seconds`); else it runs eagerly,
    with the same bucketed attention.
    max_autotune: let inductor benchmark kernel choices while compiling (several times slower to compile).
    """

    def __init__(self, model: SmolLM2, *, compile: bool = True, max_autotune: bool = False,
                 bucket: int = BUCKET) -> None:
        self.model = model
        self.bucket = bucket
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._marked_cache: weakref.ref[KVCache] | None = None  # the cache whose tensors are marked dynamic
        # One compiled graph for every batch size, 1 included, so that a row's logits are the same bits whatever
        # batch it runs in (the engine's batches grow and shrink as requests come and go; inductor's code for a
        # batch of one, traced apart, rounds differently). Not with the float32 matrix-vector linears, which
        # choose their kernel by the number of rows: those models keep a graph for one row and one for more.
        self.one_graph = not any(isinstance(m, MatVecLinear) for m in model.modules())
        param = next(model.parameters())
        # oneDNN's bf16 matmul is ~2x slower than ATen's own at one row (M=1) on CPUs without AMX: turn it off
        # around decode steps only (prefill's large matmuls want it).
        self._low_precision = param.dtype in (torch.bfloat16, torch.float16) and param.device.type == "cpu"
        if compile:
            # isolate_recompiles: every DecodeStep has its own compiled graphs. The guards that would tell two
            # models apart are the ones skipped, so without it a second step could run the first one's graph.
            self._step = torch.compile(
                self._call_model, fullgraph=True, isolate_recompiles=True,
                options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                         # the generated wrapper otherwise checks every input's sizes and strides in Python
                         # on every call (~10 per layer): ~5% of an int4 step
                         "size_asserts": False,
                         "max_autotune": max_autotune},
            )
        else:
            self._step = self._call_model

    @torch.no_grad()
    def __call__(
        self,
        model: SmolLM2,
        token_ids: torch.Tensor,
        cache: KVCache,
        start: int,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if model is not self.model:
            raise ValueError("this DecodeStep was built for another model")
        B, T = token_ids.shape
        if T != 1:
            raise ValueError(f"a decode step takes one token per row, got token_ids of shape {(B, T)}")
        cache.check_room(start, 1)
        device = token_ids.device
        L = bucketed_length(start + 1, cache.max_len, self.bucket)
        slot = torch.tensor([start], device=device)  # (1,): the cache position written this step
        # Fresh (B, 1) tensors with strides (1, 1): with the batch size unbacked the graph guards on strides even
        # at one row, and callers pass expanded positions (stride 0) or columns of wider token tensors.
        token_ids = torch.empty(B, 1, dtype=token_ids.dtype, device=device).copy_(token_ids)
        positions = torch.empty(B, 1, dtype=torch.long, device=device).copy_(slot.expand(B, 1) if positions is None
                                                                             else positions)
        # (B, L): 1 = a real token. The forward also masks positions after `slot` (the unfilled tail).
        if attention_mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=device)
        elif attention_mask.shape != (B, start + 1):
            raise ValueError(f"attention_mask must have shape {(B, start + 1)}, got {tuple(attention_mask.shape)}")
        else:  # a new tensor, never a view: its strides are (L, 1) whatever the caller's mask was cut from.
            # (The engine's mask is a slice of a wider one; F.pad by 0 at a bucket's end clones the slice's
            # strides, and the graph of one row, which guards on them, then compiled a second time.)
            mask = torch.zeros(B, L, dtype=torch.bool, device=device)
            mask[:, : start + 1] = attention_mask
        if self.compiled:
            # One graph for every bucket and every cache: L is "unbacked" (the compiler may not specialise on
            # it, e.g. on L == cache length, which would make the sliced cache contiguous) and the cache length
            # is dynamic. Sizes are marked here rather than left to the compiler's guess after a recompile
            # (which depends on the sizes seen before: CI once compiled a third graph).
            torch._dynamo.decorators.mark_unbacked(mask, 1)
            # The batch size: "unbacked" too where one graph serves every batch (see one_graph), else dynamic
            # from 2 rows on (a batch of one row then has a graph of its own).
            mark_batch = (torch._dynamo.decorators.mark_unbacked if self.one_graph
                          else torch._dynamo.maybe_mark_dynamic if B > 1 else None)
            if mark_batch is not None:
                for tensor in (token_ids, positions, mask):
                    mark_batch(tensor, 0)
            if self._marked_cache is None or self._marked_cache() is not cache:  # a weakref: ids are reused
                for layer in cache.layers:
                    for tensor in (layer.k, layer.v):
                        torch._dynamo.maybe_mark_dynamic(tensor, 2)
                        if mark_batch is not None:
                            mark_batch(tensor, 0)
                self._marked_cache = weakref.ref(cache)
        caches = [(layer.k, layer.v) for layer in cache.layers]
        t0 = time.perf_counter()
        with _mkldnn_disabled() if self._low_precision else contextlib.nullcontext():
            logits = self._step(token_ids, positions, slot, mask, caches)
        if self.compiled and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        return logits

    def _call_model(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        mask: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The model's own forward for one token; the cache is rebuilt from its tensors, which are what the
        compiled graph takes as inputs (the KVCache object around them may change between calls)."""
        torch._check(mask.shape[1] >= 2)  # no specialisation on a width of 0 or 1
        if self.one_graph:  # every input's unbacked batch size is the same one
            rows = token_ids.shape[0]
            for tensor in (positions, mask, *(t for pair in caches for t in pair)):
                torch._check(tensor.shape[0] == rows)
        cache = KVCache.from_layers([LayerCache(k, v) for k, v in caches])
        return self.model(token_ids, cache=cache, start=slot, positions=positions, attention_mask=mask,
                          output="last_logits")
