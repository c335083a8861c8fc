"""The functional API: fused kernels behind torch.ops.fastnlp, batch first.

Each function takes `backend=None` ("auto": the compiled kernel for the
tensors' device) or "reference" (pure PyTorch, for debugging); the
FASTNLP_BACKEND environment variable sets the default.
"""

from fastnlp.ops.attention import attention, attention_with_weights
from fastnlp.ops.crf import (
    crf_gold_score,
    crf_log_likelihood,
    crf_log_partition,
    crf_marginals,
    crf_viterbi,
    crf_viterbi_topk,
)
from fastnlp.ops.lstm import lstm_cell, lstm_layer, lstm_layer_pair

__all__ = [
    "attention",
    "attention_with_weights",
    "crf_gold_score",
    "crf_log_likelihood",
    "crf_log_partition",
    "crf_marginals",
    "crf_viterbi",
    "crf_viterbi_topk",
    "lstm_cell",
    "lstm_layer",
    "lstm_layer_pair",
]
