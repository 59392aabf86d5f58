"""Zipformer's Swoosh activations, shared by the Zipformer encoder and the SpeechLLM projector.

Evaluated in at least float32 (float64 stays float64) (softplus is exact and overflow-free there: it returns
``x`` itself beyond its threshold) and returned in the input's dtype, so fp16/bf16 activations
never overflow inside ``exp``.
"""
from __future__ import annotations

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


__all__ = ["swoosh_l", "swoosh_r", "SwooshR"]
