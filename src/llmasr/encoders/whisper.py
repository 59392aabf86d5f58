"""Whisper speech encoder (openai-whisper checkpoints and icefall fine-tuned Whisper).

The encoder is openai-whisper's ``AudioEncoder`` (same modules, same parameter names, so the
``encoder.*`` keys of a Whisper checkpoint load as they are) with its own forward that

- accepts inputs shorter than 30 s: the positional embedding is cut to the input length, as
  icefall's ``whisper_encoder_forward_monkey_patch.py`` does for whisper_llm_zh (we do not
  monkey-patch the package: the original ``AudioEncoder.forward`` stays untouched);
- handles padded batches: padded input frames are zeroed before each convolution and masked
  out as attention keys, so every utterance's valid output frames equal what the encoder gives
  for that utterance alone (the icefall patch attends to the batch padding; ``mask_padding=False``
  reproduces that exactly - :class:`llmasr.model.SpeechLLM` sets it from its
  ``compat_reference_padding`` switch).

A plain module: freezing, train/eval mode and autograd are the owner's business
(:class:`llmasr.model.SpeechLLM`, ``--unfreeze-encoder``).

Input: Whisper log-mel features (N, T, n_mels), T <= 3000 (30 s at 10 ms), as computed by
lhotse's ``WhisperFbank`` or :func:`whisper_log_mel` (identical). Output: (N, T', n_audio_state)
with ``T' = (T - 1) // 2 + 1`` (conv2 has stride 2, kernel 3, padding 1).
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.model import AudioEncoder, ModelDimensions

from llmasr.encoders import register_encoder
from llmasr.layers import cpu_fp32_conv
from llmasr.io import load_state_dict_strict, load_torch_file

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160

# (n_mels, n_audio_state, n_audio_layer) of the released Whisper models, used to check that a
# checkpoint given with a named --speech-encoder-type is the model it claims to be.
KNOWN_WHISPER_SIZES: Dict[str, Tuple[int, int, int]] = {
    "whisper-tiny": (80, 384, 4),
    "whisper-base": (80, 512, 6),
    "whisper-small": (80, 768, 12),
    "whisper-medium": (80, 1024, 24),
    "whisper-large": (80, 1280, 32),
    "whisper-large-v1": (80, 1280, 32),
    "whisper-large-v2": (80, 1280, 32),
    "whisper-large-v3": (128, 1280, 32),
    "whisper-large-v3-turbo": (128, 1280, 32),
}


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


def whisper_log_mel(
    audio: Union[np.ndarray, torch.Tensor], n_mels: int = 80, device: Optional[Union[str, torch.device]] = None
) -> torch.Tensor:
    """Whisper log-mel features (T, n_mels) of 16 kHz mono ``audio``, identical to lhotse's WhisperFbank.

    Same computation as openai-whisper's ``log_mel_spectrogram`` (Hann window 400, hop 160, the
    package's mel filters, log10 clamped to [max - 8, max], then (x + 4) / 4), with lhotse's
    conventions: the max is taken over this utterance only (openai's ``transcribe`` takes it
    over the whole recording plus 30 s of zero padding, which for audio of at most 30 s gives
    the same value), and the output has ``(num_samples + 80) // 160`` frames, the extra frame
    (present when ``num_samples % 160 >= 80``) being zeros as lhotse pads it.
    """
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio))
    if audio.dim() == 2 and audio.shape[0] == 1:
        audio = audio[0]
    if audio.dim() != 1:
        raise ValueError(f"whisper_log_mel expects mono audio of shape (num_samples,), got {tuple(audio.shape)}")
    audio = audio.to(device=device, dtype=torch.float32)
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = whisper.audio.mel_filters(audio.device, n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    num_frames = (audio.shape[0] + HOP_LENGTH // 2) // HOP_LENGTH
    if num_frames > log_spec.shape[1]:
        log_spec = F.pad(log_spec, (0, num_frames - log_spec.shape[1]))
    return log_spec.transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class WhisperEncoder(AudioEncoder):
    """openai-whisper ``AudioEncoder`` with a variable-length, padding-aware forward."""

    feature_type = "whisper-mel"

    def __init__(
        self,
        n_mels: int,
        n_ctx: int,
        n_state: int,
        n_head: int,
        n_layer: int,
        mask_padding: bool = True,
    ):
        super().__init__(n_mels, n_ctx, n_state, n_head, n_layer)
        self.n_head = n_head
        self.output_dim = n_state
        self.feature_dim = n_mels
        self.max_frames = 2 * n_ctx  # input frames: 3000 = 30 s
        self.mask_padding = mask_padding

    @classmethod
    def from_dims(cls, dims: Union[ModelDimensions, Mapping[str, int]], **options) -> "WhisperEncoder":
        d = dims if isinstance(dims, Mapping) else dims.__dict__
        return cls(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"], **options)

    @staticmethod
    def output_lengths(feature_lens: torch.Tensor) -> torch.Tensor:
        return (feature_lens - 1) // 2 + 1

    def forward(self, features: torch.Tensor, feature_lens: Optional[torch.Tensor] = None):
        """features (N, T, n_mels), feature_lens (N,) -> (out (N, T', C), out_lens (N,))."""
        if features.dim() != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"Whisper encoder expects features (N, T, {self.feature_dim}), got {tuple(features.shape)}"
            )
        n, t, _ = features.shape
        if t > self.max_frames:
            raise ValueError(
                f"Whisper encoder input has {t} frames; at most {self.max_frames} (30 s) are supported"
            )
        if feature_lens is None:
            feature_lens = torch.full((n,), t, dtype=torch.long, device=features.device)
        feature_lens = feature_lens.to(features.device)
        out_lens = self.output_lengths(feature_lens)
        t_out = (t - 1) // 2 + 1
        padded = self.mask_padding and bool((feature_lens < t).any())

        x = features.transpose(1, 2)  # (N, n_mels, T)
        if padded:
            # Zero the padding so that the convolutions see what they see at the end of an
            # unpadded utterance (their own zero padding).
            in_mask = torch.arange(t, device=x.device)[None, :] < feature_lens[:, None]  # (N, T)
            x = x * in_mask[:, None, :].to(x.dtype)
            x = F.gelu(cpu_fp32_conv(self.conv1, x))
            x = x * in_mask[:, None, :].to(x.dtype)
        else:
            x = F.gelu(cpu_fp32_conv(self.conv1, x))
        x = F.gelu(cpu_fp32_conv(self.conv2, x))  # convs in fp32 on CPU (half ones can hang in oneDNN)
        x = x.permute(0, 2, 1)  # (N, T', C)
        # Positional embedding cut to the input length (icefall's patch); for T = 3000 this is
        # exactly openai-whisper's forward.
        x = (x + self.positional_embedding[:t_out]).to(x.dtype)

        attn_mask = None
        if padded:
            key_valid = torch.arange(t_out, device=x.device)[None, :] < out_lens[:, None]  # (N, T')
            attn_mask = key_valid[:, None, None, :]  # broadcast over heads and queries
        for block in self.blocks:
            x = self._block(block, x, attn_mask)
        x = self.ln_post(x)
        return x, out_lens

    def _block(self, block, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        # Same computation as whisper's ResidualAttentionBlock (pre-LN self-attention + MLP);
        # written out here to pass a key-padding mask to scaled_dot_product_attention (the
        # package only supports a causal mask there). Whisper scales q and k by d^-0.25 each,
        # i.e. d^-0.5 overall, which is SDPA's default scale.
        attn = block.attn
        h = block.attn_ln(x)
        n, t, c = h.shape
        q = attn.query(h).view(n, t, self.n_head, -1).transpose(1, 2)
        k = attn.key(h).view(n, t, self.n_head, -1).transpose(1, 2)
        v = attn.value(h).view(n, t, self.n_head, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + attn.out(a.transpose(1, 2).reshape(n, t, c))
        x = x + block.mlp(block.mlp_ln(x))
        return x


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------


def _torch_load(path: str):
    # icefall training checkpoints (params with Paths and numpy values next to the model) load
    # too: those types are on the allow-list.
    return load_torch_file(path, "Whisper checkpoint")


def extract_encoder_state_dict(checkpoint, path: str = "<checkpoint>") -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, int]]]:
    """Find the Whisper encoder weights (keys without the ``encoder.`` prefix) and dims, if stored.

    Accepted layouts: openai-whisper ``{"dims", "model_state_dict"}``; icefall ``save_checkpoint``
    ``{"model": state_dict, ...}``; a plain Whisper state dict (icefall ``epoch-N-avg-M.pt``,
    DeepSpeed ``zero_to_fp32`` output); any of these with a ``module.`` (DDP) prefix; an
    encoder-only state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    dims = checkpoint.get("dims")
    if dims is not None and not isinstance(dims, Mapping):
        dims = dict(dims.__dict__)  # a pickled ModelDimensions
    state = checkpoint
    for key in ("model_state_dict", "model", "state_dict", "module"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state = checkpoint[key]
            break
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    if any(k.startswith("encoder.conv1.") for k in tensors):
        enc = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    elif "conv1.weight" in tensors:
        enc = dict(tensors)
    else:
        sample = ", ".join(sorted(tensors)[:5])
        raise ValueError(
            f"{path}: no Whisper encoder weights found (looked for 'encoder.conv1.weight' or "
            f"'conv1.weight'; the file has {len(tensors)} tensors, e.g. {sample or 'none'})"
        )
    return enc, (dict(dims) if dims is not None else None)


def infer_encoder_dims(enc: Mapping[str, torch.Tensor], n_head: Optional[int] = None) -> Dict[str, int]:
    n_state, n_mels = enc["conv1.weight"].shape[:2]
    n_layer = 0
    while f"blocks.{n_layer}.attn.query.weight" in enc:
        n_layer += 1
    # Not recoverable from shapes; every released Whisper model has 64-dim heads.
    n_head = n_head or n_state // 64
    n_ctx = enc["positional_embedding"].shape[0] if "positional_embedding" in enc else 1500
    return dict(n_mels=int(n_mels), n_audio_ctx=int(n_ctx), n_audio_state=int(n_state), n_audio_head=int(n_head), n_audio_layer=n_layer)


def load_whisper_encoder(path: Union[str, os.PathLike], n_head: Optional[int] = None, **options) -> WhisperEncoder:
    """Build a :class:`WhisperEncoder` from a local Whisper checkpoint (never downloads)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        hint = ""
        if path in whisper.available_models() or path.startswith("whisper-"):
            hint = (
                " (a model name: this toolkit never downloads; give the local .pt path, e.g. "
                "~/.cache/whisper/large-v2.pt fetched once with whisper.load_model)"
            )
        raise FileNotFoundError(f"Whisper checkpoint not found: {path}{hint}")
    enc, dims = extract_encoder_state_dict(_torch_load(path), path)
    inferred = infer_encoder_dims(enc, n_head=n_head)
    if dims is not None:
        for k in ("n_mels", "n_audio_state", "n_audio_layer"):
            if int(dims[k]) != inferred[k]:
                raise ValueError(f"{path}: dims[{k!r}]={dims[k]} disagrees with the weights ({inferred[k]})")
        inferred["n_audio_head"] = int(n_head or dims["n_audio_head"])
        inferred["n_audio_ctx"] = int(dims["n_audio_ctx"])
    model = WhisperEncoder.from_dims(inferred, **options)
    target_dtype = enc["conv1.weight"].dtype
    # positional_embedding is a fixed sinusoid buffer that some checkpoints omit.
    load_state_dict_strict(model, enc, str(path), allow_missing=("positional_embedding",), context="Whisper encoder")
    # Keep the checkpoint's floating dtype out of the module: callers choose the compute dtype
    # (fp32 on CPU; .half()/.bfloat16() or autocast on GPU).
    model.float()
    logging.info(
        "loaded Whisper encoder from %s (n_mels=%d, dim=%d, layers=%d, heads=%d, stored as %s)",
        path, inferred["n_mels"], inferred["n_audio_state"], inferred["n_audio_layer"], inferred["n_audio_head"], target_dtype,
    )
    return model


@register_encoder("whisper", *KNOWN_WHISPER_SIZES)
def build_whisper_encoder(encoder_type: str = "whisper", path: Optional[str] = None, **options) -> WhisperEncoder:
    """``--speech-encoder-type whisper[-large-v2|...] --speech-encoder-path model.pt``.

    Options: ``n_head`` (override for non-standard checkpoints without dims),
    ``mask_padding`` (default True; SpeechLLM sets it from ``compat_reference_padding``).
    """
    if path is None:
        raise ValueError(f"--speech-encoder-type {encoder_type} needs --speech-encoder-path (a local Whisper .pt)")
    known = {k: options.pop(k) for k in ("n_head", "mask_padding") if k in options}
    if options:
        logging.warning("whisper encoder: ignoring unknown options %s", sorted(options))
    model = load_whisper_encoder(path, **known)
    if encoder_type in KNOWN_WHISPER_SIZES:
        want = KNOWN_WHISPER_SIZES[encoder_type]
        got = (model.feature_dim, model.output_dim, len(model.blocks))
        if got != want:
            raise ValueError(
                f"{path}: --speech-encoder-type {encoder_type} expects (n_mels, dim, layers)={want}, "
                f"the checkpoint has {got}; use --speech-encoder-type whisper to accept any size"
            )
    return model
