"""CRF benchmark cases: fastnlp.nn.CRF against pytorch-crf, torch-struct and the
pure-PyTorch reference in fastnlp.ops.

Per shape (B = batch, T = padded length, K = tags) there are three cases:

* "nll fwd+bwd": negative log-likelihood (mean over the batch) and its gradient with
  respect to the emissions and the three transition parameters -- one training step
  of the CRF layer.
* "viterbi decode": best paths as List[List[int]], what `decode` users get.
* "viterbi (tensor)": fastnlp's `viterbi` (paths and scores as tensors) against
  pytorch-crf's `decode`, which shows how much of decode's cost is building lists.

All implementations get the same emissions, tags, mask and transition parameters, and
the first result of each is cross-checked (loss, gradients, paths) before timing.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch

from .harness import Case

OP = "crf"
SHAPES = [  # (B, T, K)
    (32, 64, 20),
    (64, 128, 20),
    (32, 64, 9),
    (32, 64, 50),
]
# --quick (what `make bench` runs) keeps every shape: the CRF cases take
# about 1.5 minutes here, torch-struct's K=50 calls (5 s each) most of it.
QUICK_SHAPES = SHAPES

OURS = "fastnlp"
PYTORCH_CRF = "pytorch-crf"
REFERENCE = "fastnlp reference"
TORCH_STRUCT = "torch-struct"


def cases(device: str, quick: bool) -> List[Case]:
    # Imported here, not at module level, so that `--op all` can report a missing or
    # broken fastnlp build as a skipped op instead of crashing on import.
    import fastnlp.nn
    import fastnlp.ops

    try:
        import torchcrf
    except ImportError:
        torchcrf = None
        print("crf: pytorch-crf not installed, skipping it (pip install pytorch-crf)")
    try:
        import torch_struct
    except ImportError:
        torch_struct = None
        print("crf: torch-struct not installed, skipping it (pip install torch-struct)")
    else:
        # torch-struct's distributions predate torch's argument validation and warn
        # about it on every construction; the warning says nothing about the results.
        warnings.filterwarnings("ignore", message=".*does not define `arg_constraints`")

    out = []
    for B, T, K in QUICK_SHAPES if quick else SHAPES:
        d = _Data(B, T, K, device, fastnlp.nn.CRF, torchcrf)
        out.append(_nll_case(d, fastnlp.ops, torchcrf, torch_struct))
        out.append(_decode_case(d, fastnlp.ops, torchcrf, torch_struct))
        if torchcrf is not None:  # this case exists only to compare with pytorch-crf
            out.append(_viterbi_tensor_case(d))
    return out


class _Data:
    """Inputs and models shared by all cases of one shape."""

    def __init__(self, B, T, K, device, fastnlp_crf_cls, torchcrf):
        self.shape = f"B={B} T={T} K={K}"
        # A fixed seed per shape: the same inputs whichever shapes or device are run.
        # Drawn on the CPU generator, then moved, so cpu and cuda runs see equal data.
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        # A collate function pads a batch to its longest sequence, so one sequence has
        # length T (torch-struct also insists on it).
        lengths[0] = T
        emissions = torch.randn(B, T, K, generator=g)
        tags = torch.randint(0, K, (B, T), generator=g)
        # Same init range as pytorch-crf; set explicitly so the parameters do not
        # depend on how fastnlp.nn.CRF initialises itself.
        start, end, trans = (torch.empty(*s).uniform_(-0.1, 0.1, generator=g)
                             for s in [(K,), (K,), (K, K)])

        self.lengths_cpu = lengths
        self.lengths = lengths.to(device)
        self.mask = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
        self.tags = tags.to(device)
        # Separate tensors for training (needs grad) and decoding (does not), so that
        # decoding never pays for autograd bookkeeping. clone(): on the CPU .to() returns
        # the same tensor, and requires_grad_ would then flag both.
        self.emissions = emissions.to(device).clone().requires_grad_(True)
        self.emissions_nograd = emissions.to(device)

        self.crf = fastnlp_crf_cls(K, batch_first=True).to(device)
        with torch.no_grad():
            self.crf.start_transitions.copy_(start)
            self.crf.end_transitions.copy_(end)
            self.crf.transitions.copy_(trans)
        self.params = (self.crf.start_transitions, self.crf.end_transitions,
                       self.crf.transitions)

        self.torchcrf = None
        if torchcrf is not None:
            self.torchcrf = torchcrf.CRF(K, batch_first=True).to(device)
            with torch.no_grad():
                self.torchcrf.start_transitions.copy_(start)
                self.torchcrf.end_transitions.copy_(end)
                self.torchcrf.transitions.copy_(trans)

        # torch-struct inputs that are data, not model: which edge is each sequence's
        # last one (it carries the end transition) and the gold structure as one-hot
        # edges. Like tags and mask, they are prepared once, outside the timed step.
        n_edges = T - 1
        edge_idx = torch.arange(n_edges)[None, :]
        self.last_edge = (edge_idx == (lengths[:, None] - 2)).float().to(device)
        real_edge = (edge_idx < (lengths[:, None] - 1)).float()
        pair = tags[:, 1:] * K + tags[:, :-1]  # (cur, prev) flattened, as phi's last dims
        gold = torch.nn.functional.one_hot(pair, K * K).float().view(B, n_edges, K, K)
        self.gold_parts = (gold * real_edge[:, :, None, None]).to(device)


def _torch_struct_potentials(emissions, start, end, trans, last_edge):
    """Log-potentials phi[b, n, cur, prev] for torch_struct.LinearChainCRF.

    torch-struct scores a tag sequence y as sum_n phi[b, n, y[n+1], y[n]], so each edge
    carries the transition prev -> cur and the emission of cur at position n+1; the
    first edge also carries the start score and emission of y[0], and each sequence's
    last real edge carries the end score of its last tag.
    """
    phi = emissions[:, 1:, :, None] + trans.t()[None, None]  # trans is [prev, cur]
    first = (start + emissions[:, 0])[:, None, None, :]  # indexed by prev
    phi = torch.cat([phi[:, :1] + first, phi[:, 1:]], dim=1)
    return phi + last_edge[:, :, None, None] * end[None, None, :, None]


# --------------------------------------------------------------------------- nll


def _nll_case(d: _Data, ops, torchcrf, torch_struct) -> Case:
    em, tags, mask = d.emissions, d.tags, d.mask
    wrt = (em,) + d.params
    # torch.autograd.grad rather than .backward(): nothing accumulates into .grad, so
    # no implementation pays for zeroing or adding gradients the others skip.

    def ours():
        loss = -d.crf(em, tags, mask, reduction="mean")
        return loss.detach(), torch.autograd.grad(loss, wrt)

    def reference():
        llh = ops.crf_log_likelihood(em, tags, *d.params, mask=mask, backend="reference")
        loss = -llh.mean()
        return loss.detach(), torch.autograd.grad(loss, wrt)

    impls = {OURS: ours}
    if torchcrf is not None:
        tc = d.torchcrf
        tc_wrt = (em, tc.start_transitions, tc.end_transitions, tc.transitions)

        def pytorch_crf():
            loss = -tc(em, tags, mask, reduction="mean")
            return loss.detach(), torch.autograd.grad(loss, tc_wrt)

        impls[PYTORCH_CRF] = pytorch_crf
    impls[REFERENCE] = reference
    if torch_struct is not None:

        def torch_struct_nll():
            # Building the potentials is part of the step: a user has to do it too.
            phi = _torch_struct_potentials(em, *d.params, d.last_edge)
            dist = torch_struct.LinearChainCRF(phi, lengths=d.lengths)
            loss = -dist.log_prob(d.gold_parts).mean()
            return loss.detach(), torch.autograd.grad(loss, wrt)

        impls[TORCH_STRUCT] = torch_struct_nll

    return Case(op=OP, name=f"nll fwd+bwd {d.shape}", impls=impls,
                baselines=[n for n in impls if n != OURS], ours=OURS, check=_check_nll)


def _check_nll(results: Dict[str, Any]) -> Optional[str]:
    """Loss and all four gradients must agree with the first implementation's."""
    names = list(results)
    ref_loss, ref_grads = results[names[0]]
    labels = ["loss", "d/emissions", "d/start", "d/end", "d/transitions"]
    bad = []
    for name in names[1:]:
        loss, grads = results[name]
        for label, a, b in zip(labels, (ref_loss,) + tuple(ref_grads),
                               (loss,) + tuple(grads)):
            if not torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4):
                err = (a.float() - b.float()).abs().max().item()
                bad.append(f"{name} vs {names[0]}: {label} max abs diff {err:.3g}")
    return "; ".join(bad) if bad else None


# --------------------------------------------------------------------------- decode


def _decode_case(d: _Data, ops, torchcrf, torch_struct) -> Case:
    em, mask = d.emissions_nograd, d.mask

    def ours():
        with torch.no_grad():
            return d.crf.decode(em, mask)

    def reference():
        with torch.no_grad():
            paths, _scores = ops.crf_viterbi(em, *d.params, mask=mask, backend="reference")
            return paths

    impls = {OURS: ours}
    if torchcrf is not None:

        def pytorch_crf():
            with torch.no_grad():
                return d.torchcrf.decode(em, mask)

        impls[PYTORCH_CRF] = pytorch_crf
    impls[REFERENCE] = reference
    if torch_struct is not None:
        params = tuple(p.detach() for p in d.params)

        def torch_struct_argmax():
            # No torch.no_grad(): torch-struct computes the argmax as the gradient of
            # the max-semiring partition, so it needs autograd enabled.
            phi = _torch_struct_potentials(em, *params, d.last_edge)
            dist = torch_struct.LinearChainCRF(phi, lengths=d.lengths)
            return dist.argmax  # one-hot edges (B, T-1, K, K), not a list of tags

        impls[TORCH_STRUCT] = torch_struct_argmax

    return Case(op=OP, name=f"viterbi decode {d.shape}", impls=impls,
                baselines=[n for n in impls if n != OURS], ours=OURS,
                check=lambda results: _check_paths(results, d.lengths_cpu))


def _viterbi_tensor_case(d: _Data) -> Case:
    em, mask = d.emissions_nograd, d.mask

    def ours():
        with torch.no_grad():
            paths, _scores = d.crf.viterbi(em, mask)
            return paths

    def pytorch_crf():
        with torch.no_grad():
            return d.torchcrf.decode(em, mask)

    return Case(op=OP, name=f"viterbi (tensor) {d.shape}",
                impls={OURS: ours, PYTORCH_CRF: pytorch_crf},
                baselines=[PYTORCH_CRF], ours=OURS,
                check=lambda results: _check_paths(results, d.lengths_cpu))


def _as_paths(result, lengths) -> List[List[int]]:
    """Any implementation's decode output -> one list of tags per sequence."""
    if isinstance(result, list):
        return [list(map(int, p)) for p in result]
    result = result.detach().cpu()
    if result.dim() == 4:  # torch-struct one-hot edges [b, n, cur, prev]
        first = result[:, :1].sum(dim=2).argmax(dim=-1)  # prev tag of edge 0
        rest = result.sum(dim=3).argmax(dim=-1)  # cur tag of every edge
        result = torch.cat([first, rest], dim=1)
    return [result[b, : int(n)].tolist() for b, n in enumerate(lengths)]


def _check_paths(results: Dict[str, Any], lengths) -> Optional[str]:
    """All implementations must find the same best path for every sequence."""
    names = list(results)
    ref = _as_paths(results[names[0]], lengths)
    bad = []
    for name in names[1:]:
        paths = _as_paths(results[name], lengths)
        wrong = sum(p != r for p, r in zip(paths, ref)) + abs(len(paths) - len(ref))
        if wrong:
            bad.append(f"{name} vs {names[0]}: {wrong} of {len(ref)} paths differ")
    return "; ".join(bad) if bad else None
