"""Train a BiLSTM-CRF tagger (embeddings -> BiLSTM -> CRF) on fastnlp layers.

    python examples/bilstm_crf.py --threads 1

The task is generated in process (see tagging.TaggingTask: entity mentions
whose type only the words around them tell, BIO tags). The script trains the
fastnlp model with a progress bar and prints the held-out loss and span F1 as
they move and the throughput in tokens/s. Step by step interleaved with it,
it trains the same model built from torch.nn.LSTM and pytorch-crf (same
initial weights, same batches) and prints the speed-up. `--steps 20` makes
it a smoke test.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tagging import add_arguments, bilstm_crf, run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, steps=150, batch_size=32)
    args = parser.parse_args(argv)
    return run(args, lambda task, kind, packed: bilstm_crf(task, kind, packed=packed),
               "BiLSTM-CRF", "nn.LSTM + pytorch-crf")


if __name__ == "__main__":
    main()
