// The CUDA LSTM binding and kernels, built for the CPU: csrc/lstm.cpp's time
// loop with the emulated step kernels (see test_cuda_emulated.py).
#include <torch/extension.h>

#include "cuda/lstm.cu"
#include "cuda/lstm_binding.cpp"

namespace {

// pybind11 has no caster for the schema's Tensor?[]: Python lists arrive as vectors.
using OptionalTensors = std::vector<std::optional<at::Tensor>>;

fastnlp::LstmArgumentList to_list(const OptionalTensors& tensors) {
  fastnlp::LstmArgumentList list;
  for (const std::optional<at::Tensor>& t : tensors) list.push_back(t);
  return list;
}

fastnlp::LstmPairResult forward_pair(const at::Tensor& input, const at::Tensor& batch_sizes,
                                     const OptionalTensors& forward_args, const OptionalTensors& reverse_args) {
  return fastnlp::lstm_forward_pair_cuda(input, batch_sizes, to_list(forward_args), to_list(reverse_args));
}

fastnlp::LstmPairResult backward_pair(const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                                      const OptionalTensors& forward_args, const OptionalTensors& reverse_args,
                                      bool input_grad, bool weight_grads) {
  return fastnlp::lstm_backward_pair_cuda(input, batch_sizes, has_bias, to_list(forward_args), to_list(reverse_args),
                                          input_grad, weight_grads);
}

}  // namespace

void register_lstm(pybind11::module& m) {
  m.def("lstm_forward", &fastnlp::lstm_forward_cuda);
  m.def("lstm_backward", &fastnlp::lstm_backward_cuda);
  m.def("lstm_forward_pair", &forward_pair);
  m.def("lstm_backward_pair", &backward_pair);
}
