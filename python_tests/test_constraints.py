"""Tests for fastnlp.nn.constraints.allowed_transitions."""

import itertools
import re

import pytest
import torch

from fastnlp.nn.constraints import AllowedTransitions, allowed_transitions

T, F = True, False


def _as_lists(a: AllowedTransitions):
    return a.start.tolist(), a.end.tolist(), a.transitions.tolist()


# ---------------------------------------------------------------------------
# Hand-checked masks
# ---------------------------------------------------------------------------

BIO_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_bio_hand_checked():
    start, end, trans = _as_lists(allowed_transitions("BIO", BIO_LABELS))
    assert start == [T, T, F, T, F]
    assert end == [T, T, T, T, T]
    # rows: previous tag; columns: next tag   O  B-P  I-P  B-L  I-L
    assert trans == [
        [T, T, F, T, F],  # O
        [T, T, T, T, F],  # B-PER
        [T, T, T, T, F],  # I-PER
        [T, T, F, T, T],  # B-LOC
        [T, T, F, T, T],  # I-LOC
    ]


def test_iob1_hand_checked():
    start, end, trans = _as_lists(allowed_transitions("IOB1", BIO_LABELS))
    assert start == [T, F, T, F, T]
    assert end == [T, T, T, T, T]
    #                 O  B-P  I-P  B-L  I-L
    assert trans == [
        [T, F, T, F, T],  # O
        [T, T, T, F, T],  # B-PER
        [T, T, T, F, T],  # I-PER
        [T, F, T, T, T],  # B-LOC
        [T, F, T, T, T],  # I-LOC
    ]


def test_bioes_hand_checked():
    labels = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "E-LOC"]
    start, end, trans = _as_lists(allowed_transitions("BIOES", labels))
    assert start == [T, T, F, F, T, T, F]
    assert end == [T, F, F, T, T, F, T]
    #                 O  B-P  I-P  E-P  S-P  B-L  E-L
    assert trans == [
        [T, T, F, F, T, T, F],  # O
        [F, F, T, T, F, F, F],  # B-PER
        [F, F, T, T, F, F, F],  # I-PER
        [T, T, F, F, T, T, F],  # E-PER
        [T, T, F, F, T, T, F],  # S-PER
        [F, F, F, F, F, F, T],  # B-LOC
        [T, T, F, F, T, T, F],  # E-LOC
    ]


def test_bmes_untyped_hand_checked():
    start, end, trans = _as_lists(allowed_transitions("BMES", ["B", "M", "E", "S"]))
    assert start == [T, F, F, T]
    assert end == [F, F, T, T]
    #                 B  M  E  S
    assert trans == [
        [F, T, T, F],  # B
        [F, T, T, F],  # M
        [T, F, F, T],  # E
        [T, F, F, T],  # S
    ]


def test_bmes_typed_hand_checked():
    labels = ["B-NN", "M-NN", "E-NN", "S-NN", "B-VB", "E-VB"]
    start, end, trans = _as_lists(allowed_transitions("bmes", labels))
    assert start == [T, F, F, T, T, F]
    assert end == [F, F, T, T, F, T]
    #                 B-N  M-N  E-N  S-N  B-V  E-V
    assert trans == [
        [F, T, T, F, F, F],  # B-NN
        [F, T, T, F, F, F],  # M-NN
        [T, F, F, T, T, F],  # E-NN
        [T, F, F, T, T, F],  # S-NN
        [F, F, F, F, F, T],  # B-VB
        [T, F, F, T, T, F],  # E-VB
    ]


def test_result_structure():
    a = allowed_transitions("BIO", BIO_LABELS)
    assert isinstance(a, AllowedTransitions)
    assert isinstance(a, tuple) and a._fields == ("start", "end", "transitions")
    assert a.num_tags == 5
    assert a.start.shape == (5,) and a.end.shape == (5,)
    assert a.transitions.shape == (5, 5)
    for t in a:
        assert t.dtype == torch.bool and t.device.type == "cpu"
    start, end, trans = a
    assert start is a.start and end is a.end and trans is a.transitions


@pytest.mark.parametrize("name", ["bio", "Bio", "BIO", "iob2", "IOB2"])
def test_scheme_name_case_insensitive_and_iob2_alias(name):
    ref = allowed_transitions("BIO", BIO_LABELS)
    got = allowed_transitions(name, BIO_LABELS)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)


def test_type_split_on_first_dash_only():
    labels = ["O", "B-ORG-CORP", "I-ORG-CORP", "I-ORG"]
    _, _, trans = _as_lists(allowed_transitions("BIO", labels))
    assert trans[1][2] is True  # I-ORG-CORP continues B-ORG-CORP
    assert trans[1][3] is False  # I-ORG is a different type ("ORG" != "ORG-CORP")
    assert trans[2][2] is True


def test_untyped_bio_labels():
    start, end, trans = _as_lists(allowed_transitions("BIO", ["O", "B", "I"]))
    assert start == [T, T, F]
    assert trans == [[T, T, F], [T, T, T], [T, T, T]]


# ---------------------------------------------------------------------------
# Dict input
# ---------------------------------------------------------------------------


def test_dict_input_matches_list():
    ref = allowed_transitions("BIOES", ["O", "B-X", "I-X", "E-X", "S-X"])
    # Insertion order deliberately scrambled: the key, not the order, is the index.
    d = {3: "E-X", 0: "O", 4: "S-X", 1: "B-X", 2: "I-X"}
    got = allowed_transitions("BIOES", d)
    for r, g in zip(ref, got):
        assert torch.equal(r, g)


@pytest.mark.parametrize("d", [{1: "O", 2: "B-X"}, {0: "O", 2: "B-X"}])
def test_dict_keys_must_be_dense(d):
    with pytest.raises(ValueError, match="keys"):
        allowed_transitions("BIO", d)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme,label",
    [
        ("BIO", "X-PER"),
        ("BIO", "M-PER"),
        ("BIO", "E-PER"),
        ("BIO", "O-PER"),
        ("IOB1", "S-PER"),
        ("BIOES", "M-PER"),
        ("BMES", "O"),
        ("BMES", "I-NN"),
        ("BIO", "b-PER"),  # prefixes are case-sensitive
        ("BIO", ""),
    ],
)
def test_bad_label_prefix(scheme, label):
    with pytest.raises(ValueError) as exc:
        allowed_transitions(scheme, ["B-PER", label])
    msg = str(exc.value)
    assert repr(label) in msg
    assert scheme in msg


def test_unknown_scheme_lists_supported():
    with pytest.raises(ValueError) as exc:
        allowed_transitions("BILOU", BIO_LABELS)
    msg = str(exc.value)
    assert "'BILOU'" in msg
    for s in ("BIO", "IOB1", "BIOES", "BMES"):
        assert s in msg


@pytest.mark.parametrize("labels", [[], {}, ()])
def test_empty_labels(labels):
    with pytest.raises(ValueError, match="empty"):
        allowed_transitions("BIO", labels)


def test_non_string_labels():
    with pytest.raises(TypeError, match="labels must be a sequence or dict of label strings"):
        allowed_transitions("BIO", "OBI")
    with pytest.raises(TypeError, match=r"labels must be strings, got 1 \(int\)"):
        allowed_transitions("BIO", ["O", 1])


# ---------------------------------------------------------------------------
# Exhaustive check against an enumerator and an independent checker
# ---------------------------------------------------------------------------

MAX_LEN = 4
TYPES = ("PER", "LOC")


def chunkings(n, types, with_outside):
    """All ways to split n tokens into segments: ("O", 1) or (type, length >= 1)."""
    if n == 0:
        yield ()
        return
    if with_outside:
        for rest in chunkings(n - 1, types, with_outside):
            yield (("O", 1),) + rest
    for length in range(1, n + 1):
        for typ in types:
            for rest in chunkings(n - length, types, with_outside):
                yield ((typ, length),) + rest


def render(scheme, segments):
    out = []
    prev_type = None  # entity type of the previous segment, None after O / at start
    for typ, n in segments:
        if typ == "O":
            out.append("O")
            prev_type = None
            continue
        if scheme == "BIO":
            out += [f"B-{typ}"] + [f"I-{typ}"] * (n - 1)
        elif scheme == "IOB1":
            first = "B" if prev_type == typ else "I"
            out += [f"{first}-{typ}"] + [f"I-{typ}"] * (n - 1)
        elif scheme in ("BIOES", "BMES"):
            mid = "I" if scheme == "BIOES" else "M"
            if n == 1:
                out.append(f"S-{typ}")
            else:
                out += [f"B-{typ}"] + [f"{mid}-{typ}"] * (n - 2) + [f"E-{typ}"]
        prev_type = typ
    return tuple(out)


# Independent validity checkers: a whole sequence (space-terminated tokens)
# must match a grammar of chunks; back-references enforce the same type.
_GRAMMARS = {
    "BIO": re.compile(r"(?:O |B-(\S+) (?:I-\1 )*)*"),
    # A run of adjacent same-type chunks: first opened by I-X, later ones by B-X.
    "IOB1": re.compile(r"(?:O |I-(\S+) (?:I-\1 )*(?:B-\1 (?:I-\1 )*)*)*"),
    "BIOES": re.compile(r"(?:O |S-(\S+) |B-(\S+) (?:I-\2 )*E-\2 )*"),
    "BMES": re.compile(r"(?:S-(\S+) |B-(\S+) (?:M-\2 )*E-\2 )*"),
}


def grammar_valid(scheme, seq):
    return _GRAMMARS[scheme].fullmatch("".join(t + " " for t in seq)) is not None


def scheme_labels(scheme):
    prefixes = {"BIO": "BI", "IOB1": "BI", "BIOES": "BIES", "BMES": "BMES"}[scheme]
    labels = [] if scheme == "BMES" else ["O"]
    return labels + [f"{p}-{t}" for t in TYPES for p in prefixes]


@pytest.mark.parametrize("scheme", ["BIO", "IOB1", "BIOES", "BMES"])
def test_exhaustive_against_enumerator_and_checker(scheme):
    labels = scheme_labels(scheme)
    start, end, trans = _as_lists(allowed_transitions(scheme, labels))
    K = len(labels)
    for L in range(1, MAX_LEN + 1):
        segs = list(chunkings(L, TYPES, with_outside=scheme != "BMES"))
        well_formed = {render(scheme, s) for s in segs}
        # Each chunking has exactly one spelling, so rendering is injective.
        assert len(well_formed) == len(segs)
        for seq in well_formed:
            assert len(seq) == L and all(t in labels for t in seq)

        n_allowed = 0
        for path in itertools.product(range(K), repeat=L):
            seq = tuple(labels[i] for i in path)
            ok = (
                start[path[0]]
                and end[path[-1]]
                and all(trans[a][b] for a, b in zip(path, path[1:]))
            )
            valid = grammar_valid(scheme, seq)
            assert (seq in well_formed) == valid, (scheme, seq)
            assert ok == valid, (scheme, seq, ok, valid)
            n_allowed += ok
        assert n_allowed == len(well_formed)


def test_sanity_of_checker():
    # Guard against a grammar that accepts or rejects everything.
    assert grammar_valid("BIO", ("B-PER", "I-PER", "O"))
    assert not grammar_valid("BIO", ("O", "I-PER"))
    assert not grammar_valid("BIO", ("B-PER", "I-LOC"))
    assert grammar_valid("IOB1", ("I-PER", "B-PER", "I-LOC"))
    assert not grammar_valid("IOB1", ("I-PER", "B-LOC"))
    assert grammar_valid("BIOES", ("S-PER", "B-LOC", "I-LOC", "E-LOC", "O"))
    assert not grammar_valid("BIOES", ("B-PER", "E-LOC"))
    assert not grammar_valid("BIOES", ("B-PER",))
    assert grammar_valid("BMES", ("B-PER", "M-PER", "E-PER", "S-LOC"))
    assert not grammar_valid("BMES", ("M-PER", "E-PER"))
