"""MultiheadAttention benchmark cases: fastnlp.nn.MultiheadAttention against
torch.nn.MultiheadAttention with the same weights, forward + backward.

"module fwd+bwd key padding": self-attention over a padded batch, key lengths
drawn from [T/4, T] with a fixed seed, the same boolean key_padding_mask for
both and need_weights=False (the path users take in training; torch then runs
scaled_dot_product_attention). Gradients with respect to the input and every
parameter. Shapes: (B, H, T, D) = (8, 12, 256, 64) and (4, 12, 1024, 64),
embed_dim = H * D; quick runs take the first only.

Before timing, the first results are cross-checked: outputs on the query rows
that are not padding, and all gradients (the loss ignores padded rows).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .harness import Case

OP = "attention"
SHAPES = [  # (B, H, T, D)
    (8, 12, 256, 64),
    (4, 12, 1024, 64),
]
QUICK_SHAPES = SHAPES[:1]

OURS = "fastnlp"
TORCH = "torch.nn.MultiheadAttention"


def module_cases(device: str, quick: bool) -> List[Case]:
    from fastnlp.nn import MultiheadAttention  # here, so a broken build shows as a skipped op

    return [_case(B, H, T, D, device, MultiheadAttention) for B, H, T, D in (QUICK_SHAPES if quick else SHAPES)]


def _case(B: int, H: int, T: int, D: int, device: str, ours_cls) -> Case:
    embed = H * D
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, embed, generator=g).to(device).requires_grad_(True)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g).to(device)
    padding = torch.arange(T, device=device)[None, :] >= lengths[:, None]  # torch's convention: True = pad
    real_rows = (~padding)[:, :, None]
    grad = (torch.randn(B, T, embed, generator=g).to(device) * real_rows)

    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(embed, H, batch_first=True, device=device)
    ours = ours_cls(embed, H, batch_first=True, device=device)
    ours.load_state_dict(theirs.state_dict())

    def step(module):
        out, _ = module(x, x, x, key_padding_mask=padding, need_weights=False)
        # torch.autograd.grad rather than .backward(): nothing accumulates into .grad.
        grads = torch.autograd.grad(out, [x, *module.parameters()], grad)
        return out.detach(), [g.detach() for g in grads]

    def check(results: Dict[str, Any]) -> Optional[str]:
        (ref_out, ref_grads), (out, grads) = results[TORCH], results[OURS]
        rows = real_rows.expand_as(out)
        bad = []
        if not torch.allclose(out[rows], ref_out[rows], rtol=1e-4, atol=1e-5):
            bad.append(f"output max abs diff {(out[rows] - ref_out[rows]).abs().max().item():.3g}")
        names = ["input"] + [n for n, _ in theirs.named_parameters()]
        for name, a, b in zip(names, grads, ref_grads):
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            if err > 1e-4:
                bad.append(f"d/{name} relative error {err:.3g}")
        return "; ".join(bad) if bad else None

    return Case(op=OP, name=f"module fwd+bwd key padding B={B} H={H} T={T} D={D}",
                impls={OURS: lambda: step(ours), TORCH: lambda: step(theirs)},
                baselines=[TORCH], ours=OURS, check=check)
