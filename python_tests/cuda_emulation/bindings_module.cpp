// The Python module of the emulated CUDA bindings: the functions that
// csrc/cuda/*_binding.cpp register for the CUDA dispatch key, called directly.
#include <torch/extension.h>

void register_lstm(pybind11::module& m);
void register_crf(pybind11::module& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_lstm(m);
  register_crf(m);
  m.def("launch_count", &fastnlp_emulation::launch_count);
}
