"""Building blocks of icefall's non-streaming Zipformer2 encoder (``egs/librispeech/ASR/zipformer``).

An independent re-implementation of the *inference* computation of icefall's ``Conv2dSubsampling`` and
``Zipformer2`` whose parameter names and shapes are exactly those of icefall checkpoints, so an icefall
``pretrained.pt`` loads with ``strict=True``.

Layout: icefall works time-first ``(T, N, C)``; we work batch-first ``(N, T, C)`` throughout. Attention
weights are ``(N, H, T_query, T_key)``.

Training: icefall's training-only machinery (Balancer, Whiten, ScaleGrad, limit_param_value - all
identity in the forward pass - plus scheduled layer skipping, feature masking and random const-attention)
is deliberately left out: in eval mode it does nothing, and a fine-tuned pretrained encoder trains fine
with plain autograd. Optional plain dropout (``dropout``) stands in for icefall's late-schedule dropouts.

Mixed precision: like icefall under autocast, the residual stream stays in fp32 (BiasNorm promotes to its
fp32 parameters), attention softmax, BiasNorm statistics and the Swoosh activations are computed in fp32.
On CPU every convolution runs in fp32 even under fp16/bf16 autocast or with fp16/bf16 inputs
(:func:`llmasr.layers.cpu_fp32_conv`): oneDNN can spend minutes JIT-compiling half-precision depthwise kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmasr.layers import SwooshR, cpu_fp32_functional_conv, swoosh_l, swoosh_r


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that runs in fp32 on CPU
    (:func:`cpu_fp32_functional_conv`)."""

    def forward(self, x: Tensor) -> Tensor:
        return cpu_fp32_functional_conv(self._conv_forward, x, self.weight, self.bias)



# ---------------------------------------------------------------------------------------------------------
# Elementwise pieces
# ---------------------------------------------------------------------------------------------------------


def _shared_dropout(x: Tensor, p: float, shared_dim: int, training: bool) -> Tensor:
    """Dropout whose mask is shared along ``shared_dim`` (icefall shares it over time)."""
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shape[shared_dim] = 1
    keep = torch.rand(shape, device=x.device) >= p
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def _scale_init_(linear: nn.Module, initial_scale: float) -> None:
    """icefall's ``ScaledLinear`` init: default init scaled down, bias ~ U(-0.1 s, 0.1 s).

    Only matters for random init (training from scratch); checkpoints overwrite it.
    """
    with torch.no_grad():
        linear.weight.mul_(initial_scale)
        if linear.bias is not None:
            linear.bias.uniform_(-0.1 * initial_scale, 0.1 * initial_scale)


class BiasNorm(nn.Module):
    """x * exp(log_scale) / rms(x - bias) over the channel (last) axis.

    The statistics are computed in fp32; the result has the promoted dtype of input and parameters, so under
    autocast (fp16 input, fp32 parameters) the residual stream is fp32, as in icefall.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.bias = nn.Parameter(torch.empty(num_channels).normal_(mean=0.0, std=1e-4))

    def forward(self, x: Tensor) -> Tensor:
        out_dtype = torch.promote_types(x.dtype, self.bias.dtype)
        x32 = x.float()
        inv_rms = (x32 - self.bias.float()).pow(2).mean(dim=-1, keepdim=True).rsqrt()
        return (x32 * (inv_rms * self.log_scale.float().exp())).to(out_dtype)


# ---------------------------------------------------------------------------------------------------------
# Front end: Conv2dSubsampling (T -> (T - 7) // 2)
# ---------------------------------------------------------------------------------------------------------


class ConvNeXt(nn.Module):
    """Residual depthwise-7x7 / pointwise / SwooshL / pointwise block on (N, C, T, F)."""

    def __init__(self, channels: int, hidden_ratio: int = 3, kernel_size: Tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        padding = ((kernel_size[0] - 1) // 2, (kernel_size[1] - 1) // 2)
        hidden = channels * hidden_ratio
        self.depthwise_conv = Conv2d(channels, channels, kernel_size, groups=channels, padding=padding)
        self.pointwise_conv1 = Conv2d(channels, hidden, kernel_size=1)
        self.pointwise_conv2 = Conv2d(hidden, channels, kernel_size=1)
        _scale_init_(self.pointwise_conv2, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        y = self.pointwise_conv1(self.depthwise_conv(x))
        y = self.pointwise_conv2(swoosh_l(y))
        return x + y


class Conv2dSubsampling(nn.Module):
    """icefall's Zipformer front end: (N, T, F) -> (N, (T - 7) // 2, out_channels).

    Indices of ``conv`` match icefall's ``nn.Sequential`` (its ScaleGrad/Balancer slots are identities here)
    so that the checkpoint keys ``encoder_embed.conv.{0,4,7}.*`` line up.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        layer1_channels: int = 8,
        layer2_channels: int = 32,
        layer3_channels: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels < 7:
            raise ValueError(f"Conv2dSubsampling needs at least 7 feature bins, got {in_channels}")
        self.conv = nn.Sequential(
            Conv2d(1, layer1_channels, kernel_size=3, padding=(0, 1)),  # 0: time unpadded, freq padded
            nn.Identity(),  # 1: ScaleGrad (gradient-only in icefall)
            nn.Identity(),  # 2: Balancer (gradient-only)
            SwooshR(),  # 3
            Conv2d(layer1_channels, layer2_channels, kernel_size=3, stride=2),  # 4
            nn.Identity(),  # 5: Balancer
            SwooshR(),  # 6
            Conv2d(layer2_channels, layer3_channels, kernel_size=3, stride=(1, 2)),  # 7
            nn.Identity(),  # 8: Balancer
            SwooshR(),  # 9
        )
        self.convnext = ConvNeXt(layer3_channels)
        self.out_width = (((in_channels - 1) // 2) - 1) // 2
        self.out = nn.Linear(self.out_width * layer3_channels, out_channels)
        self.out_norm = BiasNorm(out_channels)
        self.dropout = dropout

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        x = self.conv(x.unsqueeze(1))  # (N, C, T', F')
        # Channels-last makes oneDNN's depthwise 7x7 and the 1x1 convs of ConvNeXt several times faster
        # on CPU (and suits tensor cores on GPU); values are unchanged.
        x = self.convnext(x.contiguous(memory_format=torch.channels_last))
        n, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(n, t, c * f)  # channel-major, then frequency (icefall's order)
        x = self.out_norm(self.out(x))
        x = _shared_dropout(x, self.dropout, shared_dim=1, training=self.training)
        return x, torch.div(x_lens - 7, 2, rounding_mode="floor")


# ---------------------------------------------------------------------------------------------------------
# Zipformer2 layer components
# ---------------------------------------------------------------------------------------------------------


def compact_rel_pos_table(max_len: int, dim: int, device, length_factor: float = 1.0) -> Tensor:
    """CompactRelPositionalEncoding for relative offsets -(max_len-1) .. (max_len-1): (2*max_len-1, dim), fp32.

    Offsets are squashed log-like beyond ~sqrt(dim), mapped to (-pi/2, pi/2) by atan and Fourier-encoded
    (cos in even, sin in odd columns); the last column is a constant 1 that acts as a bias. Each row
    depends only on its offset, so the table for a shorter sequence is the centred slice of this one.
    """
    if dim % 2 != 0:
        raise ValueError(f"pos_dim must be even, got {dim}")
    offsets = torch.arange(-(max_len - 1), max_len, device=device, dtype=torch.float32).unsqueeze(1)
    freqs = torch.arange(1, dim // 2 + 1, device=device, dtype=torch.float32)
    compression = dim ** 0.5
    # d(compressed)/d(offset) == 1 at 0; grows only logarithmically for large |offset|.
    compressed = compression * offsets.sign() * ((offsets.abs() + compression).log() - math.log(compression))
    length_scale = length_factor * dim / (2.0 * math.pi)
    angle = (compressed / length_scale).atan() * freqs
    pe = torch.stack((angle.cos(), angle.sin()), dim=-1).flatten(1)
    pe[:, -1] = 1.0
    return pe


def _slice_rel_pos(table: Tensor, seq_len: int) -> Tensor:
    """Rows of ``table`` for offsets -(seq_len-1) .. (seq_len-1)."""
    center = table.size(0) // 2
    return table[center - seq_len + 1 : center + seq_len]


class RelPositionMultiheadAttentionWeights(nn.Module):
    """Attention weights (N, H, T, T) from content scores q.k plus relative-position scores p.pos(j - i).

    No 1/sqrt(d) factor: icefall's trained projections absorb it.
    """

    def __init__(self, embed_dim: int, pos_dim: int, num_heads: int, query_head_dim: int, pos_head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.query_head_dim = query_head_dim
        self.pos_head_dim = pos_head_dim
        self.in_proj = nn.Linear(embed_dim, (2 * query_head_dim + pos_head_dim) * num_heads)
        self.linear_pos = nn.Linear(pos_dim, num_heads * pos_head_dim, bias=False)
        _scale_init_(self.in_proj, query_head_dim ** -0.25)
        _scale_init_(self.linear_pos, 0.05)

    def forward(self, x: Tensor, pos_emb: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        n, t, _ = x.shape
        h, dq, dp = self.num_heads, self.query_head_dim, self.pos_head_dim
        proj = self.in_proj(x)
        q = proj[..., : h * dq].reshape(n, t, h, dq).transpose(1, 2)  # (N, H, T, dq)
        k = proj[..., h * dq : 2 * h * dq].reshape(n, t, h, dq).transpose(1, 2)
        p = proj[..., 2 * h * dq :].reshape(n, t, h, dp).transpose(1, 2)  # (N, H, T, dp)

        scores = torch.matmul(q, k.transpose(2, 3))  # (N, H, T, T)

        # pos_emb: (2T-1, pos_dim), row r <-> offset r - (T-1).
        pos = self.linear_pos(pos_emb).reshape(2 * t - 1, h, dp).permute(1, 2, 0)  # (H, dp, 2T-1)
        pos_scores = torch.matmul(p, pos).contiguous()  # (N, H, T, 2T-1)
        # Relative -> absolute: out[..., i, j] = pos_scores[..., i, (T-1) - i + j], i.e. offset j - i.
        # A strided view does it without materialising an index tensor.
        s = pos_scores.stride()
        pos_scores = pos_scores.as_strided(
            (n, h, t, t), (s[0], s[1], s[2] - s[3], s[3]), pos_scores.storage_offset() + s[3] * (t - 1)
        )
        scores = scores + pos_scores

        if key_padding_mask is not None:
            # -1000 (not -inf): exp underflows to exactly 0 and fully masked rows cannot produce NaN.
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], -1000.0)
        return scores.float().softmax(dim=-1).to(scores.dtype)


class SelfAttention(nn.Module):
    """Values projected per head, mixed by precomputed attention weights, projected back."""

    def __init__(self, embed_dim: int, num_heads: int, value_head_dim: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, num_heads * value_head_dim)
        self.out_proj = nn.Linear(num_heads * value_head_dim, embed_dim)
        _scale_init_(self.out_proj, 0.05)

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        n, t, _ = x.shape
        h = attn_weights.shape[1]
        v = self.in_proj(x).reshape(n, t, h, -1).transpose(1, 2)  # (N, H, T, dv)
        y = torch.matmul(attn_weights, v).transpose(1, 2).reshape(n, t, -1)
        return self.out_proj(y)


class NonlinAttention(nn.Module):
    """tanh-gated values mixed over time by ONE head of the shared attention weights, then gated again."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.in_proj = nn.Linear(channels, 3 * hidden_channels)
        self.out_proj = nn.Linear(hidden_channels, channels)
        _scale_init_(self.out_proj, 0.05)

    def forward(self, x: Tensor, attn_weights: Tensor) -> Tensor:
        # attn_weights: (N, 1, T, T) - icefall feeds only the first head to this module.
        s, v, gate = self.in_proj(x).chunk(3, dim=-1)
        v = v * torch.tanh(s)
        v = torch.matmul(attn_weights, v.unsqueeze(1)).squeeze(1)  # (N, T, hidden)
        return self.out_proj(v * gate)


class FeedforwardModule(nn.Module):
    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_proj = nn.Linear(embed_dim, feedforward_dim)
        self.out_proj = nn.Linear(feedforward_dim, embed_dim)
        _scale_init_(self.out_proj, 0.1)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        y = swoosh_l(self.in_proj(x))
        y = _shared_dropout(y, self.dropout, shared_dim=1, training=self.training)  # mask shared over time
        return self.out_proj(y)


class ConvolutionModule(nn.Module):
    """GLU (sigmoid gate) -> padding zeroed -> depthwise conv over time -> SwooshR -> projection."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"cnn_module_kernel must be odd, got {kernel_size}")
        self.in_proj = nn.Linear(channels, 2 * channels)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, kernel_size, groups=channels, padding=kernel_size // 2
        )
        self.out_proj = nn.Linear(channels, channels)
        _scale_init_(self.out_proj, 0.05)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        y, s = self.in_proj(x).chunk(2, dim=-1)
        y = y * torch.sigmoid(s)
        if key_padding_mask is not None:
            # Padded frames must not leak into valid ones through the kernel.
            y = y.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
        # Depthwise conv over time, run as a 2-D conv on the (N, C, 1, T) channels-last *view* of our
        # (N, T, C) tensor: no transposed copies, and oneDNN's channels-last depthwise kernel is 10-100x
        # faster on CPU than Conv1d on (N, C, T). Same weights (C, 1, K) viewed as (C, 1, 1, K).
        # On CPU in fp32 even under half autocast (cpu_fp32_functional_conv: oneDNN's fp16/bf16 depthwise
        # kernel can take minutes to JIT-compile).
        conv = self.depthwise_conv
        y = cpu_fp32_functional_conv(
            F.conv2d,
            y.unsqueeze(1).permute(0, 3, 1, 2),
            conv.weight.unsqueeze(2),
            conv.bias,
            padding=(0, conv.kernel_size[0] // 2),
            groups=conv.groups,
        )
        y = y.squeeze(2).transpose(1, 2)  # (N, T, C); contiguous because the conv output is channels-last
        return self.out_proj(swoosh_r(y))


class BypassModule(nn.Module):
    """Learned per-channel interpolation: orig + (new - orig) * bypass_scale."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))

    def forward(self, src_orig: Tensor, src: Tensor) -> Tensor:
        return src_orig + (src - src_orig) * self.bypass_scale


class Zipformer2EncoderLayer(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        pos_dim: int,
        num_heads: int,
        query_head_dim: int,
        pos_head_dim: int,
        value_head_dim: int,
        feedforward_dim: int,
        cnn_module_kernel: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bypass = BypassModule(embed_dim)
        self.bypass_mid = BypassModule(embed_dim)
        self.self_attn_weights = RelPositionMultiheadAttentionWeights(
            embed_dim, pos_dim, num_heads, query_head_dim, pos_head_dim
        )
        self.self_attn1 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.self_attn2 = SelfAttention(embed_dim, num_heads, value_head_dim)
        self.feed_forward1 = FeedforwardModule(embed_dim, (feedforward_dim * 3) // 4, dropout)
        self.feed_forward2 = FeedforwardModule(embed_dim, feedforward_dim, dropout)
        self.feed_forward3 = FeedforwardModule(embed_dim, (feedforward_dim * 5) // 4, dropout)
        self.nonlin_attention = NonlinAttention(embed_dim, hidden_channels=3 * embed_dim // 4)
        self.conv_module1 = ConvolutionModule(embed_dim, cnn_module_kernel)
        self.conv_module2 = ConvolutionModule(embed_dim, cnn_module_kernel)
        # Present in every icefall checkpoint but unused by icefall's forward (a leftover); kept so that
        # checkpoints load strictly.
        self.bypass_scale = nn.Parameter(torch.full((embed_dim,), 0.5))
        self.norm = BiasNorm(embed_dim)

    def forward(self, src: Tensor, pos_emb: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        src_orig = src
        attn_weights = self.self_attn_weights(src, pos_emb, key_padding_mask)  # (N, H, T, T)

        src = src + self.feed_forward1(src)
        src = src + self.nonlin_attention(src, attn_weights[:, 0:1])
        src = src + self.self_attn1(src, attn_weights)
        src = src + self.conv_module1(src, key_padding_mask)
        src = src + self.feed_forward2(src)
        src = self.bypass_mid(src_orig, src)
        src = src + self.self_attn2(src, attn_weights)
        src = src + self.conv_module2(src, key_padding_mask)
        src = src + self.feed_forward3(src)
        src = self.bypass(src_orig, self.norm(src))

        if self.training and torch.is_grad_enabled() and self.bypass_scale.requires_grad:
            # Tie the unused legacy parameter into the graph with weight 0 so that DDP without
            # find_unused_parameters=True does not fail when the encoder is unfrozen.
            src = src + 0.0 * self.bypass_scale.sum()
        return src


class Zipformer2Encoder(nn.Module):
    """A stack of layers at one frame rate; they share one relative positional encoding."""

    def __init__(self, layers: List[Zipformer2EncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos_table: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        pos_emb = _slice_rel_pos(pos_table, src.size(1)).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos_emb, key_padding_mask)
        return src


class SimpleDownsample(nn.Module):
    """Softmax(bias)-weighted average of groups of ``downsample`` frames.

    The sequence is right-padded to a multiple of ``downsample`` by repeating its last frame (the batch's
    last frame: for a shorter utterance this is a padding frame, as in icefall).
    """

    def __init__(self, downsample: int) -> None:
        super().__init__()
        self.downsample = downsample
        self.bias = nn.Parameter(torch.zeros(downsample))

    def forward(self, src: Tensor) -> Tensor:
        n, t, c = src.shape
        ds = self.downsample
        t_out = (t + ds - 1) // ds
        pad = t_out * ds - t
        if pad > 0:
            src = torch.cat((src, src[:, -1:].expand(n, pad, c)), dim=1)
        weights = self.bias.softmax(dim=0).unsqueeze(-1)  # (ds, 1)
        return (src.reshape(n, t_out, ds, c) * weights).sum(dim=2)


class DownsampledZipformer2Encoder(nn.Module):
    """Downsample -> stack -> repeat frames back up -> learned bypass with the input."""

    def __init__(self, encoder: Zipformer2Encoder, dim: int, downsample: int) -> None:
        super().__init__()
        self.downsample_factor = downsample
        self.downsample = SimpleDownsample(downsample)
        self.encoder = encoder
        self.out_combiner = BypassModule(dim)

    def forward(self, src: Tensor, pos_table: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        src_orig = src
        y = self.encoder(self.downsample(src), pos_table, key_padding_mask)
        y = y.repeat_interleave(self.downsample_factor, dim=1)[:, : src_orig.size(1)]
        return self.out_combiner(src_orig, y)


def _fit_channels(x: Tensor, num_channels: int) -> Tensor:
    """Truncate or zero-extend the channel axis (icefall's convert_num_channels)."""
    c = x.size(-1)
    if num_channels <= c:
        return x[..., :num_channels]
    return F.pad(x, (0, num_channels - c))


class Zipformer2(nn.Module):
    """Six (or any number of) stacks at different frame rates, combined and downsampled by 2 at the output.

    forward(x (N, T, C0), x_lens (N,), key_padding_mask (N, T) True=padding)
      -> (N, (T+1)//2, max(encoder_dim)), (x_lens + 1) // 2
    """

    def __init__(
        self,
        downsampling_factor: Sequence[int],
        encoder_dim: Sequence[int],
        num_encoder_layers: Sequence[int],
        query_head_dim: Sequence[int],
        pos_head_dim: Sequence[int],
        value_head_dim: Sequence[int],
        num_heads: Sequence[int],
        feedforward_dim: Sequence[int],
        cnn_module_kernel: Sequence[int],
        pos_dim: int,
        output_downsampling_factor: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if output_downsampling_factor != 2:
            raise ValueError(f"output_downsampling_factor must be 2 (icefall), got {output_downsampling_factor}")
        self.downsampling_factor = tuple(downsampling_factor)
        self.encoder_dim = tuple(encoder_dim)
        self.pos_dim = pos_dim
        self.output_downsampling_factor = output_downsampling_factor
        stacks = []
        for i, ds in enumerate(self.downsampling_factor):
            layers = [
                Zipformer2EncoderLayer(
                    embed_dim=encoder_dim[i],
                    pos_dim=pos_dim,
                    num_heads=num_heads[i],
                    query_head_dim=query_head_dim[i],
                    pos_head_dim=pos_head_dim[i],
                    value_head_dim=value_head_dim[i],
                    feedforward_dim=feedforward_dim[i],
                    cnn_module_kernel=cnn_module_kernel[i],
                    dropout=dropout,
                )
                for _ in range(num_encoder_layers[i])
            ]
            stack = Zipformer2Encoder(layers)
            if ds != 1:
                stack = DownsampledZipformer2Encoder(stack, dim=encoder_dim[i], downsample=ds)
            stacks.append(stack)
        self.encoders = nn.ModuleList(stacks)
        self.downsample_output = SimpleDownsample(output_downsampling_factor)

    def _full_dim_output(self, outputs: List[Tensor]) -> Tensor:
        """Channels [0, d_last) from the last stack; each wider channel range from the latest stack that has it."""
        pieces = [outputs[-1]]
        cur = self.encoder_dim[-1]
        for i in range(len(outputs) - 2, -1, -1):
            d = self.encoder_dim[i]
            if d > cur:
                pieces.append(outputs[i][..., cur:d])
                cur = d
        return torch.cat(pieces, dim=-1)

    def forward(self, x: Tensor, x_lens: Tensor, key_padding_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        # One positional table for the longest sequence; shorter (downsampled) stacks use its centre.
        pos_table = compact_rel_pos_table(x.size(1), self.pos_dim, x.device)
        outputs = []
        for stack, ds, dim in zip(self.encoders, self.downsampling_factor, self.encoder_dim):
            x = _fit_channels(x, dim)
            # The mask of a downsampled stack: a group is valid iff its first frame is.
            mask = None if key_padding_mask is None else key_padding_mask[:, ::ds]
            x = stack(x, pos_table, mask)
            outputs.append(x)
        x = self.downsample_output(self._full_dim_output(outputs))
        return x, torch.div(x_lens + 1, 2, rounding_mode="floor")
