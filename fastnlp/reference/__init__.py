"""Pure-PyTorch oracles for every fastnlp op: slow, obviously correct, the
baseline that tests and benchmarks compare the kernels with."""

from fastnlp.reference import attention, crf, lstm

__all__ = ["attention", "crf", "lstm"]
