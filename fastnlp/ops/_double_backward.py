"""Backward passes that autograd can differentiate again (create_graph=True).

The kernels' backward passes are not differentiable. Where autograd records
the backward pass -- torch.autograd.grad(..., create_graph=True) for a
gradient penalty, a Hessian-vector product, MAML's inner step -- each op's
autograd computes its gradients here instead: the op's pure-PyTorch
reference is recomputed from the saved inputs and differentiated with
create_graph=True, so the gradients are exact to any order and connect to
every input and incoming gradient that requires grad, as those of torch's own
layers do. It costs a forward and a backward pass of the reference, in that
pass only; a plain backward pass runs the kernel.

The C++ autograd Functions (CRF, LSTM) reach this through the
"<op>_reference_backward" ops (schemas in csrc/ops.cpp, called from
csrc/double_backward.h), which each op's module registers with
register_reference_backward; the attention op's Python autograd calls
reference_gradients directly.
"""

import contextlib
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from fastnlp.ops._autocast import autocast_dtype


def reference_gradients(reference: Callable, arguments: Sequence, grad_outputs: Sequence[Optional[Tensor]]
                        ) -> List[Optional[Tensor]]:
    """The vector-Jacobian product of `reference` at `arguments`, differentiable.

    reference(*arguments) returns the op's differentiable outputs, in the
    order of grad_outputs (None where no gradient came). The result holds one
    entry per argument: its gradient (zeros where the outputs do not depend
    on it) if it is a tensor that requires grad, else None.
    """
    wanted = [i for i, argument in enumerate(arguments) if isinstance(argument, Tensor) and argument.requires_grad]
    result: List[Optional[Tensor]] = [None] * len(arguments)
    if not wanted:
        return result
    # Autocast, on around the backward call, would recompute in another
    # dtype than the forward pass ran in (the op ran with it off). (Not
    # torch.autocast(device, enabled=False) unconditionally: it raises for a
    # device autocast does not know, meta.)
    first = arguments[wanted[0]]
    autocast_off = (torch.autocast(first.device.type, enabled=False) if autocast_dtype(first) is not None
                    else contextlib.nullcontext())
    with torch.enable_grad(), autocast_off:
        outputs = reference(*arguments)
    pairs = [(output, grad) for output, grad in zip(outputs, grad_outputs)
             if grad is not None and output.requires_grad]
    grads = [None] * len(wanted)
    if pairs:
        grads = torch.autograd.grad([output for output, _ in pairs], [arguments[i] for i in wanted],
                                    [grad for _, grad in pairs], create_graph=True, allow_unused=True)
    for i, grad in zip(wanted, grads):
        # Zeros where the reference does not use an argument at all (a CRF
        # over empty chains), as the kernels' backward passes give there.
        result[i] = grad if grad is not None else torch.zeros_like(arguments[i])
    return result


def register_reference_backward(op: str, reference: Callable) -> None:
    """Implement "fastnlp::<op>_reference_backward" with reference_gradients of `reference`.

    The op takes `op`'s arguments and then a list of the incoming gradients;
    `reference` takes `op`'s arguments. Registered as CompositeImplicitAutograd:
    autograd sees the torch ops inside, which is what makes it differentiable.
    """

    def reference_backward(*arguments_and_grads):
        *arguments, grad_outputs = arguments_and_grads
        return reference_gradients(reference, arguments, grad_outputs)

    torch.library.impl(f"fastnlp::{op}_reference_backward", "CompositeImplicitAutograd")(reference_backward)
