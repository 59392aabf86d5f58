"""FireRedASR Conformer encoder (parameter names match the released ``model_state_dict``).

Structure (per block): x + 1/2 FFN(x) -> rel-pos MHSA (separate LayerNorms on q, k, v; residual is the
un-normalised input) -> conv module -> x + 1/2 FFN(x) -> LayerNorm.

Time axis: the released model right-pads the input with ``context - 1 = 6`` zero frames before the
two stride-2 3x3 convolutions, so the output has ``T_enc = ((T + 3) // 2) // 2`` frames while the valid
length is computed from the unpadded length, ``L = ((T - 3) // 2 + 1 - 3) // 2 + 1``. Frames >= L are
masked as attention keys and zeroed inside the conv module, but they are still computed (as queries)
and returned; downstream code must respect ``out_lens``. Input frames >= ``feature_lens`` are set to 0
first, so the output does not depend on the batch's padding value.

Reported lengths (:attr:`ConformerEncoder.lengths_include_context`): L by default (the AED masks its
cross-attention with them). The released FireRedASR-LLM instead feeds its adapter every frame of the
utterance padded only by the encoder's own context, ``T_enc(T)`` frames (frames L..T_enc(T)-1 come from
the zero padding), so the registered speech encoder reports ``T_enc(T)`` per utterance. Because frames
>= L are masked as keys and zeroed in the conv module, frames < T_enc(T) of a row are the same in any
padded batch as alone; only frames >= T_enc(T) depend on the batch.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmasr.layers import cpu_fp32_conv, pointwise_conv1d


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Valid encoder frames for ``lengths`` input frames (two 3x3 stride-2 convs, no padding)."""
    return ((lengths - 3) // 2 + 1 - 3) // 2 + 1


def padded_encoder_length(num_frames, right_pad: int = 6):
    """Encoder output frames for a (padded) input of ``num_frames`` frames (int or tensor)."""
    t = num_frames + right_pad
    return ((t - 3) // 2 + 1 - 3) // 2 + 1


def set_dropout(module: nn.Module, p: float) -> None:
    """Set the probability of every nn.Dropout in ``module`` (dropout schedules, fine-tuning)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


class Swish(nn.Module):
    # Written out (not F.silu) to stay bit-compatible with the released model's arithmetic.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class Conv2dSubsampling(nn.Module):
    """(N, T, idim) -> (N, T', d_model), 4x subsampling in time (10 ms -> 40 ms)."""

    def __init__(self, idim: int, d_model: int, out_channels: int = 32):
        super().__init__()
        self.conv = nn.ModuleList(
            [
                nn.Conv2d(1, out_channels, 3, 2),
                nn.ReLU(),
                nn.Conv2d(out_channels, out_channels, 3, 2),
                nn.ReLU(),
            ]
        )
        freq = ((idim - 1) // 2 - 1) // 2
        self.out = nn.Linear(out_channels * freq, d_model)
        # 3 frames of left and right context around the current one; the encoder right-pads
        # ``context - 1`` frames so the last input frames still produce outputs.
        self.context = 7

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        for layer in self.conv:
            x = cpu_fp32_conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        n, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(n, t, c * f))


def sinusoid_table(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """sin on even, cos on odd channels; ``positions`` float (P,) -> (P, d_model)."""
    # log(10000) rounded to float32 first, as the released code does.
    div = torch.exp(torch.arange(0, d_model, 2).float() * -(torch.log(torch.tensor(10000.0)).item() / d_model))
    pe = torch.zeros(positions.numel(), d_model)
    pe[:, 0::2] = torch.sin(positions[:, None] * div)
    pe[:, 1::2] = torch.cos(positions[:, None] * div)
    return pe


class RelPositionalEncoding(nn.Module):
    """Table of relative positions max_len-1 ... 0 ... -(max_len-1): buffer ``pe`` (1, 2*max_len-1, d).

    The released model always uses max_len 5000 (its checkpoint holds the (1, 9999, d) buffer).
    """

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        pos = torch.arange(0, max_len).float()
        positive = torch.flip(sinusoid_table(pos, d_model), [0])
        negative = sinusoid_table(-pos, d_model)[1:]
        self.register_buffer("pe", torch.cat([positive, negative], dim=0).unsqueeze(0))

    def forward(self, t: int) -> torch.Tensor:
        """(1, 2t-1, d): relative positions t-1 ... -(t-1)."""
        center = self.pe.size(1) // 2
        if t > center + 1:
            raise ValueError(f"input of {t} encoder frames exceeds the positional table ({center + 1})")
        return self.pe[:, center - t + 1 : center + t]


class ConformerFeedForward(nn.Module):
    def __init__(self, d_model: int, dropout_rate: float = 0.1):
        super().__init__()
        # Indices 0/1/4 carry the checkpoint weights: LN, expand, (swish, dropout), project, dropout.
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, d_model * 4),
            Swish(),
            nn.Dropout(dropout_rate),
            nn.Linear(d_model * 4, d_model),
            nn.Dropout(dropout_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class RelPosMultiHeadAttention(nn.Module):
    def __init__(self, n_head: int, d_model: int, residual_dropout: float = 0.1):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model {d_model} not divisible by n_head {n_head}")
        self.n_head = n_head
        self.d_k = d_model // n_head
        self.scale = 1.0 / math.sqrt(self.d_k)
        self.w_qs = nn.Linear(d_model, d_model, bias=False)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model, bias=False)
        self.layer_norm_q = nn.LayerNorm(d_model)
        self.layer_norm_k = nn.LayerNorm(d_model)
        self.layer_norm_v = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(residual_dropout)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    @staticmethod
    def rel_shift(bd: torch.Tensor) -> torch.Tensor:
        """(N, H, T, 2T-1) scores against positions T-1..-(T-1) -> (N, H, T, T) for key j of query i."""
        t = bd.size(2)
        idx = torch.arange(t, device=bd.device)
        idx = (idx[None, :] - idx[:, None] + t - 1).expand(*bd.shape[:2], t, t)
        return bd.gather(-1, idx)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x (N, T, d); pos_emb (1, 2T-1, d); key_valid (N, T) bool."""
        n, t, _ = x.shape
        h, dk = self.n_head, self.d_k
        q = self.w_qs(self.layer_norm_q(x)).view(n, t, h, dk)
        k = self.w_ks(self.layer_norm_k(x)).view(n, t, h, dk).transpose(1, 2)
        v = self.w_vs(self.layer_norm_v(x)).view(n, t, h, dk).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, h, dk).transpose(1, 2)

        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = self.rel_shift(torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1)))
        scores = (ac + bd) * self.scale

        masked = ~key_valid[:, None, None, :]
        # Fully masked rows (empty input) give NaN in softmax; zero them like the reference.
        attn = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(n, t, h * dk)
        return self.dropout(self.fc(out)) + x


class ConformerConvolution(nn.Module):
    def __init__(self, d_model: int, kernel_size: int = 33, dropout_rate: float = 0.1):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel_size must be odd, got {kernel_size}")
        self.pre_layer_norm = nn.LayerNorm(d_model)
        self.pointwise_conv1 = nn.Conv1d(d_model, d_model * 4, kernel_size=1, bias=False)
        self.depthwise_conv = nn.Conv1d(
            d_model * 2, d_model * 2, kernel_size, padding=(kernel_size - 1) // 2, groups=d_model * 2, bias=False
        )
        # A LayerNorm, named batch_norm in the released checkpoints.
        self.batch_norm = nn.LayerNorm(d_model * 2)
        self.swish = Swish()
        self.pointwise_conv2 = nn.Conv1d(d_model * 2, d_model, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (N, T, d); valid (N, T) bool. Padding frames are zeroed before and after the convs."""
        pad = ~valid[:, :, None]
        out = self.pre_layer_norm(x).masked_fill(pad, 0.0).transpose(1, 2)
        # The depthwise conv in fp32 on CPU (oneDNN's fp16/bf16 depthwise kernel can take minutes to
        # JIT-compile); the pointwise ones are matmuls, in the autocast dtype.
        out = F.glu(pointwise_conv1d(self.pointwise_conv1, out), dim=1)
        out = cpu_fp32_conv(self.depthwise_conv, out).transpose(1, 2)
        out = self.swish(self.batch_norm(out)).transpose(1, 2)
        out = self.dropout(pointwise_conv1d(self.pointwise_conv2, out)).transpose(1, 2).masked_fill(pad, 0.0)
        return out + x


class RelPosEmbConformerBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, residual_dropout: float = 0.1, dropout_rate: float = 0.1,
                 kernel_size: int = 33):
        super().__init__()
        self.ffn1 = ConformerFeedForward(d_model, dropout_rate)
        self.mhsa = RelPosMultiHeadAttention(n_head, d_model, residual_dropout)
        self.conv = ConformerConvolution(d_model, kernel_size, dropout_rate)
        self.ffn2 = ConformerFeedForward(d_model, dropout_rate)
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # Macaron half-step FFN written as 0.5 x + 0.5 (x + net(x)), the released arithmetic.
        out = 0.5 * x + 0.5 * self.ffn1(x)
        out = self.mhsa(out, pos_emb, valid)
        out = self.conv(out, valid)
        out = 0.5 * out + 0.5 * self.ffn2(out)
        return self.layer_norm(out)


class ConformerEncoder(nn.Module):
    """FireRedASR Conformer; also a registered speech encoder ("firered").

    forward(features (N, T, 80) CMVN-normalised Kaldi fbank, feature_lens (N,)) ->
    (out (N, T_enc, d_model), out_lens (N,)).
    """

    feature_dim = 80
    feature_type = "kaldi-fbank-cmvn"
    # forward's lengths: False -> L (valid frames, also used for the masks inside), True -> T_enc(T),
    # the frames the released FireRedASR-LLM splices for an utterance (see the module docstring).
    lengths_include_context = False

    def __init__(
        self,
        idim: int,
        n_layers: int,
        n_head: int,
        d_model: int,
        residual_dropout: float = 0.1,
        dropout_rate: float = 0.1,
        kernel_size: int = 33,
        pe_maxlen: int = 5000,
    ):
        super().__init__()
        self.odim = d_model
        self.output_dim = d_model
        self.feature_dim = idim
        self.input_preprocessor = Conv2dSubsampling(idim, d_model)
        # pe_maxlen is not used here: the released model always builds a 5000-position table.
        self.positional_encoding = RelPositionalEncoding(d_model)
        self.dropout = nn.Dropout(residual_dropout)
        self.layer_stack = nn.ModuleList(
            [RelPosEmbConformerBlock(d_model, n_head, residual_dropout, dropout_rate, kernel_size) for _ in range(n_layers)]
        )

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor, pad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        # Frames past each utterance's length become 0, the value the released model pads with, so
        # no output frame (not even those >= out_lens) depends on how the batch was padded.
        lens = feature_lens.to(features.device)
        beyond = torch.arange(features.size(1), device=features.device)[None, :] >= lens[:, None]
        features = features.masked_fill(beyond[:, :, None], 0.0)
        right_pad = self.input_preprocessor.context - 1 if pad else 0
        features = F.pad(features, (0, 0, 0, right_pad), value=0.0)
        x = self.input_preprocessor(features)
        out_lens = subsampled_lengths(feature_lens.to(x.device))
        valid = torch.arange(x.size(1), device=x.device)[None, :] < out_lens[:, None]
        x = self.dropout(x)
        pos_emb = self.dropout(self.positional_encoding(x.size(1)))
        for layer in self.layer_stack:
            x = layer(x, pos_emb, valid)
        if self.lengths_include_context:
            return x, padded_encoder_length(feature_lens.to(x.device), right_pad)
        return x, out_lens


__all__ = ["set_dropout", "ConformerEncoder", "padded_encoder_length", "subsampled_lengths", "sinusoid_table"]
