// The backward passes of fastnlp's ops are kernels, not differentiable ATen
// ops, so on their own they have no double backward. Where autograd records
// the backward pass itself (create_graph=True: a gradient penalty, MAML, a
// Hessian-vector product), the autograd Functions call the op's reference
// backward instead: "<op>_reference_backward", registered in Python
// (fastnlp/ops/_double_backward.py), which recomputes the op's pure-PyTorch
// reference from the saved inputs and differentiates it with
// create_graph=True. Its gradients are differentiable to any order, and
// connect to every input and incoming gradient that requires grad, as those
// of torch's own layers do. It costs a reference forward and backward, so
// only the create_graph pass pays it; a plain backward runs the kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>
#include <utility>
#include <vector>

namespace fastnlp {

// The gradients of `op`'s tensor arguments (one entry per argument of its
// schema, undefined for non-tensors and for what needs no gradient) from
// "<op>_reference_backward", called with the op's arguments and the incoming
// gradients of its differentiable outputs.
inline torch::autograd::variable_list reference_backward(const std::string& op, std::vector<c10::IValue> arguments,
                                                        const torch::autograd::variable_list& grad_outputs) {
  const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow((op + "_reference_backward").c_str(), "");
  c10::List<std::optional<at::Tensor>> grads;
  for (const at::Tensor& grad : grad_outputs)
    grads.push_back(grad.defined() ? std::optional<at::Tensor>(grad) : std::nullopt);
  torch::jit::Stack stack = std::move(arguments);
  stack.emplace_back(std::move(grads));
  handle.callBoxed(&stack);
  torch::autograd::variable_list result;
  for (const c10::IValue& grad : stack.at(0).toListRef())
    result.push_back(grad.isNone() ? at::Tensor() : grad.toTensor());
  return result;
}

// The backward of a fastnlp autograd Function: the kernel's (`kernel`) in a
// plain backward pass, the reference's (`reference`) where autograd records
// it. Grad mode tells the two apart: the engine turns it on for the backward
// pass exactly when create_graph=True.
template <typename Kernel, typename Reference>
torch::autograd::variable_list run_backward(Kernel&& kernel, Reference&& reference) {
  if (at::GradMode::is_enabled()) return reference();
  return kernel();
}

}  // namespace fastnlp
