"""Benchmarks of fastnlp's ops against other implementations.

Run ``python -m fastnlp.bench --help``. The machinery lives in :mod:`.harness`; each op
has its own module (e.g. :mod:`.crf`) registered in ``OPS`` in :mod:`.__main__`.
"""


def main(argv=None):
    # Imported lazily: importing fastnlp.bench.__main__ here would make
    # `python -m fastnlp.bench` warn that the module was already imported.
    from .__main__ import main as _main

    return _main(argv)


__all__ = ["main"]
