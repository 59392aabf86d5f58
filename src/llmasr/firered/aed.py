"""FireRedASR-AED: Conformer encoder + Transformer decoder, batched beam search, training loss.

Parameter names match the released ``model_state_dict`` (``encoder.*``, ``decoder.*``).

Decoding reproduces the released ``batch_beam_search`` (see golden NOTES §2):
scores = log_softmax(logits / softmax_smoothing); ``<eos>`` log-prob multiplied by ``eos_penalty``;
beams start at [0, -1e10, ...]; a finished beam is extended only by ``<eos>`` at +0; B*B candidates
per utterance ranked with topk; final ranking divides by ((5 + len) / 6) ** length_penalty where len
counts the non-``<eos>`` tokens including ``<sos>``.

Step length limit (``decode_max_len <= 0``): the released code uses the PADDED encoder length of the
whole batch for every utterance, so a batched decode can differ from decoding each utterance alone.
With ``compat_reference_padding=True`` that is reproduced; by default each utterance gets the limit it
would have at batch size 1 (its own padded encoder length), so batched results equal batch-size-1
results. The loop is vectorised over utterances x beams with a key/value cache.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmasr.encoders.firered_conformer import ConformerEncoder, padded_encoder_length, sinusoid_table
from llmasr.layers import autocast_to, decode_autocast_dtype

INF = 1e10  # the released search uses 1e10, not inf, for dead beams


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.register_buffer("pe", sinusoid_table(torch.arange(0, max_len).float(), d_model).unsqueeze(0))

    def forward(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.pe.size(1):
            raise ValueError(
                f"decoder position {start + length - 1} exceeds pe_maxlen {self.pe.size(1)}; "
                "use a smaller --decode-max-len"
            )
        return self.pe[:, start : start + length]


class DecoderMultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.n_head = n_head
        self.d_k = d_model // n_head
        self.temperature = self.d_k ** 0.5
        self.w_qs = nn.Linear(d_model, d_model)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1, self.n_head, self.d_k).transpose(1, 2)

    def project_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.w_ks(x)), self._heads(self.w_vs(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """x (N, Tq, d) queries; k/v (N, H, Tk, dk); key_valid (N, Tq or 1, Tk) bool."""
        n = x.size(0)
        q = self._heads(self.w_qs(x))
        scores = torch.matmul(q, k.transpose(2, 3)) / self.temperature
        masked = ~key_valid.unsqueeze(1)
        attn = torch.softmax(scores.masked_fill(masked, float("-inf")), dim=-1).masked_fill(masked, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(n, -1, self.d_model)
        return self.dropout(self.fc(out))


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w_2(self.act(self.w_1(x))))


class DecoderLayer(nn.Module):
    """Pre-LN: self-attention, cross-attention, MLP, each with a residual."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = DecoderMultiHeadAttention(d_model, n_head, dropout)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = DecoderMultiHeadAttention(d_model, n_head, dropout)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = PositionwiseFeedForward(d_model, d_model * 4, dropout)

    def forward(self, x, enc_out, self_valid, cross_valid):
        """Full sequence (training). self_valid (N, T, T); cross_valid (N, 1, Ti)."""
        h = self.self_attn_norm(x)
        k, v = self.self_attn.project_kv(h)
        x = x + self.self_attn.attend(h, k, v, self_valid)
        ck, cv = self.cross_attn.project_kv(enc_out)
        x = x + self.cross_attn.attend(self.cross_attn_norm(x), ck, cv, cross_valid)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x, cache: "_BeamKVCache", layer_idx: int, t: int, self_valid, cross_k, cross_v, cross_valid):
        """Position ``t`` x (N*B, 1, d), the B hypotheses of an utterance consecutive; its self-attention
        key/value join the cached ones of positions < t. cross_k/cross_v (N, H, Ti, dk) and cross_valid
        (N, 1, Ti) once per utterance: the B hypotheses attend as the B query rows of their utterance
        (one matmul against its keys instead of B copies of them)."""
        h = self.self_attn_norm(x)
        k, v = cache.append(layer_idx, t, *self.self_attn.project_kv(h))
        x = x + self.self_attn.attend(h, k, v, self_valid)
        n = cross_k.size(0)
        cross = self.cross_attn.attend(self.cross_attn_norm(x).view(n, -1, x.size(-1)), cross_k, cross_v, cross_valid)
        x = x + cross.view_as(x)
        return x + self.mlp(self.mlp_norm(x))


class _BeamKVCache:
    """Self-attention keys/values of all decoder layers for the beam search's M hypotheses:
    ``(layers, 2, M, H, capacity, dk)`` buffers, capacity doubling up to the step limit. A step
    writes its key/value in place; :meth:`reorder` gathers the surviving hypotheses' rows into the
    spare buffer in one ``index_select`` (instead of a concatenation and a gather per layer and step)."""

    def __init__(self, n_layers: int, max_steps: int):
        self.n_layers, self.max_steps = n_layers, max_steps
        self.buf: Optional[torch.Tensor] = None  # allocated at the first append, in the dtype of k (autocast)
        self.spare: Optional[torch.Tensor] = None

    def append(self, layer_idx: int, t: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store position ``t``'s k, v (M, H, 1, dk); return keys/values of positions 0..t (views)."""
        if self.buf is None:
            m, n_head, _, d_k = k.shape
            self.buf = k.new_empty(self.n_layers, 2, m, n_head, min(16, self.max_steps), d_k)
            self.spare = torch.empty_like(self.buf)
        if t >= self.buf.size(4):
            self._grow(t)
        kv = self.buf[layer_idx]
        kv[0, :, :, t : t + 1] = k
        kv[1, :, :, t : t + 1] = v
        return kv[0, :, :, : t + 1], kv[1, :, :, : t + 1]

    def _grow(self, t: int) -> None:
        cap = min(max(2 * self.buf.size(4), t + 1), self.max_steps)
        new = self.buf.new_empty(*self.buf.shape[:4], cap, self.buf.size(5))
        new[:, :, :, :, :t] = self.buf[:, :, :, :, :t]
        self.buf, self.spare = new, torch.empty_like(new)

    def reorder(self, src: torch.Tensor, length: int) -> None:
        """Row i of positions < ``length`` becomes row ``src[i]``."""
        torch.index_select(self.buf[:, :, :, :, :length], 2, src, out=self.spare[:, :, :, :, :length])
        self.buf, self.spare = self.spare, self.buf


class TransformerDecoder(nn.Module):
    def __init__(self, sos_id: int, eos_id: int, pad_id: int, odim: int, n_layers: int, n_head: int, d_model: int,
                 residual_dropout: float = 0.1, pe_maxlen: int = 5000):
        super().__init__()
        self.sos_id, self.eos_id, self.pad_id = sos_id, eos_id, pad_id
        self.odim = odim
        self.tgt_word_emb = nn.Embedding(odim, d_model, padding_idx=pad_id)
        self.positional_encoding = PositionalEncoding(d_model, max_len=pe_maxlen)
        self.dropout = nn.Dropout(residual_dropout)
        self.layer_stack = nn.ModuleList([DecoderLayer(d_model, n_head, residual_dropout) for _ in range(n_layers)])
        self.tgt_word_prj = nn.Linear(d_model, odim, bias=False)
        self.layer_norm_out = nn.LayerNorm(d_model)
        self.tgt_word_prj.weight = self.tgt_word_emb.weight  # tied (both keys are saved)
        self.scale = d_model ** 0.5

    def embed(self, ys: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.dropout(self.tgt_word_emb(ys) * self.scale + self.positional_encoding(start, ys.size(1)))

    def forward(self, ys_in: torch.Tensor, enc_out: torch.Tensor, enc_lens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ys_in (N, U) starting with <sos>, padded with pad_id -> logits (N, U, odim)."""
        u = ys_in.size(1)
        causal = torch.ones(u, u, dtype=torch.bool, device=ys_in.device).tril()
        self_valid = causal[None] & ys_in.ne(self.pad_id)[:, None, :]
        cross_valid = (torch.arange(enc_out.size(1), device=enc_out.device)[None] < enc_lens[:, None])[:, None, :]
        x = self.embed(ys_in)
        for layer in self.layer_stack:
            x = layer(x, enc_out, self_valid, cross_valid)
        return self.tgt_word_prj(self.layer_norm_out(x))

    @torch.inference_mode()
    def beam_search(
        self,
        enc_out: torch.Tensor,
        enc_lens: torch.Tensor,
        beam_size: int = 1,
        nbest: int = 1,
        maxlens: Optional[torch.Tensor] = None,
        softmax_smoothing: float = 1.0,
        length_penalty: float = 0.0,
        eos_penalty: float = 1.0,
        return_step_scores: bool = False,
    ):
        """Batched beam search.

        enc_out (N, Ti, d); enc_lens (N,) valid frames (cross-attention mask); maxlens (N,) maximum
        number of decoding steps per utterance (default: Ti for all, the released behaviour).
        Returns a list (N) of n-best lists of {"yseq": LongTensor (no sos/eos), "score": float}
        and, with ``return_step_scores``, the per-step log-probs (steps, N*B, odim).
        """
        if not 0.0 < eos_penalty <= 1.0:
            raise ValueError(f"eos_penalty must be in (0, 1], got {eos_penalty}")
        if not 1 <= nbest <= beam_size:
            raise ValueError(f"nbest must be in [1, beam_size={beam_size}], got {nbest}")
        B = beam_size
        N, Ti, _ = enc_out.shape
        NB = N * B
        device = enc_out.device
        if maxlens is None:
            maxlens = torch.full((N,), Ti, dtype=torch.long, device=device)
        maxlens = maxlens.to(device)
        total_steps = int(maxlens.max().item()) if N > 0 else 0
        if total_steps > self.positional_encoding.pe.size(1):
            raise ValueError(
                f"{total_steps} decoding steps exceed pe_maxlen {self.positional_encoding.pe.size(1)}; "
                "set --decode-max-len"
            )
        row_maxlen = maxlens.repeat_interleave(B)[:, None]

        # per utterance, not per hypothesis (DecoderLayer.step groups the B queries of an utterance)
        cross_valid = (torch.arange(Ti, device=device)[None] < enc_lens.to(device)[:, None])[:, None, :]
        cross_kv = []
        for layer in self.layer_stack:
            k, v = layer.cross_attn.project_kv(enc_out)
            # stored so that attend's k.transpose(2, 3) and v are contiguous: no copy per step
            cross_kv.append((k.transpose(2, 3).contiguous().transpose(2, 3), v.contiguous()))

        ys = torch.full((NB, 1), self.sos_id, dtype=torch.long, device=device)
        tok_valid = torch.ones(NB, 1, dtype=torch.bool, device=device)  # keys that are not <pad>
        cache = _BeamKVCache(len(self.layer_stack), max(total_steps, 1))
        init = torch.full((B,), -INF, device=device)
        init[0] = 0.0
        scores = init.repeat(N)[:, None]
        finished = torch.zeros(NB, 1, dtype=torch.bool, device=device)
        finished_scores = init[None, :].expand(NB, B)  # [0, -1e10, ...]
        stride = (B * torch.arange(N, device=device))[:, None]
        step_scores = []

        for t in range(total_steps):
            # Utterances past their own limit behave as if finished (extended by <eos> at +0), which
            # leaves their scores and order unchanged: the same result as stopping there.
            finished = finished | (t >= row_maxlen)
            if bool(finished.all()):
                break
            x = self.embed(ys[:, -1:], start=t)
            for i, (layer, (ck, cv)) in enumerate(zip(self.layer_stack, cross_kv)):
                x = layer.step(x, cache, i, t, tok_valid[:, None, :], ck, cv, cross_valid)
            logits = self.tgt_word_prj(self.layer_norm_out(x[:, -1]))
            # fp32 log-probs (a no-op in fp32; under bf16/fp16 autocast the beam ranking keeps full precision)
            t_scores = F.log_softmax(logits.float() / softmax_smoothing, dim=-1)
            if return_step_scores:
                step_scores.append(t_scores.clone())
            if eos_penalty != 1.0:
                t_scores[:, self.eos_id] *= eos_penalty
            top_s, top_y = torch.topk(t_scores, k=B, dim=1)
            top_s = torch.where(finished, finished_scores, top_s)
            top_y = top_y.masked_fill(finished, self.eos_id)

            cand = (scores + top_s).view(N, B * B)
            scores, ids = torch.topk(cand, k=B, dim=1)
            scores = scores.reshape(NB, 1)
            src = (ids // B + stride).view(NB)
            new_tok = top_y.view(N, B * B).gather(1, ids).view(NB, 1)
            ys = torch.cat([ys.index_select(0, src), new_tok], dim=1)
            tok_valid = torch.cat([tok_valid.index_select(0, src), new_tok.ne(self.pad_id)], dim=1)
            cache.reorder(src, t + 1)
            finished = new_tok.eq(self.eos_id)

        scores = scores.view(N, B)
        ys = ys.view(N, B, -1)
        ys_lens = ys.ne(self.eos_id).sum(-1)
        if length_penalty > 0.0:
            scores = scores / torch.pow((5 + ys_lens.float()) / 6.0, length_penalty)
        best_scores, best_ids = torch.topk(scores, k=nbest, dim=1)
        best_ys = ys.gather(1, best_ids[:, :, None].expand(-1, -1, ys.size(2))).cpu()
        best_lens = ys_lens.gather(1, best_ids).cpu()
        best_scores = best_scores.cpu()
        hyps = [
            [{"yseq": best_ys[n, i, 1 : best_lens[n, i]], "score": float(best_scores[n, i])} for i in range(nbest)]
            for n in range(N)
        ]
        if return_step_scores:
            return hyps, torch.stack(step_scores) if step_scores else torch.empty(0, NB, self.odim)
        return hyps


class FireRedAsrAed(nn.Module):
    """Released FireRedASR-AED package layout: ``encoder.*`` + ``decoder.*``."""

    def __init__(self, idim: int, n_layers_enc: int, n_head: int, d_model: int, residual_dropout: float,
                 dropout_rate: float, kernel_size: int, pe_maxlen: int, sos_id: int, eos_id: int, pad_id: int,
                 odim: int, n_layers_dec: int):
        super().__init__()
        self.sos_id, self.eos_id, self.pad_id = sos_id, eos_id, pad_id
        self.encoder = ConformerEncoder(idim, n_layers_enc, n_head, d_model, residual_dropout, dropout_rate,
                                        kernel_size, pe_maxlen)
        self.decoder = TransformerDecoder(sos_id, eos_id, pad_id, odim, n_layers_dec, n_head, d_model,
                                          residual_dropout, pe_maxlen)
        self.decode_dtype: Optional[torch.dtype] = None  # set_decode_dtype

    ARG_NAMES = ("idim", "n_layers_enc", "n_head", "d_model", "residual_dropout", "dropout_rate", "kernel_size",
                 "pe_maxlen", "sos_id", "eos_id", "pad_id", "odim", "n_layers_dec")

    @classmethod
    def arch_args(cls, args, source: str = "<args>") -> Dict[str, Any]:
        """The constructor arguments in a package's ``args`` (Namespace or dict); all must be there."""
        get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
        missing = [k for k in cls.ARG_NAMES if get(k, None) is None]
        if missing:
            raise ValueError(f"{source}: model args lack {missing}")
        return {k: get(k) for k in cls.ARG_NAMES}

    @classmethod
    def from_args(cls, args, source: str = "<args>") -> "FireRedAsrAed":
        return cls(**cls.arch_args(args, source))

    def set_decode_dtype(self, dtype: torch.dtype) -> "FireRedAsrAed":
        """Decode (:meth:`transcribe`) in ``dtype``: the weights of every Linear and Embedding are cast
        to it once and transcribe runs under autocast to it (layer norms, convolutions' weights,
        softmax and the beam's log-probs stay fp32). Casting once matters: autocast re-casts fp32
        weights at every call, i.e. the whole decoder at every beam step (measured: 30 % of a bf16
        beam search at batch 16). For decoding only (the weights lose precision); float32 undoes
        nothing, it only turns the autocast off. bfloat16 on CPUs with AVX512-BF16/AMX."""
        self.decode_dtype = decode_autocast_dtype(dtype)
        if self.decode_dtype is not None:
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.to(dtype)  # tied decoder input/output rows: one Parameter, cast once
        return self

    def decode_maxlens(self, feat_lens: torch.Tensor, padded_frames: int, decode_max_len: int = 0,
                       compat_reference_padding: bool = False) -> torch.Tensor:
        """Decoding step limit per utterance (see module docstring)."""
        if decode_max_len > 0:
            return torch.full_like(feat_lens, decode_max_len)
        if compat_reference_padding:
            return torch.full_like(feat_lens, padded_encoder_length(padded_frames))
        return padded_encoder_length(feat_lens)

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor, beam_size: int = 1, nbest: int = 1,
                   decode_max_len: int = 0, softmax_smoothing: float = 1.0, length_penalty: float = 0.0,
                   eos_penalty: float = 1.0, compat_reference_padding: bool = False, return_step_scores: bool = False):
        with autocast_to(feats.device.type, self.decode_dtype):
            enc_out, enc_lens = self.encoder(feats, feat_lens)
            maxlens = self.decode_maxlens(feat_lens, feats.size(1), decode_max_len, compat_reference_padding)
            return self.decoder.beam_search(enc_out, enc_lens, beam_size, nbest, maxlens, softmax_smoothing,
                                            length_penalty, eos_penalty, return_step_scores)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor, targets: Sequence[Sequence[int]],
                label_smoothing: float = 0.1) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Label-smoothed cross-entropy (summed over tokens incl. final <eos>) for target id lists."""
        device = feats.device
        enc_out, enc_lens = self.encoder(feats, feat_lens)
        seqs = [torch.as_tensor(list(t), dtype=torch.long) for t in targets]
        lens = torch.tensor([len(t) for t in seqs])
        body = nn.utils.rnn.pad_sequence(seqs + [torch.zeros(0, dtype=torch.long)], batch_first=True)[:-1]
        n, u = body.size(0), body.size(1) + 1
        pos = torch.arange(u)[None, :]
        # ys_in = <sos> y1 .. yU <pad>...; ys_out = y1 .. yU <eos> -100...
        ys_in = torch.cat([torch.full((n, 1), self.sos_id), body], 1).masked_fill(pos > lens[:, None], self.pad_id)
        ys_out = torch.cat([body, torch.zeros(n, 1, dtype=torch.long)], 1)
        ys_out = ys_out.masked_fill(pos == lens[:, None], self.eos_id).masked_fill(pos > lens[:, None], -100)
        ys_in, ys_out = ys_in.to(device), ys_out.to(device)
        logits = self.decoder(ys_in, enc_out, enc_lens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ys_out.reshape(-1),
                               ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
        ntokens = ys_out.ne(-100).sum()
        correct = (logits.argmax(-1).eq(ys_out) & ys_out.ne(-100)).sum()
        return loss, {"ntokens": ntokens, "correct": correct}


__all__ = ["FireRedAsrAed", "TransformerDecoder", "INF"]
