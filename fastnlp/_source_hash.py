"""Fingerprint of the C++/CUDA sources, shared by setup.py (baked into the
build) and fastnlp's import-time check (recomputed from a source checkout), so
an extension built from other sources is caught instead of silently used.

Only the standard library: setup.py loads this file before fastnlp is importable.
"""

import hashlib
from pathlib import Path


def csrc_hash(csrc_dir) -> str:
    csrc_dir = Path(csrc_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(csrc_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
