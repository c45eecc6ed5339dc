"""Quantised weights and the C++ kernels that multiply by them (what `load(quantize=...)` puts in the model).

  quantize.py    the packed layers (int8, int4, bf16 and the GGUF's own q8/q4 blocks), `quantize_model`, and
                 `fuse_projections`, the one way q/k/v and gate/up become one matmul
  gguf_int4.py   the bundled Q4_1 GGUF loaded as its own 4-bit blocks, never dequantised to float
  kernels.py     our AVX-512 kernels (csrc/*.cpp), built at run time under a name hashed from their source
"""
