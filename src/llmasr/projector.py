"""Projector from speech-encoder frames into the LLM embedding space.

k consecutive encoder frames are concatenated (frame-major: ``[f0 | f1 | ... | f(k-1)]``), then
``Linear(k*C, H) -> activation -> Linear(H, H)``, with a leading Dropout. The module layout is
``proj = Sequential(Dropout, Linear, act, Linear)`` so the state-dict keys are ``proj.1.*`` and
``proj.3.*``, exactly those of SpeechLLM's ``EncoderProjector`` (zhu-han/SpeechLLM ``src/model.py``).

FireRedASR's ``Adapter`` and icefall's ``whisper_llm_zh`` projector use the same computation with
keys ``linear1.*`` / ``linear2.*``; :func:`llmasr.checkpoint.remap_linear12_keys` converts such state dicts.
"""
from __future__ import annotations

from typing import Mapping, Tuple

import torch
import torch.nn as nn

from llmasr.layers import SwooshR, swoosh_r  # noqa: F401 (swoosh_r re-exported)

ACTIVATIONS = {
    "swooshr": SwooshR,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class Projector(nn.Module):
    """Concatenate ``downsample_rate`` frames and map them to ``llm_dim``.

    Args:
        encoder_dim: C, the encoder output dimension.
        llm_dim: H, the LLM hidden size.
        downsample_rate: k, number of consecutive frames concatenated into one LLM position.
        activation: "swooshr" (SpeechLLM), "relu" (FireRedASR-LLM, whisper_llm_zh), "gelu", "silu".
        dropout: dropout on the concatenated input (SpeechLLM: 0.1; inactive in eval mode).
    """

    def __init__(
        self,
        encoder_dim: int,
        llm_dim: int,
        downsample_rate: int = 4,
        activation: str = "swooshr",
        dropout: float = 0.1,
    ):
        super().__init__()
        if downsample_rate < 1:
            raise ValueError(f"downsample_rate must be >= 1, got {downsample_rate}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown projector activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.encoder_dim = encoder_dim
        self.llm_dim = llm_dim
        self.downsample_rate = downsample_rate
        self.activation = activation
        self.proj = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(encoder_dim * downsample_rate, llm_dim),
            ACTIVATIONS[activation](),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x: (N, T, C) padded encoder output, lens: (N,) valid frames -> ((N, T//k, H), lens // k).

        Trailing frames that do not fill a group of k are dropped (per utterance too: lens // k), so
        no output position mixes padding into a valid frame group.
        """
        n, t, c = x.shape
        if c != self.encoder_dim:
            raise ValueError(f"projector expects encoder_dim={self.encoder_dim}, got input of shape {tuple(x.shape)}")
        k = self.downsample_rate
        t_out = t // k
        # The whole padded batch goes through the Linear layers (as in SpeechLLM): the per-row
        # results do not depend on which other rows are in the batch, and the GEMM shapes stay
        # identical to the reference implementation.
        x = x[:, : t_out * k].contiguous().view(n, t_out, k * c)
        return self.proj(x), torch.div(lens, k, rounding_mode="floor")

    def extra_repr(self) -> str:
        return f"downsample_rate={self.downsample_rate}, activation={self.activation}"


def infer_projector_shape(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> Tuple[int, int]:
    """(k*C, H) of a Projector state dict (keys ``{prefix}proj.1.weight``)."""
    w = state_dict[f"{prefix}proj.1.weight"]
    return int(w.shape[1]), int(w.shape[0])


__all__ = ["Projector", "SwooshR", "swoosh_r", "infer_projector_shape", "ACTIVATIONS"]
