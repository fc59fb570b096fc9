"""Weight-only int8 / int4 quantization: layers on packed CPU kernels, model transform, checkpoints."""

from qwen35.quant.checkpoint import quantize_checkpoint
from qwen35.quant.linear import Int4Linear, Int8Linear
from qwen35.quant.quantize import QuantConfig, quantize

__all__ = ["Int4Linear", "Int8Linear", "QuantConfig", "quantize", "quantize_checkpoint"]
