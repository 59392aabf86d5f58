"""Outputs of frozen speech encoders kept in memory by cut id (``--cache-encoder-outputs``)."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple

import torch


class EncoderOutputCache:
    """Outputs of frozen speech encoders kept in (CPU) memory by (encoder index, cut id).

    A frozen encoder fed the same features gives the same output every epoch, and on a small
    corpus it can be most of a training step (Whisper-base is ~20-40 % of a demo step on a CPU; the
    projector warm-up runs nothing else). Only valid when the features of a cut never change:
    no SpecAugment, no noise mixing, no perturbation that keeps the cut id - the training recipe
    refuses ``--cache-encoder-outputs`` with ``--enable-spec-aug`` / ``--enable-musan``. Entries
    stop being added (with one warning) once ``max_bytes`` is reached; nothing is evicted.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.store: Dict[Tuple[int, str], torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._full_warned = False

    def get(self, key: Tuple[int, str]) -> Optional[torch.Tensor]:
        out = self.store.get(key)
        if out is None:
            self.misses += 1
        else:
            self.hits += 1
        return out

    def put(self, key: Tuple[int, str], frames: torch.Tensor) -> None:
        size = frames.numel() * frames.element_size()
        if self.bytes + size > self.max_bytes:
            if not self._full_warned:
                logging.warning(f"encoder output cache is full ({self.bytes / 2**30:.2f} GB, {len(self.store)} "
                                "entries); further cuts are encoded every time (raise --encoder-cache-max-gb)")
                self._full_warned = True
            return
        self.store[key] = frames.detach().to("cpu", copy=True)
        self.bytes += size

    def summary(self) -> str:
        total = self.hits + self.misses
        return (f"encoder output cache: {len(self.store)} entries, {self.bytes / 2**20:.0f} MB, "
                f"hit rate {self.hits / max(total, 1):.0%} of {total} lookups")
