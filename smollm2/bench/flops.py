"""FLOPs per token and GPU datasheet peaks: model FLOPs utilisation (MFU) for the benchmarks and the trainer.

A matmul of an (M, K) by a (K, N) matrix is 2 M K N FLOPs; the counts below add those of SmolLM2's blocks
(q, k, v, o, gate, up, down), causal attention and the output projection. Takes a Config (no torch needed).
"""

from __future__ import annotations

# Dense datasheet peaks in TFLOP/s (no sparsity) for MFU; fp32 without TF32, torch's default. First match wins.
GPU_PEAK_TFLOPS = (("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}), ("H100", {"bf16": 989.0, "fp32": 67.0}),
                   ("H200", {"bf16": 989.0, "fp32": 67.0}), ("A100", {"bf16": 312.0, "fp32": 19.5}),
                   ("L4", {"bf16": 121.0, "fp32": 30.3}))


def gpu_peak_tflops(gpu_name: str, dtype: str) -> float | None:
    """The datasheet peak of a GPU (by torch.cuda.get_device_name) for "bf16" or "fp32"; None if unknown."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in gpu_name:
            return peaks[dtype]
    return None


def _matmul_params(config) -> tuple[int, int]:  # (config: Config) -> (the blocks' weights, the output projection)
    d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_block = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size  # q, o; k, v; gate, up, down
    return config.num_hidden_layers * per_block, d * config.vocab_size


def train_flops_per_token(config, seq_len: int) -> int:
    """Training FLOPs per token as in the PaLM paper's MFU: 6 x matmul weights + 12 x layers x width x seq_len."""
    blocks, head = _matmul_params(config)
    return 6 * (blocks + head) + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def prefill_flops_per_token(config, prompt_len: int) -> int:
    """Forward FLOPs per prompt token: the blocks' matmuls and causal attention (on average over prompt_len / 2
    keys, q.k and p.v); the output projection runs for the last position only."""
    blocks, _ = _matmul_params(config)
    return 2 * blocks + 2 * config.num_hidden_layers * config.hidden_size * prompt_len
