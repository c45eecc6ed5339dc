"""A compiled one-token decode step: `FastDecoder(model)` is a drop-in for `generate.decode_step`.

    step = FastDecoder(model)                 # then: generate(model, ids, step=step), or Engine(..., step=step)

Decoding one token on a CPU costs three things: reading every weight once (see quantize.py), attending over
the cache, and the Python and dispatch overhead of ~400 small ops (30 layers x ~13). Eager PyTorch spends
~6.5 ms per token on the overhead alone, more than the int4 matmuls. This module removes most of it:

* `torch.compile(fullgraph=True)` traces the whole step (30 blocks and the output projection) into one graph;
  inductor fuses the norms, rotary embedding and residual adds into a few C++ loops per block and calls the
  matmul kernels directly. A quantised model's fused q/k/v and gate/up projections are used (quantize.py).
* The step has tensor inputs only: the cache slot and the rotary positions are int64 tensors, never Python
  ints, so one graph serves every position and nothing calls `.item()` (which would split the graph).
* Attention reads the cache only up to the current length rounded up to a bucket of 64 positions, with a
  mask for the unfilled tail. Attending over the whole preallocated cache instead costs ~0.3 ms per layer at
  512 positions and grows with the cache. The bucketed length is an "unbacked" dynamic size and the cache
  length is dynamic, so one compiled graph serves every bucket of every cache: no recompile every 64 tokens
  nor for a new prompt (a batch of more than one row compiles once more).
* Attention is our one-token kernel (`kernels.decode_attention`, chunks of the cache merged as in
  flash-decoding) where the kernels are built and the shapes fit (head_dim 64 or 128, up to 4 query heads
  per KV head: every SmolLM2), SDPA elsewhere; ~0.5-1 ms less per token than SDPA at 576 positions.
* The compiled wrapper's per-call size and stride assertions are turned off (`size_asserts`): ~5% of an
  int4 step. The inputs' shapes are the ones traced: the step builds them itself.
* The float32 model's linears at one row go through our matrix-vector kernel (`kernels.f32_mv`): it takes
  the activations as inductor lays them out, where ATen's `mm` first copies them (~6% of an fp32 step).
* Dynamo's guards on the model's modules and parameters are skipped (`guard_filter_fn`): checking them costs
  ~1 ms per call. So the model must not be changed (reloaded, re-quantised) after the decoder is built.
* Compiling takes ~20-60 s for 30 layers; inductor's FX graph cache (on by default, under
  /tmp/torchinductor_$USER) brings a repeat in a new process down to a few seconds. `compile_seconds` holds the
  time the first call took.

With `compile=False` the same step runs eagerly: the bucketed attention, the fused projections and the
mkldnn switch still apply. The logits equal the plain model's up to float rounding (tests/test_fast.py).

Threads: with torch's default 2+ threads, OpenMP workers spin between parallel regions. On a machine whose
cores are busy with other work that spinning can make every step many times slower; OMP_WAIT_POLICY=passive
(set before Python starts) or torch.set_num_threads(1) avoids it there. On an idle machine the default is fastest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import kernels
from .kv_cache import KVCache
from .model import SmolLM2, apply_rope
from .quantize import PACKED

BUCKET = 64  # attention length granularity, in cache positions


def bucketed_length(filled: int, max_len: int, bucket: int = BUCKET) -> int:
    """filled rounded up to a multiple of bucket, at most max_len."""
    return min(-(-filled // bucket) * bucket, max_len)


@contextlib.contextmanager
def _mkldnn_disabled() -> Iterator[None]:
    # (torch.backends.mkldnn.flags() would do, but it also sets a TF32 flag and warns about it every call.)
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class FastDecoder:
    """Call as `decoder(model, token_ids, cache, start, positions, attention_mask) -> logits (B, vocab)`,
    the signature of `generate.decode_step`, for one new token per row (token_ids (B, 1)).

    compile: torch.compile the step (the first call compiles; see `compile_seconds`).
    max_autotune: let inductor benchmark kernel choices while compiling (several times slower to compile).
    """

    def __init__(self, model: SmolLM2, *, compile: bool = True, max_autotune: bool = False,
                 bucket: int = BUCKET) -> None:
        self.model = model
        self.bucket = bucket
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._marked_cache: int | None = None
        self._positions: dict[int, torch.Tensor] = {}  # bucketed length -> arange(length), built once each
        param = next(model.parameters())
        # oneDNN's bf16 matmul is ~2x slower than ATen's own at one row (M=1) on this kind of CPU: turn it off
        # around decode steps only (prefill's large matmuls want it).
        self._low_precision = param.dtype in (torch.bfloat16, torch.float16)
        # Our decode-attention kernel (kernels.py) where it is built, SDPA elsewhere; likewise our float32
        # matrix-vector product for a one-row step of the float32 model.
        config = model.config
        self._attention_kernel = kernels.decode_attention_supported(
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, param.dtype, param.device)
        self._f32_kernel = param.dtype == torch.float32 and param.device.type == "cpu" and kernels.available()
        if compile:
            # isolate_recompiles: every FastDecoder has its own compiled graphs. The guards that would tell two
            # models apart are the ones skipped, so without it a second decoder could run the first one's graph.
            self._step = torch.compile(
                self._forward, fullgraph=True, isolate_recompiles=True,
                options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                         # the generated wrapper otherwise checks every input's sizes and strides in Python
                         # on every call (~10 per layer): ~5% of an int4 step
                         "size_asserts": False,
                         "max_autotune": max_autotune},
            )
        else:
            self._step = self._forward

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
            raise ValueError("this FastDecoder was built for another model")
        B, T = token_ids.shape
        if T != 1:
            raise ValueError(f"FastDecoder decodes one token per row, got token_ids of shape {(B, T)}")
        cache.check_room(start, 1)
        device = token_ids.device
        L = bucketed_length(start + 1, cache.max_len, self.bucket)
        key_pos = self._positions.get(L)
        if key_pos is None:
            key_pos = self._positions[L] = torch.arange(L, device=device)
        slot = torch.tensor([start], device=device)  # (1,): the cache position written this step
        if positions is None:
            positions = slot.expand(B, 1)
        # (B, 1, 1, L) True = attend: every filled position, and only real (unpadded) tokens of each row.
        valid = key_pos <= start
        if attention_mask is not None:
            if attention_mask.shape != (B, start + 1):
                raise ValueError(f"attention_mask must have shape {(B, start + 1)}, "
                                 f"got {tuple(attention_mask.shape)}")
            valid = valid & F.pad(attention_mask.bool(), (0, L - start - 1))
        mask = valid.expand(B, L)[:, None, None, :]
        if self.compiled:
            # One graph for every bucket and every cache: L is "unbacked" (the compiler may not specialise on
            # it, e.g. on L == cache length, which would make the sliced cache contiguous) and the cache length
            # is dynamic.
            torch._dynamo.decorators.mark_unbacked(mask, 3)
            if self._marked_cache != id(cache):
                for layer in cache.layers:
                    torch._dynamo.maybe_mark_dynamic(layer.k, 2)
                    torch._dynamo.maybe_mark_dynamic(layer.v, 2)
                self._marked_cache = id(cache)
        caches = [(layer.k, layer.v) for layer in cache.layers]
        t0 = time.perf_counter()
        with _mkldnn_disabled() if self._low_precision else contextlib.nullcontext():
            logits = self._step(token_ids, positions, slot, mask, caches)
        if self.compiled and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        return logits

    def _forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slot: torch.Tensor,
        mask: torch.Tensor,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The model's forward for one token, written for static shapes: the same maths as `SmolLM2.hidden`
        with the cache write as an index_copy_ at a tensor slot and attention over the first L positions."""
        model = self.model.model
        B = token_ids.shape[0]
        L = mask.shape[-1]
        torch._check(L >= 2)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (B, 1, head_dim)
        x = model.embed_tokens(token_ids)  # (B, 1, hidden)
        for block, (k_cache, v_cache) in zip(model.layers, caches, strict=False):
            attn = block.self_attn
            h = block.input_layernorm(x)
            if getattr(attn, "qkv_proj", None) is not None:  # one matmul for q, k, v (quantize.py fuses them)
                q, k, v = attn.qkv_proj(h).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                                  attn.v_proj.out_features], dim=-1)
            else:
                q, k, v = self._linear(attn.q_proj, h), self._linear(attn.k_proj, h), self._linear(attn.v_proj, h)
            q = q.view(B, 1, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, n_head, 1, hd)
            k = k.view(B, 1, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, n_kv_head, 1, hd)
            v = v.view(B, 1, attn.n_kv_head, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            torch._check(L <= k_cache.shape[2])  # so that slicing the cache to L needs no clamping
            torch._check(L <= v_cache.shape[2])
            k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
            if self._attention_kernel:
                y = torch.ops.smollm2.decode_attention(q, k_cache[:, :, :L], v_cache[:, :, :L], mask[:, 0, 0])
            else:
                y = F.scaled_dot_product_attention(
                    q, k_cache[:, :, :L], v_cache[:, :, :L], attn_mask=mask, enable_gqa=attn.n_kv_head != attn.n_head
                )  # (B, n_head, 1, hd)
            x = x + self._linear(attn.o_proj, y.transpose(1, 2).reshape(B, 1, attn.n_head * attn.head_dim))
            x = x + self._mlp(block.mlp, block.post_attention_layernorm(x))
        h, head = model.norm(x)[:, -1], self.model.lm_head
        if isinstance(head, PACKED):  # our kernels take a float32 row and then give float32 logits, which
            h = h.float()             # picking the next token (argmax) reads twice as fast as bf16 ones here
        return self._linear(head, h)  # (B, vocab)

    def _mlp(self, mlp: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        if getattr(mlp, "gate_up_proj", None) is None:
            return self._linear(mlp.down_proj, F.silu(self._linear(mlp.gate_proj, h)) * self._linear(mlp.up_proj, h))
        gate, up = mlp.gate_up_proj(h).chunk(2, dim=-1)  # one matmul for both (see quantize.py)
        return mlp.down_proj(F.silu(gate) * up)

    def _linear(self, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """layer(h), through our float32 matrix-vector kernel for a float32 nn.Linear at one row (kernels.py)."""
        if (self._f32_kernel and h.numel() == h.shape[-1] and isinstance(layer, torch.nn.Linear)
                and layer.bias is None and kernels.f32_mv_fits(layer.weight)):
            return torch.ops.smollm2.f32_mv(h.reshape(1, -1), layer.weight).view(*h.shape[:-1], layer.out_features)
        return layer(h)
