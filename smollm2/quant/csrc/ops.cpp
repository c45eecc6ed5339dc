// The schemas of smollm2's ops (torch.ops.smollm2.*), one library for all of them; matmul.cpp and
// decode_attention.cpp register their CPU implementations, and kernels.py their fake (shape-only) versions.
#include <torch/library.h>

TORCH_LIBRARY(smollm2, m) {
  m.def("q4_mm(Tensor x, Tensor codes, Tensor d, Tensor z, int N) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor codes, Tensor d, int N) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w, int N) -> Tensor");
  m.def("f32_mv(Tensor x, Tensor w) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor valid) -> Tensor");
}
