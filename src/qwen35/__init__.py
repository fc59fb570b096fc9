"""qwen35: run Qwen3.5 models (hybrid Gated DeltaNet + gated attention) on your own machine."""

from qwen35.api import Piece, Qwen35, Reply, load
from qwen35.quant import quantize
from qwen35.sampling import SamplingParams

__all__ = ["Piece", "Qwen35", "Reply", "SamplingParams", "load", "quantize"]
__version__ = "0.1.0"
