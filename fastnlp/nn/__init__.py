"""Drop-in modules: same constructor, parameter names and forward as the layers they replace."""

from fastnlp.nn.attention import MultiheadAttention
from fastnlp.nn.constraints import AllowedTransitions, allowed_transitions
from fastnlp.nn.crf import CRF
from fastnlp.nn.lstm import LSTM, LSTMCell

__all__ = ["AllowedTransitions", "CRF", "LSTM", "LSTMCell", "MultiheadAttention", "allowed_transitions"]
