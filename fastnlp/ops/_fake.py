"""What the ops' fake kernels (torch.library.register_fake) share."""

import functools
import inspect

import torch
from torch import Tensor


def refuse_meta_among_real(op_name: str, host_tensors=()):
    """Decorate a fake kernel so that it raises, as the real kernels' device
    checks do, when meta tensors and tensors on a real device are mixed.

    register_fake also makes the fake the op's Meta kernel, and the dispatcher
    picks that kernel as soon as any argument is a meta tensor. Called with
    CPU tensors and one meta tensor, the op would then return uninitialised
    CPU tensors (new_empty of a CPU argument) instead of an error. All
    arguments on meta (shape inference) and FakeTensors (torch.compile: their
    device is the faked one) are left alone. `host_tensors` names arguments
    that live on the CPU whatever device the op computes on (batch_sizes,
    rng_state): on the CPU they may join meta tensors, but a meta one among
    real tensors is refused like any other. Lists of tensors are checked
    element by element.
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
            computing = [(name, t) for name, t in tensors if name not in host_tensors]
            if all(t.device.type == "meta" for _, t in computing):
                return fake(*args, **kwargs)  # shape inference
            first_name, first = computing[0]
            for name, tensor in tensors:
                on_meta = tensor.device.type == "meta"
                if name in host_tensors and not on_meta:
                    continue  # on the CPU, beside real and meta tensors alike
                if on_meta != (first.device.type == "meta"):
                    raise RuntimeError(f"{op_name}: {name} is on {tensor.device} but {first_name} is on "
                                       f"{first.device}")
            return fake(*args, **kwargs)

        return checked

    return decorate


def register_fake(qualified_name: str, op_name: str, host_tensors=()):
    """torch.library.register_fake(qualified_name) for a fake kernel wrapped in
    refuse_meta_among_real(op_name, host_tensors): how every fastnlp op
    registers its fake."""

    def decorate(fake):
        return torch.library.register_fake(qualified_name)(refuse_meta_among_real(op_name, host_tensors)(fake))

    return decorate
