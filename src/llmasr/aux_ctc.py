"""Projector alignment: a CTC loss from the projector output against the LLM's token embeddings.

The projector's job is to turn speech frames into vectors the LLM can read. At the start of
training its output is noise to the LLM, and the only signal reaching it is the LLM's
cross-entropy, back-propagated through every LLM layer. This module gives the projector a direct,
cheap target: each projected frame should *be* a token embedding - the embedding of the token
spoken there, or of a blank token between tokens. Concretely, for projected frames ``p_t`` (N, T, H)
and the LLM's frozen input-embedding matrix ``E`` (V, H), every frame gets a distribution over the
vocabulary and a CTC loss is taken against the transcript's LLM token ids:

    mode "distance" (default):  logit_t[v] = -||p_t - e_v||^2 / temperature
                                (= (2 p_t.e_v - ||e_v||^2) / temperature + const, computed so)
    mode "cosine":              logit_t[v] = cos(p_t, e_v) / temperature
    mode "dot":                 logit_t[v] = p_t.e_v / temperature

Frame norm: no mode bounds it. The softmax is invariant to the ``-||p_t||^2`` term, so "distance"
behaves like "dot" plus a row-norm prior and scaling ``p_t`` up lowers the loss; "cosine" is scale
invariant, and Adam's normalised steps orthogonal to ``p_t`` make the norm random-walk upwards.
Measured on the demo (SmolLM2-135M, embedding rows of norm ~3.2, projector output ~3.0 at
initialisation), after a 150-step warm-up: norm 19 ("distance"), 54 ("cosine"). Out-of-scale
inputs are not what the LLM reads as tokens; ``norm_weight`` (``--aux-ctc-norm-weight``) adds

    norm_weight * mean over valid frames of log(||p_t|| / r)^2,   r = mean norm of the embedding rows

to the aux loss, which keeps the frames at the scale of token embeddings.
Token embeddings of small LLMs are also far from isotropic (SmolLM2-135M: mean pairwise cosine 0.44).

Which mode (measured on the demo: frozen Whisper-base, SmolLM2-135M + LoRA, 600 espeak clips, batch 8,
lr 2e-3, 150 warm-up steps then weight 0.5; held-out WER after 50 / 100 / 150 training steps):
"distance" 0.98 / 0.77 / 0.56, "cosine" 0.52 / 0.25 / 0.20; no alignment at all 0.95 / 1.02 (100 steps,
lr 1e-3). Cosine spells the transcripts better after the warm-up (CTC loss 1.6 vs 2.5) even though
its frames end up at ~20x the embeddings' norm, so the norm penalty is an option, not the default.

Blank: CTC needs a blank class; we use an existing vocabulary row, by default the prompt format's
pad token (``<|endoftext|>`` for the Qwen2/SmolLM2 chat formats) - a token that never occurs in a
transcript, is present in every LLM we support, and adds no parameter (nothing new to save, load or
average, and the same module works with every recipe). ``--aux-ctc-blank`` takes any token string.

The embedding matrix is always detached: the loss trains the projector (and whatever is trainable
below it), never the embeddings, even when the LLM is fully unfrozen. The logits are computed in
float32 (the log-softmax over the vocabulary is the sensitive part).

Two uses, both available to every recipe (see :func:`add_aux_ctc_arguments`):

- ``--aux-ctc-weight w``: ``loss = ce + w * aux_ctc`` in every training step;
- ``--projector-warmup-steps n``: before the first training step, train only the projector(s)
  with this loss for ``n`` steps (:func:`projector_warmup`): a few hundred cheap steps (no LLM
  forward) give the LLM a readable input from the first real step.

The loss is normalised per target token (summed CTC negative log-likelihood / number of target
tokens), the same normalisation as the LLM cross-entropy it is added to. An utterance whose
projected frames are too few for its tokens (CTC needs ``T >= L + repeats``) cannot be aligned: it
contributes 0 and is counted in ``stats["aux_ctc_infeasible"]`` (and logged) - never silently.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmasr.data.dataset import speech_inputs
from llmasr.prompt import get_prompt_format, transcript_ids

MODES = ("distance", "cosine", "dot")
DEFAULT_TEMPERATURE = {"distance": 1.0, "cosine": 0.05, "dot": 1.0}


# --------------------------------------------------------------------------------------------
# Logits and loss
# --------------------------------------------------------------------------------------------


def embedding_logits(
    frames: torch.Tensor, embedding: torch.Tensor, mode: str = "distance", temperature: Optional[float] = None
) -> torch.Tensor:
    """(N, T, H) projected frames x (V, H) embedding rows -> (N, T, V) float32 logits (see module doc).

    The embedding is detached (never trained by this loss).
    """
    if mode not in MODES:
        raise ValueError(f"unknown aux CTC mode {mode!r}; choose from {', '.join(MODES)}")
    if frames.shape[-1] != embedding.shape[-1]:
        raise ValueError(
            f"projector output dim {frames.shape[-1]} != LLM embedding dim {embedding.shape[-1]}"
        )
    temperature = DEFAULT_TEMPERATURE[mode] if temperature is None else float(temperature)
    if temperature <= 0:
        raise ValueError(f"aux CTC temperature must be > 0, got {temperature}")
    x = frames.float()
    e = embedding.detach().float()
    if mode == "cosine":
        x = F.normalize(x, dim=-1)
        e = F.normalize(e, dim=-1)
        logits = x @ e.t()
    elif mode == "dot":
        logits = x @ e.t()
    else:
        # -||x - e||^2 = 2 x.e - ||e||^2 - ||x||^2; the last term is the same for every class and
        # cancels in the log-softmax, so it is left out.
        logits = 2.0 * (x @ e.t()) - (e * e).sum(-1)
    return logits / temperature


def ctc_targets(target_ids: Sequence[Sequence[int]], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenated targets (sum L,) and lengths (N,) for ``F.ctc_loss``."""
    lens = torch.tensor([len(t) for t in target_ids], dtype=torch.long)
    flat = torch.tensor([i for t in target_ids for i in t], dtype=torch.long)
    return flat.to(device), lens.to(device)


def min_ctc_frames(target_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Frames CTC needs per utterance: L plus one blank between each pair of equal neighbours."""
    return torch.tensor(
        [len(t) + sum(1 for a, b in zip(t[:-1], t[1:]) if a == b) for t in target_ids], dtype=torch.long
    )


def aux_ctc_loss(
    frames: torch.Tensor,
    frame_lens: torch.Tensor,
    target_ids: Sequence[Sequence[int]],
    embedding: torch.Tensor,
    blank_id: int,
    mode: str = "distance",
    temperature: Optional[float] = None,
    cut_ids: Optional[Sequence[str]] = None,
    num_negatives: int = 0,
    generator: Optional[torch.Generator] = None,
    norm_weight: float = 0.0,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """CTC loss of projected frames against LLM token ids, per target token.

    Args:
        frames: (N, T, H) projector output; frame_lens: (N,) valid frames.
        target_ids: per utterance, the transcript's LLM token ids (no special tokens; see
            :func:`llmasr.prompt.transcript_ids`).
        embedding: (V, H) the LLM input embedding matrix (detached here).
        blank_id: vocabulary row used as CTC blank; must not occur in any target.
        num_negatives: 0 = the softmax runs over the whole vocabulary. > 0 = over the batch's
            target tokens, the blank and this many other rows drawn uniformly at random (a
            sampled softmax: the (N, T, V) logits are the cost of this loss, 49k-152k rows for
            SmolLM2/Qwen2, and a few thousand negatives give the same alignment signal).
        norm_weight: weight of the frame-norm penalty (module doc); 0 = none.

    Returns:
        (loss, stats): loss = summed CTC NLL / number of target tokens (0-dim float32 tensor),
        plus ``norm_weight`` x the norm penalty; stats ``aux_ctc_loss_sum`` (CTC only),
        ``aux_ctc_tokens``, ``aux_ctc_infeasible`` (utterances with too few frames, excluded from
        the sum and the token count), ``aux_ctc_frame_norm`` (mean norm of the valid frames) and
        ``aux_ctc_embedding_norm`` (mean norm of the embedding rows).
    """
    n = frames.shape[0]
    if len(target_ids) != n:
        raise ValueError(f"{len(target_ids)} transcripts for a batch of {n} utterances")
    vocab = embedding.shape[0]
    if not 0 <= blank_id < vocab:
        raise ValueError(f"aux CTC blank id {blank_id} is outside the LLM embedding ({vocab} rows)")
    for i, t in enumerate(target_ids):
        name = cut_ids[i] if cut_ids is not None else f"#{i}"
        if len(t) == 0:
            raise ValueError(f"utterance {name}: empty transcript, nothing to align")
        if blank_id in t:
            raise ValueError(f"utterance {name}: transcript contains the aux CTC blank token id {blank_id}")
        if max(t) >= vocab:
            raise ValueError(f"utterance {name}: token id {max(t)} outside the LLM embedding ({vocab} rows)")

    frame_lens = frame_lens.to(frames.device).long()
    need = min_ctc_frames(target_ids).to(frames.device)
    feasible = frame_lens >= need
    num_bad = int((~feasible).sum())
    if num_bad:
        bad = [
            (cut_ids[i] if cut_ids is not None else f"#{i}") for i in (~feasible).nonzero().flatten().tolist()
        ]
        logging.warning(
            f"aux CTC: {num_bad} utterance(s) have fewer projected frames than CTC needs for their "
            f"tokens and are left out of the aux loss: {', '.join(map(str, bad[:5]))}"
            + (" ..." if num_bad > 5 else "")
            + " (lower --encoder-projector-ds-rate?)"
        )

    # Frame norms against the embedding rows' (before any row sampling: all rows).
    valid = torch.arange(frames.shape[1], device=frames.device)[None, :] < frame_lens[:, None]
    frame_norm = frames.float().norm(dim=-1)[valid]
    emb_norm = embedding.detach().float().norm(dim=-1).mean()
    if num_negatives > 0:
        rows, target_ids, blank_id = _sample_rows(target_ids, blank_id, vocab, num_negatives, generator)
        embedding = embedding.detach()[rows.to(embedding.device)]
    logits = embedding_logits(frames, embedding, mode, temperature)  # (N, T, V) float32
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # (T, N, V)
    targets, target_lens = ctc_targets(target_ids, frames.device)
    # Sum per utterance, then zero the infeasible ones (ctc_loss gives inf for them; zero_infinity
    # also zeroes their gradient).
    per_utt = F.ctc_loss(
        log_probs,
        targets,
        frame_lens,
        target_lens,
        blank=blank_id,
        reduction="none",
        zero_infinity=True,
    )
    per_utt = torch.where(feasible, per_utt, torch.zeros_like(per_utt))
    num_tokens = int(target_lens[feasible].sum())
    loss_sum = per_utt.sum()
    loss = loss_sum / max(num_tokens, 1)
    if norm_weight > 0 and frame_norm.numel():
        loss = loss + norm_weight * torch.log(frame_norm.clamp(min=1e-6) / emb_norm).pow(2).mean()
    stats = {
        "aux_ctc_loss_sum": float(loss_sum.detach()),
        "aux_ctc_tokens": num_tokens,
        "aux_ctc_infeasible": num_bad,
        "aux_ctc_frame_norm": float(frame_norm.detach().mean()) if frame_norm.numel() else 0.0,
        "aux_ctc_embedding_norm": float(emb_norm),
    }
    return loss, stats


def _sample_rows(
    target_ids: Sequence[Sequence[int]], blank_id: int, vocab: int, num_negatives: int,
    generator: Optional[torch.Generator],
) -> Tuple[torch.Tensor, List[List[int]], int]:
    """Rows for a sampled softmax: blank first, then the batch's target tokens, then up to
    ``num_negatives`` other random rows. Returns (rows, targets renumbered into rows, new blank = 0)."""
    used = sorted({i for t in target_ids for i in t} - {blank_id})
    taken = torch.zeros(vocab, dtype=torch.bool)
    taken[blank_id] = True
    taken[used] = True
    free = (~taken).nonzero().flatten()
    k = min(num_negatives, free.numel())
    pick = free[torch.randperm(free.numel(), generator=generator)[:k]] if k > 0 else free[:0]
    rows = torch.cat([torch.tensor([blank_id] + used, dtype=torch.long), pick])
    index = {tok: j + 1 for j, tok in enumerate(used)}
    return rows, [[index[i] for i in t] for t in target_ids], 0


def vocabulary_logit_chunks(
    frames: torch.Tensor, embedding: torch.Tensor, mode: str, temperature: Optional[float] = None,
    chunk_frames: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """:func:`embedding_logits` of (M, H) frames against every embedding row, ``chunk_frames`` frames
    at a time (default: 2^27 logits, 512 MB of float32 - 2730 frames for SmolLM2's 49k rows, 883
    for Qwen2's 152k), without gradient. Yields the (chunk, V) logits in frame order. "cosine"
    normalises the frames and the rows once, not per chunk."""
    if chunk_frames is None:
        chunk_frames = max(1, 2**27 // embedding.shape[0])
    with torch.no_grad():
        flat = frames.detach().float()
        emb_rows = embedding.detach().float()  # converted (and normalised) once, not per chunk
        if mode == "cosine":  # cosine = dot of unit vectors over the temperature
            temperature = DEFAULT_TEMPERATURE[mode] if temperature is None else temperature
            flat, emb_rows, mode = F.normalize(flat, dim=-1), F.normalize(emb_rows, dim=-1), "dot"
        for i in range(0, flat.shape[0], chunk_frames):
            yield embedding_logits(flat[i:i + chunk_frames], emb_rows, mode, temperature)


def _best_path(
    frames: torch.Tensor, frame_lens: torch.Tensor, embedding: torch.Tensor, blank_id: int, mode: str,
    chunk_frames: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best-path CTC labels of projected frames, without gradient.

    Returns (N, T) tensors: ``best`` class of each frame (the blank when it beats every token),
    ``blank_margin`` (how much the best token beats the blank), ``valid`` (frame within its length)
    and ``starts`` (first frame of each run of one token: what best-path decoding emits). The
    logits come from :func:`vocabulary_logit_chunks` (bounded memory); the temperature does not
    change an argmax, so none is taken.
    """
    n, t, h = frames.shape
    device = frames.device
    with torch.no_grad():
        best, blank_margin = [], []
        for logits in vocabulary_logit_chunks(frames.reshape(n * t, h), embedding, mode, 1.0, chunk_frames):
            blank_col = logits[:, blank_id].clone()
            logits[:, blank_id] = float("-inf")
            top, top_id = logits.max(-1)  # the best non-blank token
            best.append(top_id.masked_fill(blank_col > top, blank_id))
            blank_margin.append(top - blank_col)
        best = torch.cat(best).view(n, t)
        blank_margin = torch.cat(blank_margin).view(n, t)
        valid = torch.arange(t, device=device)[None, :] < frame_lens.to(device)[:, None]
        token = valid & (best != blank_id)
        prev_best = torch.cat([torch.full_like(best[:, :1], -1), best[:, :-1]], 1)
        prev_token = torch.cat([torch.zeros_like(token[:, :1]), token[:, :-1]], 1)
        starts = token & ~(prev_token & (best == prev_best))  # a token after a blank starts a new run
    return best, blank_margin, valid, starts


def greedy_ctc_ids(
    frames: torch.Tensor,
    frame_lens: torch.Tensor,
    embedding: torch.Tensor,
    blank_id: int,
    mode: str = "distance",
) -> List[List[int]]:
    """Best-path CTC decoding of projected frames: what the projector "says" in LLM tokens
    (repeats merged, blanks removed). A diagnostic for the warm-up; the recogniser reads the same
    runs through :func:`ctc_compress_frames` when ``--ctc-compress-frames`` is on."""
    best, _, _, starts = _best_path(frames, frame_lens, embedding, blank_id, mode)
    return [best[i][starts[i]].tolist() for i in range(best.shape[0])]


def ctc_compress_frames(
    frames: torch.Tensor,
    frame_lens: torch.Tensor,
    embedding: torch.Tensor,
    blank_id: int,
    mode: str = "distance",
    chunk_frames: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CTC compression of projected frames: what the LLM reads is one vector per token the
    projector "says", not one per 4-8 encoder frames.

    Each frame's best class under the aux CTC's logits (:func:`embedding_logits`) is taken; frames
    whose best class is the blank are dropped and each run of frames with the same best token is
    replaced by the mean of its frames (averaging, not picking one, keeps every frame's gradient
    and what the run's other frames heard). A projector aligned by the aux CTC says mostly blanks
    and about one token per spoken token, so the LLM's input becomes a noisy spelling of the
    transcript, a few times shorter, that it learns to copy and correct - instead of frames it
    has to learn to read. An utterance whose frames are all blank keeps its least-blank frame
    (the LLM always gets some speech).

    The argmax runs without gradient over the whole vocabulary, in chunks (:func:`_best_path`).
    Gradients flow to the kept frames through the means.

    Returns (compressed frames (N, S, H) zero-padded, lengths (N,)).
    """
    n, _, h = frames.shape
    best, blank_margin, valid, starts = _best_path(frames, frame_lens, embedding, blank_id, mode, chunk_frames)
    with torch.no_grad():
        keep = valid & (best != blank_id)
        # an utterance with frames but no token keeps its least-blank frame
        silent = (~keep.any(1)) & valid.any(1)
        if bool(silent.any()):
            least_blank = blank_margin.masked_fill(~valid, float("-inf")).argmax(1)
            rows = silent.nonzero().flatten()
            keep[rows, least_blank[rows]] = True
            starts[rows, least_blank[rows]] = True
        segment = starts.long().cumsum(1) - 1  # (N, T): index of the run a kept frame belongs to
        lens = starts.sum(1)
        rows, cols = keep.nonzero(as_tuple=True)
        seg = segment[rows, cols]
    width = int(lens.max()) if n else 0
    summed = frames.new_zeros(n, width, h).index_put((rows, seg), frames[rows, cols], accumulate=True)
    count = frames.new_zeros(n, width).index_put((rows, seg), frames.new_ones(rows.shape[0]), accumulate=True)
    return summed / count.clamp(min=1).unsqueeze(-1), lens


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def resolve_blank_id(tokenizer, blank: Union[str, int, None], prompt_format=None) -> int:
    """``blank``: None/"pad" -> the prompt format's pad token; an int; or a token string."""
    if blank is None or blank == "pad":
        if prompt_format is None:
            raise ValueError("aux CTC blank 'pad' needs the prompt format")
        blank = get_prompt_format(prompt_format).pad_token
    if isinstance(blank, int) or (isinstance(blank, str) and blank.isdigit()):
        return int(blank)
    vocab = tokenizer.get_vocab()
    if blank not in vocab:
        raise ValueError(f"aux CTC blank token {blank!r} is not in the tokenizer's vocabulary")
    return int(vocab[blank])


# --------------------------------------------------------------------------------------------
# Configuration and the model-side hook
# --------------------------------------------------------------------------------------------


WARMUP_LR_SCHEDULES = ("constant", "cosine")


@dataclass
class AuxCtcConfig:
    weight: float = 0.0  # weight of the aux loss added to the LLM cross-entropy (0: off)
    mode: str = "distance"
    temperature: Optional[float] = None  # None: DEFAULT_TEMPERATURE[mode]
    blank: Union[str, int] = "pad"
    warmup_steps: int = 0  # projector-only warm-up steps before training
    warmup_lr: float = 1e-3
    warmup_lr_schedule: str = "constant"  # or "cosine": from warmup_lr down to 0 over the warm-up steps
    warmup_max_seconds: float = 0.0  # 0: no time limit
    num_negatives: int = 0  # 0: softmax over the whole vocabulary; > 0: sampled softmax
    norm_weight: float = 0.0  # frame-norm penalty (keeps projected frames at the embeddings' scale)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown --aux-ctc-mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.weight < 0 or self.warmup_steps < 0 or self.norm_weight < 0:
            raise ValueError("--aux-ctc-weight, --aux-ctc-norm-weight and --projector-warmup-steps must be >= 0")

    @property
    def needed(self) -> bool:
        return self.weight > 0 or self.warmup_steps > 0

    @classmethod
    def from_args(cls, args) -> "AuxCtcConfig":
        return cls(
            weight=getattr(args, "aux_ctc_weight", 0.0),
            mode=getattr(args, "aux_ctc_mode", "distance"),
            temperature=getattr(args, "aux_ctc_temperature", None),
            blank=getattr(args, "aux_ctc_blank", "pad"),
            warmup_steps=getattr(args, "projector_warmup_steps", 0),
            warmup_lr=getattr(args, "projector_warmup_lr", 1e-3),
            warmup_lr_schedule=getattr(args, "projector_warmup_lr_schedule", "constant"),
            warmup_max_seconds=getattr(args, "projector_warmup_max_seconds", 0.0),
            num_negatives=getattr(args, "aux_ctc_negatives", 0),
            norm_weight=getattr(args, "aux_ctc_norm_weight", 0.0),
        )


def add_aux_ctc_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("projector alignment (auxiliary CTC against the LLM token embeddings)")
    g.add_argument("--aux-ctc-weight", type=float, default=0.0,
                   help="Add w * CTC(projector output vs. LLM token embeddings) to the training loss "
                   "(0 = off). Helps small data / short training; see llmasr/aux_ctc.py.")
    g.add_argument("--aux-ctc-mode", type=str, default="distance", choices=MODES,
                   help="Frame-vs-embedding score: distance (-||p-e||^2), cosine, dot.")
    g.add_argument("--aux-ctc-temperature", type=float, default=None,
                   help=f"Logits are divided by this (default {DEFAULT_TEMPERATURE}).")
    g.add_argument("--aux-ctc-blank", type=str, default="pad",
                   help="CTC blank: 'pad' (the prompt format's pad token, <|endoftext|>), a token or an id.")
    g.add_argument("--aux-ctc-negatives", type=int, default=0,
                   help="0: softmax over the whole LLM vocabulary; N > 0: over the batch's tokens, the blank "
                   "and N random other rows (much cheaper for large vocabularies).")
    g.add_argument("--aux-ctc-norm-weight", type=float, default=0.0,
                   help="Add this x mean log(||frame|| / mean embedding-row norm)^2 to the aux loss: keeps the "
                   "projector output at the scale of token embeddings (the CTC alone lets it grow; see aux_ctc.py).")
    g.add_argument("--projector-warmup-steps", type=int, default=0,
                   help="Before training, train only the projector(s) with the aux CTC loss for this many "
                   "steps (no LLM forward; cheap). 0 = off.")
    g.add_argument("--projector-warmup-lr", type=float, default=1e-3,
                   help="Adam learning rate of the projector warm-up.")
    g.add_argument("--projector-warmup-lr-schedule", type=str, default="constant", choices=WARMUP_LR_SCHEDULES,
                   help="constant, or cosine: from --projector-warmup-lr down to 0 over the warm-up steps "
                   "(the demo: a long warm-up ends at a lower CTC loss).")
    g.add_argument("--projector-warmup-max-seconds", type=float, default=0.0,
                   help="Stop the projector warm-up after this many seconds (0 = no limit).")
    g.add_argument("--projector-warmup-cuts", type=str, default=None,
                   help="Cuts of the projector warm-up, given like --train-cuts (default: the training cuts). "
                   "The warm-up runs no LLM, so it can afford more data than the LLM training: e.g. "
                   "train-clean-100,train-clean-360 for the warm-up and train-clean-100 for the LLM.")


class AuxCtc:
    """The aux loss bound to one SpeechLLM's tokenizer and embedding (no parameters, not a module).

    Model-side use (in ``SpeechLLM.forward``, after ``prepare_inputs``)::

        aux, aux_stats = self.aux_ctc(speech, texts)     # speech: [(frames, lens)] per encoder
        loss = loss + self.aux_ctc.weight * aux
    """

    def __init__(self, cfg: AuxCtcConfig, tokenizer, embedding: nn.Embedding, prompt_format):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embedding = embedding  # the module: its weight is read at call time (dtype/device moves)
        self.blank_id = resolve_blank_id(tokenizer, cfg.blank, prompt_format)
        # The transcript is aligned exactly as the LLM is trained on it (llmasr.prompt.transcript_ids:
        # e.g. lower-cased for the speechllm format); aligning to other tokens ("WALTER" -> W/AL/TER
        # instead of "walter") teaches the projector to spell a text the LLM never has to write.
        self.prompt_format = prompt_format

    @property
    def weight(self) -> float:
        return self.cfg.weight

    def __call__(
        self, speech: Sequence[Tuple[torch.Tensor, torch.Tensor]], texts: Sequence[str], cut_ids=None
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Mean over encoders (MoSE: every projector is aligned) of :func:`aux_ctc_loss`."""
        targets = transcript_ids(self.tokenizer, self.prompt_format, texts)
        total, stats = None, {}
        for frames, lens in speech:
            loss, s = aux_ctc_loss(
                frames, lens, targets, self.embedding.weight, self.blank_id, self.cfg.mode, self.cfg.temperature,
                cut_ids, num_negatives=self.cfg.num_negatives, norm_weight=self.cfg.norm_weight,
            )
            total = loss if total is None else total + loss
            for k, v in s.items():
                stats[k] = stats.get(k, 0) + v
        for k in ("aux_ctc_frame_norm", "aux_ctc_embedding_norm"):  # means, not sums
            stats[k] /= len(speech)
        return total / len(speech), stats

    def greedy(self, frames: torch.Tensor, lens: torch.Tensor) -> List[str]:
        ids = greedy_ctc_ids(frames, lens, self.embedding.weight, self.blank_id, self.cfg.mode)
        return self.tokenizer.batch_decode(ids)


def build_aux_ctc(args, model) -> Optional[AuxCtc]:
    """An :class:`AuxCtc` for a SpeechLLM from the command-line flags, or None when unused."""
    cfg = AuxCtcConfig.from_args(args)
    if not cfg.needed:
        return None
    return AuxCtc(cfg, model.tokenizer, model.llm.get_input_embeddings(), model.prompt_format)


# --------------------------------------------------------------------------------------------
# Projector-only warm-up
# --------------------------------------------------------------------------------------------


def maybe_projector_warmup(params, model, batches: Iterable[dict], device: torch.device) -> Optional[Dict[str, float]]:
    """The training recipe's hook: run :func:`projector_warmup` when ``--projector-warmup-steps``
    > 0 and training starts from scratch (not when resuming: ``--start-epoch`` 1, ``--start-batch``
    0). ``model``: the SpeechLLM (not yet wrapped by DDP/DeepSpeed); ``batches``: the training
    dataloader. Logs ``projector warm-up step i/n: aux CTC loss x (t s)`` lines."""
    cfg = AuxCtcConfig.from_args(params)
    if cfg.warmup_steps <= 0:
        return None
    if getattr(params, "start_epoch", 1) > 1 or getattr(params, "start_batch", 0) > 0:
        logging.info("resuming: skipping the projector warm-up")
        return None
    aux = AuxCtc(cfg, model.tokenizer, model.llm.get_input_embeddings(), model.prompt_format)
    logging.info(f"projector warm-up: {cfg.warmup_steps} steps of aux CTC (mode {cfg.mode}, "
                 f"lr {cfg.warmup_lr}, {cfg.warmup_lr_schedule}), projector only")
    out = projector_warmup(
        model, batches, aux, cfg.warmup_steps, lr=cfg.warmup_lr, lr_schedule=cfg.warmup_lr_schedule, device=device,
        max_seconds=cfg.warmup_max_seconds, log_interval=max(1, getattr(params, "log_interval", 20)),
    )
    logging.info(f"projector warm-up done: {out['steps']} steps, aux CTC loss {out['loss']:.3f}, "
                 f"{out['seconds']:.0f} s")
    return out


def projector_warmup(
    model,
    batches: Iterable[dict],
    aux: AuxCtc,
    num_steps: int,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    device: Optional[torch.device] = None,
    max_seconds: float = 0.0,
    log_interval: int = 20,
    grad_clip: float = 5.0,
    on_log: Optional[Callable[[int, float, float], None]] = None,
) -> Dict[str, float]:
    """Train only the projector(s) of ``model`` (a SpeechLLM) with the aux CTC loss.

    ``batches`` yields the training batches (dicts with ``features``, ``feature_lens``, ``texts``,
    optionally ``cut_ids``); it is cycled until ``num_steps`` steps (or ``max_seconds``) are done.
    The encoders run without gradient unless they are being fine-tuned; the LLM is not run at all.
    Uses its own Adam optimizer (the main optimizer's state is untouched), at ``lr`` or, with ``lr_schedule``
    "cosine", from ``lr`` down to 0 over ``num_steps``; run it before the model
    is wrapped by DDP/DeepSpeed (with several processes the result of rank 0 is broadcast). Returns
    ``{"steps", "loss" (mean of the last log interval), "seconds"}``; ``on_log(step, loss, elapsed)``
    is called every ``log_interval`` steps (progress display).
    """
    if num_steps <= 0:
        return {"steps": 0, "loss": float("nan"), "seconds": 0.0}
    projectors = list(model.projectors)
    params = [p for proj in projectors for p in proj.parameters() if p.requires_grad]
    if not params:
        raise ValueError("projector warm-up: the projector has no trainable parameters")
    device = device or params[0].device
    if lr_schedule not in WARMUP_LR_SCHEDULES:
        raise ValueError(f"projector warm-up: unknown lr schedule {lr_schedule!r} ({', '.join(WARMUP_LR_SCHEDULES)})")
    opt = torch.optim.Adam(params, lr=lr)
    total = num_steps  # (num_steps is cut short below when max_seconds runs out)
    was_training = model.training
    model.train()
    start = time.time()
    step, window, window_n, last = 0, 0.0, 0, float("nan")
    try:
        while step < num_steps:
            progressed = False
            for batch in batches:
                progressed = True
                feats, lens, more = speech_inputs(batch, device)  # more: features_by_type (mixed front ends)
                speech = model.encode(feats, lens, batch.get("cut_ids"), **more)
                loss, stats = aux(speech, batch["texts"], batch.get("cut_ids"))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                step += 1
                if lr_schedule == "cosine":
                    # llmasr.training.schedulers.WarmupCosine's curve without warm-up; that module sits
                    # above this one (tests/test_imports.py), so the one line is written here
                    for group in opt.param_groups:
                        group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / total))
                window += float(loss.detach())
                window_n += 1
                elapsed = time.time() - start
                if step % log_interval == 0 or step == num_steps:
                    last = window / max(window_n, 1)
                    window, window_n = 0.0, 0
                    if on_log is not None:
                        on_log(step, last, elapsed)
                    else:
                        logging.info(f"projector warm-up step {step}/{num_steps}: aux CTC loss {last:.3f}, "
                                     f"frame norm {stats['aux_ctc_frame_norm']:.1f} (embedding rows "
                                     f"{stats['aux_ctc_embedding_norm']:.1f}) ({elapsed:.0f} s)")
                if step >= num_steps or (max_seconds > 0 and elapsed >= max_seconds):
                    num_steps = step
                    break
            if not progressed:
                raise ValueError("projector warm-up: the training data yielded no batch")
    finally:
        model.train(was_training)
        opt.zero_grad(set_to_none=True)
    if window_n:
        last = window / window_n
    # Multi-process training: every rank warmed up on its own batches; start the real training
    # from one set of projector weights (rank 0's), as DDP/DeepSpeed expect identical replicas.
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
    return {"steps": step, "loss": last, "seconds": time.time() - start}


__all__ = [
    "MODES",
    "embedding_logits",
    "aux_ctc_loss",
    "min_ctc_frames",
    "greedy_ctc_ids",
    "resolve_blank_id",
    "AuxCtcConfig",
    "AuxCtc",
    "add_aux_ctc_arguments",
    "build_aux_ctc",
    "projector_warmup",
    "maybe_projector_warmup",
]
