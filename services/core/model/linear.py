"""Linear layers with the fastest kernel this device has: y = x @ W^T (+ b).

On CPU in fp32, oneDNN with the weight reordered once into its blocked layout ran 1.5-2x faster
than MKL's sgemm/sgemv at decode shapes in one-off measurements on the 2-core build machine (no
script in bench/ isolates it; bench/engine.py shows the end-to-end effect). Elsewhere (GPU,
bf16/fp16) torch's own `F.linear` is used. The choice is made once per model, not per call; the
exactness tests against transformers run with it.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class LinearKernel(Enum):
    TORCH = "torch"  # F.linear: cuBLAS on GPU, MKL on CPU
    ONEDNN = "onednn"  # oneDNN with a pre-packed weight (CPU, fp32)


def best_kernel(device: torch.device, dtype: torch.dtype) -> LinearKernel:
    packable = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
    if device.type == "cpu" and dtype == torch.float32 and packable:
        return LinearKernel.ONEDNN
    return LinearKernel.TORCH


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: LinearKernel) -> None:
        """weight: [out, in]; bias: [out] or None."""
        self.kernel = kernel
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if kernel is LinearKernel.ONEDNN:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, in] -> [M, out]."""
        if self.kernel is LinearKernel.ONEDNN:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
