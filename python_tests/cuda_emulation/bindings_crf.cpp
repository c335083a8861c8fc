// The CUDA CRF binding and kernels, built for the CPU (see test_cuda_emulated.py).
#include <torch/extension.h>

#include "cuda/crf.cu"
#include "cuda/crf_binding.cpp"

void register_crf(pybind11::module& m) {
  m.def("crf_log_partition", &fastnlp::crf_log_partition_cuda);
  m.def("crf_log_partition_backward", &fastnlp::crf_log_partition_backward_cuda);
  m.def("crf_log_likelihood", &fastnlp::crf_log_likelihood_cuda);
  m.def("crf_log_likelihood_backward", &fastnlp::crf_log_likelihood_backward_cuda);
  m.def("crf_viterbi", &fastnlp::crf_viterbi_cuda);
  m.def("crf_viterbi_topk", &fastnlp::crf_viterbi_topk_cuda);
}
