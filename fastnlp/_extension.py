"""Loads the compiled extension fastnlp._C and refuses a missing or stale one.

A silent fall-back to slow Python would hide a broken build, so import fails
with a message that says how to build instead.
"""

from pathlib import Path

import torch

from fastnlp._source_hash import csrc_hash

BUILD_HINT = (
    "Build it from the repository root with `make build` (or "
    "`pip install --no-build-isolation .`; the flag keeps pip from building "
    "against a second, different torch)."
)


def _source_checkout_csrc():
    """The csrc/ this package was built from, when imported from a source checkout."""
    root = Path(__file__).resolve().parent.parent
    csrc = root / "csrc"
    return csrc if (root / "setup.py").is_file() and csrc.is_dir() else None


def check_build(info: dict, torch_version: str, csrc) -> None:
    """Raise ImportError when the build info does not match this torch or these sources."""
    if info["torch_version"] != torch_version:
        raise ImportError(
            f"fastnlp._C was built against torch {info['torch_version']} but torch {torch_version} "
            f"is installed; rebuild it. {BUILD_HINT}"
        )
    if csrc is not None and csrc_hash(csrc) != info["source_hash"]:
        raise ImportError(f"fastnlp._C is stale: the sources in {csrc} changed since it was built. {BUILD_HINT}")


def load_extension():
    try:
        from fastnlp import _C
    except ImportError as error:
        raise ImportError(f"fastnlp's compiled extension fastnlp._C is missing or broken ({error}). {BUILD_HINT}") from error
    check_build(_C.build_info(), torch.__version__, _source_checkout_csrc())
    return _C
