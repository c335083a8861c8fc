"""What the ops' fake kernels (torch.library.register_fake) share."""

import functools
import inspect

import torch
from torch import Tensor


def refuse_meta_among_real(op_name: str):
    """Decorate a fake kernel so that it raises, as the real kernels' device
    checks do, when its first tensor argument is on a real device and another
    one is a meta tensor.

    register_fake also makes the fake the op's Meta kernel, and the dispatcher
    picks that kernel as soon as any argument is a meta tensor. Called with
    CPU tensors and one meta tensor, the op would then return uninitialised
    CPU tensors instead of an error. All arguments on meta (shape inference)
    and FakeTensors (torch.compile: their device is the faked one) are left
    alone. Lists of tensors are checked element by element.
    """

    def decorate(fake):
        parameter_names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = []
            for name, value in list(zip(parameter_names, args)) + list(kwargs.items()):
                if isinstance(value, Tensor):
                    tensors.append((name, value))
                elif isinstance(value, (list, tuple)):
                    tensors.extend((f"{name}[{i}]", t) for i, t in enumerate(value) if isinstance(t, Tensor))
            if tensors and tensors[0][1].device.type != "meta":
                first_name, first = tensors[0]
                for name, tensor in tensors[1:]:
                    if tensor.device.type == "meta":
                        raise RuntimeError(f"{op_name}: {name} is on meta but {first_name} is on {first.device}")
            return fake(*args, **kwargs)

        return checked

    return decorate


def register_fake(qualified_name: str, op_name: str):
    """torch.library.register_fake(qualified_name) for a fake kernel wrapped in
    refuse_meta_among_real(op_name): how every fastnlp op registers its fake."""

    def decorate(fake):
        return torch.library.register_fake(qualified_name)(refuse_meta_among_real(op_name)(fake))

    return decorate
