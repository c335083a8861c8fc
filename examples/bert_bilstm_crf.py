"""Train a small BERT -> BiLSTM -> CRF tagger on fastnlp layers.

    python examples/bert_bilstm_crf.py --threads 1

The BERT is tiny and randomly initialised (2 layers, hidden size 64, 4 heads;
nothing is downloaded) and runs its attention on fastnlp through
attn_implementation="fastnlp"; the BiLSTM and the CRF are fastnlp's too. The
baseline twin is the same model with attn_implementation="sdpa",
torch.nn.LSTM and pytorch-crf, started from the same weights and trained on
the same batches, its steps interleaved with the fastnlp model's. The task is the one of bilstm_crf.py (tagging.TaggingTask).
`--steps 20` makes it a smoke test.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch import Tensor, nn  # noqa: E402

from tagging import LABELS, Tagger, TaggingTask, add_arguments, layer_classes, run  # noqa: E402


class BertEncoder(nn.Module):
    """BertModel as the tagger's first stage: token ids and mask in, last hidden states out."""

    def __init__(self, vocab_size: int, attn_implementation: str, hidden: int = 64, layers: int = 2,
                 heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        if attn_implementation == "fastnlp":
            import fastnlp.integrations.transformers  # noqa: F401  (registers the name)
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden,
                            max_position_embeddings=max_len, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, pad_token_id=TaggingTask.PAD,
                            attn_implementation=attn_implementation)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.bert(input_ids=tokens, attention_mask=mask.long()).last_hidden_state


def bert_bilstm_crf(task: TaggingTask, kind: str, packed: bool = True, constrained: bool = True,
                    hidden: int = 64) -> Tagger:
    """kind "fastnlp": fastnlp attention, LSTM and CRF; kind "torch": sdpa, nn.LSTM, pytorch-crf."""
    lstm_cls, make_crf = layer_classes(kind, constrained)
    encoder = BertEncoder(task.vocab_size, "fastnlp" if kind == "fastnlp" else "sdpa", hidden=hidden,
                          max_len=max(64, task.max_len))
    return Tagger(encoder, hidden, hidden, len(LABELS), lstm_cls, make_crf(), packed=packed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, steps=150, batch_size=32)
    args = parser.parse_args(argv)
    return run(args, lambda task, kind, packed: bert_bilstm_crf(task, kind, packed=packed),
               "BERT-BiLSTM-CRF", "sdpa + nn.LSTM + pytorch-crf")


if __name__ == "__main__":
    main()
