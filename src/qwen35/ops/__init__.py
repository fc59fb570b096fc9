"""Numerical kernels, each fast form beside the plain reference it is tested against, and the choice between them:
the model calls one op per concept and never sees a kernel.

- `cpu`: qwen35's CPU kernels (built on first use), `Linear` and `rms_norm` on them.
- `attention.attention`: softmax attention; one query token on the fused kernel, else SDPA.
- `deltanet.gated_deltanet_mix`: Gated DeltaNet between its projections; a decode step fused, else the model's math.
- `conv.causal_conv1d`, `gated_delta.*_gated_delta_rule`: that math's short conv and recurrence in PyTorch.
- `decode.NativeDecode`: a whole decode step in one native call where it can, else layer by layer.
"""

from qwen35.ops.conv import causal_conv1d
from qwen35.ops.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["causal_conv1d", "chunk_gated_delta_rule", "recurrent_gated_delta_rule"]
