// The backward passes of fastnlp's ops are kernels, not differentiable ATen
// ops: there is no double backward. run_once_differentiable runs a backward
// with grad mode off and, when autograd records the backward pass itself
// (create_graph=True), returns gradients whose own backward raises a clear
// error. Without it the gradients would count as constants in, say, a
// gradient penalty (a silently wrong result), or fail inside a kernel's GEMM
// with an unrelated message.
//
// Unlike Python's torch.autograd.function.once_differentiable, which hangs
// the error on detached copies, the error is reachable from every saved
// input and every incoming gradient that requires grad:
// torch.autograd.grad(penalty, inputs) raises it too, instead of skipping
// this op's share of the second derivative. The incoming gradients matter
// as much as the inputs: in a gradient penalty on a model's input, the
// gradient reaching this op depends on the layers above it, whose weights'
// second derivative runs back through this op's backward.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <string>
#include <utility>

namespace fastnlp {

template <typename Backward>
torch::autograd::variable_list run_once_differentiable(const char* op, const torch::autograd::variable_list& saved,
                                                       const torch::autograd::variable_list& grad_outputs,
                                                       Backward&& backward) {
  torch::autograd::variable_list grads;
  {
    at::NoGradGuard no_grad;
    grads = backward();
  }
  if (!at::GradMode::is_enabled()) return grads;
  // An exact 0 (a sum over no elements, whatever the tensor holds) that
  // depends on every tensor requiring grad; its backward raises. Adding it to
  // each gradient changes no value and puts the error on every path back.
  at::Tensor zero;
  for (const torch::autograd::variable_list* tensors : {&saved, &grad_outputs})
    for (const at::Tensor& tensor : *tensors) {
      if (!tensor.defined() || !tensor.requires_grad()) continue;
      const at::Tensor nothing = tensor.flatten().narrow(0, 0, 0).sum();
      zero = zero.defined() ? zero + nothing : nothing;
    }
  if (!zero.defined()) return grads;
  // Allocated here rather than owned by a pointer: Node is shared_ptr-owned in
  // older torch and intrusive_ptr-owned in newer, and apply keeps no reference.
  torch::autograd::DelayedError error(
      std::string(op) + " has no double backward: its gradient is computed by a kernel, so a graph built with "
                        "create_graph=True cannot be differentiated through it",
      1);
  zero = error({zero})[0];
  for (at::Tensor& grad : grads)
    if (grad.defined()) grad = grad + zero;
  return grads;
}

}  // namespace fastnlp
