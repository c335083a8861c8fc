"""Attention benchmark cases: fastnlp.ops.attention against
torch.nn.functional.scaled_dot_product_attention (SDPA) and the pure-PyTorch
reference, forward + backward (gradients of query, key and value).

Per shape (B = batch, H = heads, T = query and key length, D = head dim) there
are three cases, each comparing like with like:

* "no mask": every key visible, for both.
* "key padding": key lengths drawn from [T/4, T]; ours gets the lengths as
  key_padding_mask, SDPA the equivalent boolean attn_mask (B, 1, 1, T).
* "causal": is_causal=True for both.

On CUDA there is also one bfloat16 shape (B=4, H=16, T=2048, D=128), ours (the
Triton kernels) against SDPA's flash-attention kernel without a mask, and
against SDPA given the key padding as a boolean attn_mask (flash takes no mask,
so SDPA picks another kernel there). No reference: it is too slow at that size.

Inputs use a fixed seed per shape, and the first result of every
implementation is cross-checked (output and the three gradients) before timing.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .harness import Case

OP = "attention"
SHAPES = [  # (B, H, T, D)
    (8, 12, 256, 64),
    (4, 12, 1024, 64),
]
QUICK_SHAPES = SHAPES
CUDA_SHAPES = [(4, 16, 2048, 128)]  # bfloat16

SDPA_FLASH = "sdpa flash"

OURS = "fastnlp"
SDPA = "sdpa"
REFERENCE = "fastnlp reference"


def cases(device: str, quick: bool) -> List[Case]:
    import fastnlp.ops  # imported here so `--op all` reports a broken build as a skipped op

    out = []
    for B, H, T, D in QUICK_SHAPES if quick else SHAPES:
        d = _Data(B, H, T, D, device)
        for kind in ("no mask", "key padding", "causal"):
            out.append(_case(d, kind, fastnlp.ops))
    if torch.device(device).type == "cuda":
        for B, H, T, D in CUDA_SHAPES:
            d = _Data(B, H, T, D, device, torch.bfloat16)
            out.extend(_cuda_cases(d, fastnlp.ops))
    # The drop-in module against nn.MultiheadAttention (fastnlp/bench/attention_module.py).
    from .attention_module import module_cases

    out.extend(module_cases(device, quick))
    return out


class _Data:
    def __init__(self, B, H, T, D, device, dtype=torch.float32):
        self.shape = f"B={B} H={H} T={T} D={D}" + ("" if dtype == torch.float32 else f" {str(dtype)[6:]}")
        g = torch.Generator().manual_seed(0)
        q, k, v, grad = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(4))
        self.lengths = torch.randint(T // 4, T + 1, (B,), generator=g).to(device)
        self.key_padding = torch.arange(T, device=device)[None, :] < self.lengths[:, None]
        # What SDPA needs for the same masking: a dense boolean mask broadcast over heads and queries.
        self.sdpa_mask = self.key_padding[:, None, None, :]
        self.q, self.k, self.v = (x.to(device).requires_grad_(True) for x in (q, k, v))
        self.grad = grad.to(device)


def _step(fn, d: _Data):
    # torch.autograd.grad rather than .backward(): nothing accumulates into .grad.
    out = fn(d.q, d.k, d.v)
    grads = torch.autograd.grad(out, (d.q, d.k, d.v), d.grad)
    return out.detach(), grads


def _case(d: _Data, kind: str, ops) -> Case:
    if kind == "no mask":
        ours_kw, sdpa_kw, ref_kw = {}, {}, {}
    elif kind == "key padding":
        ours_kw = dict(key_padding_mask=d.lengths)
        sdpa_kw = dict(attn_mask=d.sdpa_mask)
        ref_kw = dict(key_padding_mask=d.lengths)
    else:
        ours_kw = sdpa_kw = ref_kw = dict(is_causal=True)

    impls = {
        OURS: lambda: _step(lambda q, k, v: ops.attention(q, k, v, **ours_kw), d),
        SDPA: lambda: _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **sdpa_kw), d),
        REFERENCE: lambda: _step(lambda q, k, v: ops.attention(q, k, v, backend="reference", **ref_kw), d),
    }
    return Case(op=OP, name=f"fwd+bwd {kind} {d.shape}", impls=impls, baselines=[SDPA, REFERENCE], ours=OURS,
                check=_check)


def _cuda_cases(d: _Data, ops) -> List[Case]:
    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    check = functools.partial(_check, rtol=5e-2, atol=5e-2)  # bfloat16: the two kernels round differently
    no_mask = Case(op=OP, name=f"fwd+bwd no mask {d.shape}", ours=OURS, baselines=[SDPA_FLASH], check=check, impls={
        OURS: lambda: _step(lambda q, k, v: ops.attention(q, k, v), d),
        SDPA_FLASH: lambda: _step(sdpa_flash, d),
    })
    padding = Case(op=OP, name=f"fwd+bwd key padding {d.shape}", ours=OURS, baselines=[SDPA], check=check, impls={
        OURS: lambda: _step(lambda q, k, v: ops.attention(q, k, v, key_padding_mask=d.lengths), d),
        SDPA: lambda: _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=d.sdpa_mask), d),
    })
    return [no_mask, padding]


def _check(results: Dict[str, Any], rtol: float = 1e-3, atol: float = 2e-4) -> Optional[str]:
    """Output and the three gradients must agree with the first implementation's."""
    names = list(results)
    ref_out, ref_grads = results[names[0]]
    labels = ["out", "d/query", "d/key", "d/value"]
    bad = []
    for name in names[1:]:
        out, grads = results[name]
        for label, a, b in zip(labels, (ref_out,) + tuple(ref_grads), (out,) + tuple(grads)):
            if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
                err = (a.float() - b.float()).abs().max().item()
                bad.append(f"{name} vs {names[0]}: {label} max abs diff {err:.3g}")
    return "; ".join(bad) if bad else None
