"""SmolLM2, written from torch primitives: a Llama-architecture decoder-only transformer.

Read top to bottom, this file is the whole model:
  token ids -> embedding -> N x [RMSNorm -> attention (RoPE, grouped-query) -> +residual,
                                 RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> lm_head -> logits

Every activation worth looking at passes through a named hook point, `self.hook("hook_resid_pre", x)`, which
returns x itself unless smollm2/hooks.py has hooked that module (`smollm2.capture`): the names are
TransformerLens's (docs/hooks.md), and an unhooked point costs one call of a function that returns its argument.

Shapes are given for SmolLM2-135M: hidden 576, 30 layers, 9 query heads and 3 key/value heads of size 64,
MLP width 1536, vocabulary 49152. Module and parameter names match Hugging Face's `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so the original checkpoints load with strict checking.
The numerics follow the reference (transformers' modeling_llama.py): RMSNorm and the rotary tables are
computed in float32, and RoPE uses the "rotate half" (non-interleaved) layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .kv_cache import KVCache, LayerCache

if TYPE_CHECKING:
    from .quant.quantize import Quantization

# attention(q (B, n_head, T, hd), k, v (B, n_kv_head, S, hd), mask (B, 1, T, S) bool, None = causal)
#   -> (B, n_head, T, hd)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# hook(point name, activation) -> the activation to carry on with: each module's `hook`, see `no_hook`
Hook = Callable[[str, torch.Tensor], torch.Tensor]


def no_hook(name: str, x: torch.Tensor) -> torch.Tensor:
    """Every module's hook until smollm2.hooks sets another: the point passes its activation on unchanged."""
    return x


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.hook: Hook = no_hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the mean of squares overflows/underflows in half precision
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * self.hook("hook_normalized", x.to(dtype))


# ---- Rotary position embeddings (RoPE) ---------------------------------------------------------------------
# Each pair of channels (i, i + head_dim/2) of a query or key is rotated by the angle position * theta^(-2i/d).
# The dot product of a rotated query and key then depends only on their distance. The original pairs channel i
# with channel i + d/2 ("rotate half"), not neighbours 2i and 2i+1 ("interleaved"): the two layouts are the same
# maths on permuted channels, so weights trained for one give wrong answers under the other.


def precompute_rope(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_positions, head_dim), in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (d/2,)
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]  # (P, d/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, d): channel i and i + d/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles whose cos/sin are (B, T, head_dim)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# ---- The decoder block -------------------------------------------------------------------------------------


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v, by torch's fused kernel; mask None means plain causal attention.

    enable_gqa lets each group of n_head / n_kv_head query heads read its shared key/value head, without copying
    K and V once per query head. is_causal aligns the mask top-left, which is right only when the queries are
    the keys (no cached prefix); the model passes an explicit mask otherwise.
    """
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    """Causal self-attention with grouped-query attention: n_kv_head key/value heads serve n_head query heads."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)  # 576 -> 9 heads x 64
        self.k_proj = nn.Linear(d, kv, bias=False)  # 576 -> 3 heads x 64
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        # Speed choices, made once for the whole model (quantize.py, inference): q, k and v as one matmul (the
        # three layers above then view its rows), and the function that attends (a one-token kernel, say).
        self.qkv_proj: nn.Module | None = None
        self.attention: AttentionFn = sdpa_attention
        self.hook: Hook = no_hook

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        start: int | torch.Tensor,
        length: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.q_proj.out_features, self.k_proj.out_features,
                                              self.v_proj.out_features], dim=-1)
        q = self.hook("hook_q", q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.hook("hook_k", k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.hook("hook_v", v.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)
        q, k = self.hook("hook_rot_q", apply_rope(q, cos, sin)), self.hook("hook_rot_k", apply_rope(k, cos, sin))
        if cache is not None:
            k, v = cache.update(start, k, v, length)  # (B, n_kv_head, length, hd): the cache's first positions
        # (B, n_head, T, hd). A hook on the attention pattern swaps in an explicit softmax(q k^T) (hooks.py).
        y = self.hook("hook_z", self.attention(q, k, v, mask))
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), 576 -> 1536 -> 576."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one matmul, where quantize.py fuses them
        self.hook: Hook = no_hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate, up = self.hook("hook_pre", gate), self.hook("hook_pre_linear", up)  # (B, T, 1536)
        return self.down_proj(self.hook("hook_post", F.silu(gate) * up))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.hook: Hook = no_hook

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        start: int | torch.Tensor,
        length: int,
    ) -> torch.Tensor:
        x = self.hook("hook_resid_pre", x)
        attn_out = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start, length)
        x = self.hook("hook_resid_mid", x + self.hook("hook_attn_out", attn_out))
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        return self.hook("hook_resid_post", x + self.hook("hook_mlp_out", mlp_out))


class Decoder(nn.Module):
    """Embedding, the stack of blocks and the final norm: Hugging Face's `LlamaModel`, under the key `model.`."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Rotary tables for every position the model supports: 2 x 8192 x 64 floats (4 MiB), not saved.
        cos, sin = precompute_rope(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


# ---- The model -----------------------------------------------------------------------------------------------


class SmolLM2(nn.Module):
    """The language model: `model(input_ids) -> logits`, plus the cache and padding arguments generation needs."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.source: str | None = None  # where the weights came from, when `load` read them
        self.quantization: Quantization | None = None  # set by quantize.py: the mode and the kernels it runs on
        # The decode step generation uses instead of the eager one: set by inference.compiled_step.compile_decoding.
        self.compiled_step: Callable[..., torch.Tensor] | None = None
        self.hook: Hook = no_hook  # hook_embed and hook_logits
        # Original checkpoints of tied models carry no lm_head.weight: fill it in so strict loading still works.
        self.register_load_state_dict_pre_hook(_fill_tied_lm_head)

    def tie_weights(self) -> None:
        """One Parameter, two names: the output projection reads the input embedding matrix.

        Call again after anything that replaces parameters one module at a time (`to_empty`).
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output: Literal["logits", "last_logits", "hidden"] = "logits",
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T): training, prefill and decoding all run through here.

        cache, start: write the new keys/values at cache positions start..start+T-1 and attend to everything
          before. start is an int, or a one-element int64 tensor: then one compiled graph serves every
          position (a compiled decode step passes a tensor, and an attention_mask).
        positions: (B, T) rotary positions, default start..start+T-1 (left-padded rows start later).
        attention_mask: (B, S), 1 for the tokens to attend to and 0 for padding, over cache positions 0..S-1,
          the prefix included; S >= start + T (positions past start + T - 1 are never attended). Default: all
          of 0..start+T-1.
        output: "logits", "last_logits" (B, vocab) for the last position only (a prefill needs no more, and
          the output projection is the model's largest matmul), or "hidden", the final normed hidden states
          (B, T, hidden_size) before the output projection.
        """
        B, T = input_ids.shape
        dynamic = isinstance(start, torch.Tensor)
        if cache is None and (dynamic or start != 0):
            raise ValueError(f"start={start} needs a cache holding the earlier positions")
        if attention_mask is not None:
            if not dynamic and (attention_mask.ndim != 2 or attention_mask.shape[0] != B
                                or attention_mask.shape[1] < start + T):
                raise ValueError(f"attention_mask must have shape {(B, start + T)} (or be wider), "
                                 f"got {tuple(attention_mask.shape)}")
            length = attention_mask.shape[1]  # keys attended: cache positions 0..length-1
        elif dynamic:
            raise ValueError("a tensor start needs an attention_mask, whose width says how much cache to read")
        else:
            length = start + T
        if cache is not None and not dynamic:
            cache.check_room(start, T)
            cache.check_room(0, length)
        slots = start + torch.arange(T, device=input_ids.device)  # (T,) the cache positions written
        if positions is None:
            positions = slots.expand(B, T)
        cos, sin = self.model.rope_cos[positions], self.model.rope_sin[positions]  # (B, T, head_dim)
        mask = self._attention_mask(T, start, slots, length, attention_mask)
        x = self.hook("hook_embed", self.model.embed_tokens(input_ids))  # (B, T, hidden)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache.layers[i] if cache is not None else None, start, length)
        if output == "last_logits":
            x = x[:, -1]  # left padding puts every row's last real token at T-1
        x = self.model.norm(x)
        return x if output == "hidden" else self.hook("hook_logits", self.lm_head(x))

    def hidden(self, input_ids: torch.Tensor, **options: object) -> torch.Tensor:
        """The final normed hidden states (B, T, hidden_size): `forward(..., output="hidden")`."""
        return self(input_ids, output="hidden", **options)

    @staticmethod
    def _attention_mask(
        T: int, start: int | torch.Tensor, slots: torch.Tensor, length: int, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """None when SDPA's own causal mask is right; else a boolean (B, 1, T, length) mask, True = attend."""
        if attention_mask is None and (isinstance(start, int) and start == 0 or T == 1):
            return None  # a plain causal prefill, or one new token that may see every cached position
        key_pos = torch.arange(length, device=slots.device)[None, :]  # (1, S)
        query_pos = slots[:, None]  # (T, 1)
        allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:
            real_key = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
            # A padding query may see only itself: a row with every key masked would give NaN in softmax.
            allowed = allowed & (real_key | (key_pos == query_pos)[None, None])
        return allowed

    # ---- weights ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights for training from scratch: normal(0, initializer_range), norms at one (as HF Llama)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        """(Re)compute the rotary tables, e.g. after building the model on the meta device."""
        cos, sin = precompute_rope(self.config.head_dim, self.config.max_position_embeddings, self.config.rope_theta)
        self.model.rope_cos.copy_(cos)
        self.model.rope_sin.copy_(sin)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def _fill_tied_lm_head(module: SmolLM2, state_dict: dict, prefix: str, *args: object) -> None:
    head, embed = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if module.config.tie_word_embeddings and head not in state_dict and embed in state_dict:
        state_dict[head] = state_dict[embed]
