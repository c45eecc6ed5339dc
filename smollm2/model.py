"""SmolLM2, written from torch primitives: a Llama-architecture decoder-only transformer.

Read top to bottom, this file is the whole model:
  token ids -> embedding -> N x [RMSNorm -> attention (RoPE, grouped-query) -> +residual,
                                 RMSNorm -> SwiGLU MLP -> +residual] -> RMSNorm -> lm_head -> logits

Shapes are given for SmolLM2-135M: hidden 576, 30 layers, 9 query heads and 3 key/value heads of size 64,
MLP width 1536, vocabulary 49152. Module and parameter names match Hugging Face's `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj.weight`, ...), so the original checkpoints load with strict checking.
The numerics follow the reference (transformers' modeling_llama.py): RMSNorm and the rotary tables are
computed in float32, and RoPE uses the "rotate half" (non-interleaved) layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .kv_cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight. No mean subtraction and no bias, unlike LayerNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # the mean of squares overflows/underflows in half precision
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        start: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, n_kv_head, start + T, hd): every position so far
        # enable_gqa lets each group of n_head / n_kv_head query heads read its shared key/value head, without
        # copying K and V once per query head. With no mask, is_causal's top-left alignment is right only when
        # the queries are the keys (no cache prefix); the caller passes an explicit mask otherwise.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv_head != self.n_head
        )  # (B, n_head, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), 576 -> 1536 -> 576."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LayerCache | None,
        start: int,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        start: int = 0,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T). See `hidden` for the other arguments."""
        return self.lm_head(self.hidden(input_ids, cache=cache, start=start, positions=positions,
                                        attention_mask=attention_mask))

    def hidden(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states (B, T, hidden_size), before the output projection.

        cache, start: write keys/values at cache positions start..start+T-1 and attend to everything before.
        positions: (B, T) rotary positions, default start..start+T-1 (left-padded rows start later).
        attention_mask: (B, start+T), 1 for real tokens and 0 for padding, covering the cached prefix too.
        """
        B, T = input_ids.shape
        if cache is not None:
            cache.check_room(start, T)
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rope_cos[positions], self.model.rope_sin[positions]  # (B, T, head_dim)
        mask = self._attention_mask(B, T, start, attention_mask, input_ids.device, cache is not None)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, mask, cache.layers[i] if cache is not None else None, start)
        return self.model.norm(x)

    @staticmethod
    def _attention_mask(
        B: int, T: int, start: int, attention_mask: torch.Tensor | None, device: torch.device, cached: bool
    ) -> torch.Tensor | None:
        """None when SDPA's own causal mask is right; else a boolean (B, 1, T, start + T) mask, True = attend."""
        if attention_mask is None and (start == 0 or T == 1):
            return None  # a plain causal prefill, or one new token that may see every cached position
        S = start + T
        query_pos = torch.arange(start, S, device=device)[:, None]  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = (key_pos <= query_pos)[None, None]  # (1, 1, T, S) causal
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must have shape {(B, S)}, got {tuple(attention_mask.shape)}")
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
