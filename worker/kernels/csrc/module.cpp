// The CPU kernels' Python module (worker/cpu_kernels.py); each kernel lives in its own file.
#include <torch/extension.h>

#include "quantized_rows.h"

#include <tuple>
#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale,
                                     int64_t block_size);
void lora_delta_(torch::Tensor y, torch::Tensor x, torch::Tensor a, std::vector<torch::Tensor> bs,
                 torch::Tensor segments);
void dequantize_int8_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales, int64_t start);
torch::Tensor q4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        torch::Tensor mins, int64_t n);
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales);
void dequantize_q4_(torch::Tensor out, torch::Tensor packed, torch::Tensor scales,
                    torch::Tensor mins, int64_t start);
torch::Tensor paged_decode_step(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor slot_mapping, torch::Tensor block_tables,
                                torch::Tensor ctx_lens, int64_t num_heads, double scale,
                                int64_t block_size);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                                      torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
torch::Tensor argmax_rows(torch::Tensor logits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (paged_attention.cpp)");
  m.def("lora_delta_", &lora_delta_, "segmented multi-LoRA delta, in place (lora_delta.cpp)");
  m.def("dequantize_int8_", &dequantize_int8_, "int8 weight rows to bf16 (q8_matmul.cpp)");
  m.def("q4_matmul", &q4_matmul, "x @ int4 weights (q4_matmul.cpp)");
  m.def("q8_matmul", &q8_matmul, "x @ int8 weights (q8_matmul.cpp)");
  m.def("set_weight_prefetch", [](bool on) { edgelora::weight_prefetch = on; },
        "whether the quantized matmuls prefetch their weights (quantized_rows.h)");
  m.def("dequantize_q4_", &dequantize_q4_, "int4 weight rows to bf16 (q4_matmul.cpp)");
  m.def("paged_decode_step", &paged_decode_step,
        "rope, KV-cache write and paged attention of decode rows (paged_attention.cpp)");
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, one pass (rms_norm.cpp)");
  m.def("add_rms_norm", &add_rms_norm, "residual add and RMSNorm, one pass (rms_norm.cpp)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up, one pass (activation.cpp)");
  m.def("argmax_rows", &argmax_rows, "first-index argmax of each row (argmax.cpp)");
}
