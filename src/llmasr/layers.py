"""Numerics shared by the speech encoders and the projector.

- Zipformer's Swoosh activations (also SpeechLLM's projector activation), evaluated in at least float32
  (softplus is exact and overflow-free there) and returned in the input's dtype, so fp16/bf16
  activations never overflow inside ``exp``.
- Convolutions that run in float32 on CPU whatever the input dtype or autocast setting: oneDNN can
  spend minutes JIT-compiling half-precision depthwise kernels on x86 CPUs with AVX-512 FP16/AMX
  (small channel counts are the worst case), and fp32 is as fast or faster on a CPU anyway.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # Beyond the threshold softplus returns z; log1p(exp(-z)) is below float32's resolution past 20
    # but not float64's (past 40).
    return F.softplus(z, threshold=40.0 if z.dtype == torch.float64 else 20.0)


def swoosh_l(x: torch.Tensor) -> torch.Tensor:
    """SwooshL(x) = log(1 + exp(x - 4)) - 0.08 x - 0.035."""
    x32 = _at_least_fp32(x)
    # In-place on softplus' output is autograd-safe (its backward uses the input) and saves two temporaries.
    return _softplus(x32 - 4.0).add_(x32, alpha=-0.08).sub_(0.035).to(x.dtype)


def swoosh_r(x: torch.Tensor) -> torch.Tensor:
    """SwooshR(x) = log(1 + exp(x - 1)) - 0.08 x - 0.313261687 (the constant is log(1 + e^-1), so
    SwooshR(0) = 0)."""
    x32 = _at_least_fp32(x)
    return _softplus(x32 - 1.0).add_(x32, alpha=-0.08).sub_(0.313261687).to(x.dtype)


class SwooshR(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swoosh_r(x)


_HALF = (torch.float16, torch.bfloat16)


def _cpu_autocast_half() -> bool:
    try:
        on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    except TypeError:  # torch < 2.4
        on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return on and dtype in _HALF


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _half_on_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Would this convolution run in fp16/bf16 on a CPU (half input or weight, or CPU autocast)?"""
    return x.device.type == "cpu" and x.dtype != torch.float64 and (
        x.dtype in _HALF or weight.dtype in _HALF or _cpu_autocast_half())


def cpu_fp32_functional_conv(conv_fn: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], **kwargs) -> torch.Tensor:
    """``conv_fn(x, weight, bias, **kwargs)`` (e.g. ``F.conv2d``), computed in fp32 on CPU whenever it
    would otherwise run in fp16/bf16. The result has the incoming dtype of ``x`` (under autocast an
    fp32 input gives an fp32 output); gradients flow back through the casts. Other devices and
    fp32/fp64 computations are untouched."""
    if not _half_on_cpu(x, weight):
        if x.dtype != weight.dtype and not _autocast_on(x.device.type):
            # DeepSpeed fp16/bf16 casts every parameter (frozen encoders too) to half and runs the
            # module without autocast, so fp32 features meet half weights on CUDA: compute in the
            # weight's dtype and hand back the caller's dtype.
            return conv_fn(x.to(weight.dtype), weight, bias, **kwargs).to(x.dtype)
        return conv_fn(x, weight, bias, **kwargs)
    with torch.autocast("cpu", enabled=False):
        y = conv_fn(x.float(), weight.float(), None if bias is None else bias.float(), **kwargs)
    return y.to(x.dtype)


def cpu_fp32_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for an ``nn.Conv1d``/``nn.Conv2d``, in fp32 on CPU as :func:`cpu_fp32_functional_conv`."""
    return cpu_fp32_functional_conv(conv._conv_forward, x, conv.weight, conv.bias)


def decode_autocast_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The argument of a model's ``set_decode_dtype``, checked: None for float32 (no autocast), else
    the half dtype its matmuls run in."""
    if dtype not in (torch.float32, *_HALF):
        raise ValueError(f"decode dtype must be float32, float16 or bfloat16, got {dtype}")
    return None if dtype == torch.float32 else dtype


def autocast_to(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype``, or no context at all for None: ``autocast(enabled=False)`` would switch
    off an autocast the caller (e.g. the training loop) has on."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def pointwise_conv1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a kernel-size-1 ``nn.Conv1d`` on x (N, C, T). Where :func:`cpu_fp32_conv` would
    force fp32 (half precision on CPU), it runs as the matmul it is, in the half dtype: no oneDNN
    convolution kernel to compile, and a bf16 matmul is several times an fp32 convolution on AMX CPUs
    (FireRed Conformer, batch 16 x 5 s: 51 -> 11 ms per pointwise convolution). Everywhere else it is
    the convolution itself, so fp32 results are exactly ``conv(x)``'s."""
    if conv.kernel_size != (1,) or conv.stride != (1,) or conv.groups != 1 or conv.padding != (0,):
        raise ValueError(f"not a pointwise convolution: {conv}")
    if not _half_on_cpu(x, conv.weight):
        return cpu_fp32_functional_conv(conv._conv_forward, x, conv.weight, conv.bias)
    if _cpu_autocast_half():  # autocast picks the dtype
        return F.linear(x.transpose(1, 2), conv.weight.squeeze(-1), conv.bias).transpose(1, 2)
    dtype = x.dtype if x.dtype in _HALF else conv.weight.dtype
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return F.linear(x.transpose(1, 2).to(dtype), conv.weight.squeeze(-1).to(dtype), bias).transpose(1, 2)


__all__ = ["swoosh_l", "swoosh_r", "SwooshR", "cpu_fp32_conv", "cpu_fp32_functional_conv", "pointwise_conv1d",
           "decode_autocast_dtype", "autocast_to"]
