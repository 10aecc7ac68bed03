"""Per-sample gradient rules for transformers' own layer types (GPT-2 Conv1D, Llama RMSNorm).

They live here, at the edge, so that dist_dpc.privacy and dist_dpc.engine never import transformers.
"""

from __future__ import annotations

import torch

from dist_dpc.privacy.clipper import PerSampleClipper, register_dp_layer
from dist_dpc.privacy.layers.linear import DPLinearFunction
from dist_dpc.privacy.layers.norm_affine import dp_affine


def dp_conv1d(module, clipper: PerSampleClipper, x: torch.Tensor) -> torch.Tensor:
    # GPT-2's Conv1D is y = x W + b with W stored (in, out): a linear layer with a transposed weight.
    clipper.check_batch_dim(module, x)
    return DPLinearFunction.apply(x, module.weight, module.bias, clipper, True, module)


def dp_rms_norm(module, clipper: PerSampleClipper, hidden: torch.Tensor) -> torch.Tensor:
    clipper.check_batch_dim(module, hidden)
    input_dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return dp_affine(module, clipper, h.to(input_dtype), module.weight, None)


RMS_NORMS = [f"transformers.models.{m}.modeling_{m}.{c}RMSNorm" for m, c in
             (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))]

# By class path: registering does not import transformers.
register_dp_layer("transformers.pytorch_utils.Conv1D")(dp_conv1d)
register_dp_layer(*RMS_NORMS)(dp_rms_norm)
