"""Numerical kernels, each fast form beside the plain reference it is tested against."""

from qwen35.ops.conv import causal_conv1d
from qwen35.ops.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["causal_conv1d", "chunk_gated_delta_rule", "recurrent_gated_delta_rule"]
