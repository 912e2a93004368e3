// The CPU kernels' Python module (worker/cpu_kernels.py); each kernel lives in its own file.
#include <torch/extension.h>

#include <vector>

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, double scale,
                                     int64_t block_size);
void lora_delta_(torch::Tensor y, torch::Tensor x, torch::Tensor a, std::vector<torch::Tensor> bs,
                 torch::Tensor segments);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV cache (paged_attention.cpp)");
  m.def("lora_delta_", &lora_delta_, "segmented multi-LoRA delta, in place (lora_delta.cpp)");
}
