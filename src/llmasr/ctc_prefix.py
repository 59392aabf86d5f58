"""Joint CTC / LLM decoding: the aux CTC's prefix scores added to the LLM's next-token scores.

A projector trained with the auxiliary CTC (:mod:`llmasr.aux_ctc`) is itself a recogniser over
the LLM's vocabulary: each projected frame's log-probabilities are a softmax over its similarity to
every embedding row. This module lets the LLM's search use it, as ESPnet's hybrid CTC/attention
decoding does (Watanabe et al. 2017, "Hybrid CTC/attention architecture for end-to-end speech
recognition"): a hypothesis ``h = g + c`` scores

    (1 - w) * log P_llm(c | g, speech)  +  w * (log P_ctc(h...) - log P_ctc(g...))

where ``P_ctc(h...)`` is the CTC probability of every transcript that starts with ``h`` (the *prefix
score*) and, for the end token, the probability of ``g`` being the whole transcript. Summed over the
hypothesis the CTC terms telescope to its full CTC log-probability, so the combined score of a
finished hypothesis is ``(1 - w) log P_llm + w log P_ctc``. The CTC side knows the audio's length
and every frame's evidence: it penalises dropped words, repeated phrases and words the LLM invents.

Only the LLM's ``num_candidates`` best next tokens (and the end token) are scored, ESPnet's
"partial scoring"; every other token is excluded, and so is the blank (no transcript contains it).
The forward variables of a prefix are computed from its parent's for all frames at once: the recursions

    r_n[t] = logaddexp(r_n[t-1], phi[t-1]) + x[t]         (prefix ends in its last label at t)
    r_b[t] = logaddexp(r_n[t-1], r_b[t-1]) + blank[t]     (prefix ends in a blank at t)

are linear in probability space, so each is a cumulative sum plus a ``logcumsumexp`` (in float64;
no loop over frames). The scorer is a transformers ``LogitsProcessor``: it finds each row's parent
among the previous step's rows by its token prefix, so beam search may reorder rows freely.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from llmasr.aux_ctc import DEFAULT_TEMPERATURE, MODES, vocabulary_logit_chunks

# Log-probability of a frame beyond an utterance's length for a non-blank label: finite (unlike
# -inf) so that cumulative sums stay finite, and low enough that exp() of it is 0 in float64.
_OUTSIDE = -1.0e4


class CtcPrefixScorer(LogitsProcessor):
    """Adds ``weight`` x the CTC prefix score to the LLM's scores (see the module doc).

    Args:
        frames: (B, T, H) projected frames, the aux CTC's input (not the compressed ones).
        frame_lens: (B,) valid frames per utterance.
        embedding: (V, H) the LLM's input embedding rows (the aux CTC's classes).
        blank_id: the CTC blank (the aux CTC's: the prompt format's pad token).
        eos_id: the token that ends a transcript.
        mode, temperature: the aux CTC's logit definition (:func:`llmasr.aux_ctc.embedding_logits`).
        weight: w in [0, 1].
        num_beams: rows per utterance in the search (1 = greedy).
        num_candidates: the LLM's best next tokens scored per row (the end token is added).
    """

    def __init__(
        self,
        frames: torch.Tensor,
        frame_lens: torch.Tensor,
        embedding: torch.Tensor,
        blank_id: int,
        eos_id: int,
        mode: str = "cosine",
        weight: float = 0.3,
        num_beams: int = 1,
        num_candidates: int = 10,
        temperature: Optional[float] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown CTC mode {mode!r}; choose from {', '.join(MODES)}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"CTC weight must be in [0, 1], got {weight}")
        if num_candidates < 2 * num_beams:
            raise ValueError(f"num_candidates ({num_candidates}) must be >= 2 x num_beams ({num_beams})")
        self.weight = float(weight)
        self.num_beams = int(num_beams)
        self.num_candidates = int(num_candidates)
        self.eos_id = int(eos_id)
        self.blank_id = int(blank_id)
        if self.blank_id == self.eos_id:
            raise ValueError(f"the CTC blank and the end token are the same id ({blank_id})")
        self.temperature = DEFAULT_TEMPERATURE[mode] if temperature is None else float(temperature)
        n, t, _ = frames.shape
        device = frames.device
        with torch.no_grad():
            x = frames.detach().float()
            emb = embedding.detach().float()
            self._mode = mode
            if mode == "cosine":  # cosine = dot of unit vectors; normalised once
                x, emb, self._mode = F.normalize(x, dim=-1), F.normalize(emb, dim=-1), "dot"
            # the per-frame log normaliser over the whole vocabulary, in bounded-memory chunks
            lse = torch.cat([
                torch.logsumexp(logits, -1)
                for logits in vocabulary_logit_chunks(x.reshape(n * t, -1), emb, self._mode, self.temperature)
            ]).view(n, t).double()
            valid = torch.arange(t, device=device)[None, :] < frame_lens.to(device)[:, None]
            blank = self._logits(x, emb[blank_id][None, None, :].expand(n, 1, -1))[:, 0] - lse
            # beyond its length a row only "emits blanks" with probability 1: r_b carries the
            # complete-prefix probability to the last column, where the end token reads it
            blank = blank.masked_fill(~valid, 0.0)
        rows = lambda z: z.repeat_interleave(self.num_beams, 0)  # noqa: E731
        self._x, self._lse, self._valid, self._blank = rows(x), rows(lse), rows(valid), rows(blank)
        self._emb = emb
        self._blank_cum = self._blank.cumsum(-1)
        self._state = None  # the previous step's rows and their candidates' forward variables

    def _logits(self, x: torch.Tensor, cand_emb: torch.Tensor) -> torch.Tensor:
        """(R, T, H) frames x (R, K, H) candidate rows -> (R, K, T) float64 logits."""
        dots = torch.einsum("rth,rkh->rkt", x, cand_emb)
        if self._mode == "distance":
            dots = 2.0 * dots - (cand_emb * cand_emb).sum(-1)[:, :, None]
        return (dots / self.temperature).double()

    def _initial(self, rows: int):
        t = self._x.shape[1]
        device = self._x.device
        r_n = torch.full((rows, t), float("-inf"), dtype=torch.float64, device=device)
        r_b = self._blank_cum.clone()  # all blanks so far
        psi = torch.zeros(rows, dtype=torch.float64, device=device)
        last = torch.full((rows,), -1, dtype=torch.long, device=device)
        alive = torch.ones(rows, dtype=torch.bool, device=device)
        return r_n, r_b, psi, last, alive

    def _recover(self, input_ids: torch.Tensor):
        """Each row's forward variables: its parent's candidate that matches its last token."""
        prev_ids, cand, cand_ok, r_n_c, r_b_c, psi_c = self._state
        rows, length = input_ids.shape
        nb = self.num_beams
        prefix = input_ids[:, :-1]
        if length - 1 != prev_ids.shape[1]:
            raise RuntimeError("CtcPrefixScorer: the search skipped a step (one scorer per generate() call)")
        same = (prefix.view(rows // nb, nb, 1, length - 1) == prev_ids.view(rows // nb, 1, nb, length - 1)).all(-1)
        found = same.any(-1).view(rows)
        parent = (same.float().argmax(-1) + torch.arange(rows // nb, device=input_ids.device)[:, None] * nb).view(rows)
        token = input_ids[:, -1]
        match = (cand[parent] == token[:, None]) & cand_ok[parent]
        k = match.float().argmax(-1)
        alive = found & match.any(-1) & (token != self.eos_id)
        return r_n_c[parent, k], r_b_c[parent, k], psi_c[parent, k], token, alive

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows = input_ids.shape[0]
        if input_ids.shape[1] == 0 or self._state is None:
            r_n, r_b, psi, last, alive = self._initial(rows)
            empty = True
        else:
            r_n, r_b, psi, last, alive = self._recover(input_ids)
            empty = False
        logp = torch.log_softmax(scores.float(), -1)
        # candidates: the LLM's best tokens other than the end token and the blank (not a label),
        # then the end token
        others = logp.clone()
        others[:, [self.eos_id, self.blank_id]] = float("-inf")
        top = others.topk(min(self.num_candidates - 1, others.shape[-1] - 2), -1).indices  # never those two
        cand = torch.cat([top, torch.full_like(top[:, :1], self.eos_id)], 1)  # (R, K)
        x = self._logits(self._x, self._emb[cand]) - self._lse[:, None, :]  # (R, K, T)
        x = x.masked_fill(~self._valid[:, None, :], _OUTSIDE)
        # phi[t]: the prefix g complete by frame t, ready for a new label c (after a blank if c
        # repeats g's last label)
        phi = torch.logaddexp(r_n, r_b)[:, None, :].expand_as(x).clone()
        repeat = cand == last[:, None]
        phi[repeat] = r_b[:, None, :].expand_as(x)[repeat]
        neg_inf = torch.full_like(x[..., :1], float("-inf"))
        first = x[..., :1] if empty else neg_inf  # c as the first label, at frame 0
        # r_n[t] = S[t] + logcumsumexp(a)[t], S = cumsum(x), a = [first - S[0], phi[s-1] - S[s-1] ...]
        s = x.cumsum(-1)
        a = torch.cat([first - s[..., :1], phi[..., :-1] - s[..., :-1]], -1)
        r_n_h = s + torch.logcumsumexp(a, -1)
        # r_b[t] = B[t] + logcumsumexp(b)[t], B = cumsum(blank), b = [-inf, r_n[s-1] - B[s-1] ...]
        bc = self._blank_cum[:, None, :]
        b = torch.cat([neg_inf, r_n_h[..., :-1] - bc[..., :-1]], -1)
        r_b_h = bc + torch.logcumsumexp(b, -1)
        psi_h = torch.logsumexp(torch.cat([first, phi[..., :-1] + x[..., 1:]], -1), -1)  # (R, K)
        # the end token: g is the whole transcript
        psi_h[:, -1] = torch.logaddexp(r_n[:, -1], r_b[:, -1])
        delta = (psi_h - psi[:, None]).float()
        combined = (1.0 - self.weight) * logp.gather(1, cand) + self.weight * delta
        out = torch.full_like(logp, float("-inf")).scatter(1, cand, combined)
        out = torch.where(alive[:, None], out, logp)  # a row without CTC state (finished) as the LLM says
        self._state = (input_ids.clone(), cand, alive[:, None].expand_as(cand), r_n_h, r_b_h, psi_h)
        return out


__all__ = ["CtcPrefixScorer"]
