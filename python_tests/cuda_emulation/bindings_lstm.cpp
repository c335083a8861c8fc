// The CUDA LSTM binding and kernels, built for the CPU: csrc/lstm.cpp's time
// loop with the emulated step kernels (see test_cuda_emulated.py).
#include <torch/extension.h>

#include "cuda/lstm.cu"
#include "cuda/lstm_binding.cpp"

void register_lstm(pybind11::module& m) {
  m.def("lstm_forward", &fastnlp::lstm_forward_cuda);
  m.def("lstm_backward", &fastnlp::lstm_backward_cuda);
}
