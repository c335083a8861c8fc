"""Transition constraints for chunk tagging schemes (BIO, IOB1, BIOES, BMES).

A CRF decoder that only knows per-tag scores can emit ill-formed tag
sequences such as ``O I-PER`` under BIO.  :func:`allowed_transitions`
turns a scheme and a label list into boolean masks that a decoder can use
to forbid such sequences: a path ``t_0 .. t_{L-1}`` is well formed iff
``start[t_0]``, ``end[t_{L-1}]`` and every ``transitions[t_i, t_{i+1}]``
are True.

This module deliberately imports only ``torch`` so that it can be used
(and tested) without the compiled extension.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["AllowedTransitions", "allowed_transitions", "SUPPORTED_SCHEMES"]


class AllowedTransitions(NamedTuple):
    """Boolean masks describing which tag paths a scheme allows.

    Attributes:
        start: ``(K,)`` bool; ``start[j]`` is True when tag ``j`` may begin a sequence.
        end: ``(K,)`` bool; ``end[j]`` is True when tag ``j`` may end a sequence.
        transitions: ``(K, K)`` bool; ``transitions[i, j]`` is True when tag ``j``
            may directly follow tag ``i``.
    """

    start: torch.Tensor
    end: torch.Tensor
    transitions: torch.Tensor

    @property
    def num_tags(self) -> int:
        """Number of tags ``K``."""
        return int(self.start.shape[0])


# A parsed label: (prefix, entity type).  The type is None when the label has
# no "-" at all (e.g. "O", or a bare "B" in BMES word segmentation).
_Tag = Tuple[str, Optional[str]]


def _bio_start(p: str, t: Optional[str]) -> bool:
    # An I- tag continues a chunk, so there must be a chunk before it.
    return p != "I"


def _bio_follow(prev: _Tag, nxt: _Tag) -> bool:
    # I-X may only continue a chunk of the same type X; O and B-* are always fine.
    if nxt[0] == "I":
        return prev[0] in ("B", "I") and prev[1] == nxt[1]
    return True


def _iob1_start(p: str, t: Optional[str]) -> bool:
    # B-X only separates two adjacent chunks of type X, so it never comes first.
    return p != "B"


def _iob1_follow(prev: _Tag, nxt: _Tag) -> bool:
    # B-X marks "new chunk right after a chunk of type X"; anything else
    # (O, or I-* which either continues or opens a chunk) may follow anything.
    if nxt[0] == "B":
        return prev[0] in ("B", "I") and prev[1] == nxt[1]
    return True


def _any(p: str, t: Optional[str]) -> bool:
    return True


def _make_closed_scheme(begin: str, inside: str, end: str, single: str, outside: Optional[str]):
    """Rules for schemes that mark both chunk boundaries (BIOES, BMES).

    Inside a chunk (after ``begin``/``inside``) only ``inside``/``end`` of the
    same type may follow; outside a chunk only a new chunk (``begin``/``single``)
    or ``outside`` may follow.
    """
    opening = {begin, single} | ({outside} if outside else set())
    closing = {end, single} | ({outside} if outside else set())

    def start(p: str, t: Optional[str]) -> bool:
        return p in opening

    def finish(p: str, t: Optional[str]) -> bool:
        return p in closing

    def follow(prev: _Tag, nxt: _Tag) -> bool:
        if prev[0] in (begin, inside):
            return nxt[0] in (inside, end) and nxt[1] == prev[1]
        return nxt[0] in opening

    return start, finish, follow


class _Scheme(NamedTuple):
    name: str
    prefixes: Tuple[str, ...]
    outside: Optional[str]  # the type-less "outside" tag, if the scheme has one
    start: Callable[[str, Optional[str]], bool]
    end: Callable[[str, Optional[str]], bool]
    follow: Callable[[_Tag, _Tag], bool]


def _build_schemes() -> Dict[str, _Scheme]:
    bioes = _make_closed_scheme("B", "I", "E", "S", "O")
    bmes = _make_closed_scheme("B", "M", "E", "S", None)
    bio = _Scheme("BIO", ("B", "I", "O"), "O", _bio_start, _any, _bio_follow)
    return {
        "BIO": bio,
        "IOB2": bio._replace(name="IOB2"),
        "IOB1": _Scheme("IOB1", ("B", "I", "O"), "O", _iob1_start, _any, _iob1_follow),
        "BIOES": _Scheme("BIOES", ("B", "I", "O", "E", "S"), "O", *bioes),
        "BMES": _Scheme("BMES", ("B", "M", "E", "S"), None, *bmes),
    }


_SCHEMES = _build_schemes()
SUPPORTED_SCHEMES: Tuple[str, ...] = tuple(_SCHEMES)


def _label_list(labels: Union[Sequence[str], Mapping[int, str]]) -> List[str]:
    if isinstance(labels, Mapping):
        # AllenNLP-style {index: label}: the keys must be exactly 0..K-1 so
        # that tag indices in the masks mean the same thing as in the dict.
        keys = sorted(labels)
        if keys != list(range(len(keys))):
            raise ValueError(
                f"label dict keys must be exactly 0..{len(keys) - 1}, got {keys!r}"
            )
        out = [labels[k] for k in keys]
    elif isinstance(labels, str):
        # A bare string is a Sequence[str] too, but is certainly a mistake.
        raise TypeError("labels must be a sequence or dict of label strings, not a str")
    else:
        out = list(labels)
    if not out:
        raise ValueError("labels must not be empty")
    for lab in out:
        if not isinstance(lab, str):
            raise TypeError(f"labels must be strings, got {lab!r} ({type(lab).__name__})")
    return out


def _parse(label: str, scheme: _Scheme) -> _Tag:
    # Split on the first "-" only, so types such as "ORG-CORP" survive intact.
    prefix, sep, typ = label.partition("-")
    tag: _Tag = (prefix, typ if sep else None)
    if prefix not in scheme.prefixes or (prefix == scheme.outside and sep):
        allowed = ", ".join(scheme.prefixes)
        raise ValueError(
            f"label {label!r} is not valid under scheme {scheme.name} "
            f"(prefixes: {allowed}"
            + (f"; {scheme.outside!r} takes no type)" if scheme.outside else ")")
        )
    return tag


def allowed_transitions(
    scheme: str, labels: Union[Sequence[str], Mapping[int, str]]
) -> AllowedTransitions:
    """Boolean start/end/transition masks for a tagging scheme.

    Args:
        scheme: one of ``"BIO"`` (alias ``"IOB2"``), ``"IOB1"``, ``"BIOES"``,
            ``"BMES"``; case-insensitive.
        labels: the tag labels in index order, as a list (``["O", "B-PER", ...]``)
            or a dict ``{index: label}`` with keys ``0..K-1``.  A label is
            ``PREFIX`` or ``PREFIX-TYPE`` split at the first ``"-"``.

    Returns:
        :class:`AllowedTransitions` with CPU bool tensors of shape ``(K,)``,
        ``(K,)`` and ``(K, K)``.

    Raises:
        ValueError: unknown scheme, empty labels, or a label whose prefix is
            not part of the scheme.
    """
    key = scheme.upper() if isinstance(scheme, str) else scheme
    if key not in _SCHEMES:
        raise ValueError(
            f"unknown tagging scheme {scheme!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
        )
    sch = _SCHEMES[key]
    tags = [_parse(lab, sch) for lab in _label_list(labels)]

    start = torch.tensor([sch.start(*t) for t in tags], dtype=torch.bool)
    end = torch.tensor([sch.end(*t) for t in tags], dtype=torch.bool)
    trans = torch.tensor([[sch.follow(a, b) for b in tags] for a in tags], dtype=torch.bool)
    return AllowedTransitions(start, end, trans)
