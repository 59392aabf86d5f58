"""Which training/validation cuts a loader keeps (:class:`CutFilter`): duration limits and an optional
transcript length limit (e.g. LLM tokens); every dropped cut is logged once with its id and reason, and
counted. Test cuts are never filtered (a dropped test utterance would silently change the WER)."""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, Dict, Optional

from lhotse.cut import Cut


class CutFilter:
    """Keeps cuts with ``min_duration <= duration <= max_duration`` and, if ``text_len_fn`` is given,
    ``text_len_fn(text) <= max_text_len``. Dropped cuts are logged (once per id) and counted;
    :meth:`summary` gives the counts per reason. ``passed`` / ``passed_seconds`` count the cuts
    kept since :meth:`reset_counts` (the sampler reads every cut once per epoch). Picklable, so it
    can run in any process."""

    def __init__(
        self,
        min_duration: float = 0.0,
        max_duration: float = float("inf"),
        text_len_fn: Optional[Callable[[str], int]] = None,
        max_text_len: Optional[int] = None,
        name: str = "cuts",
    ):
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.text_len_fn = text_len_fn
        self.max_text_len = max_text_len
        self.name = name
        self.dropped: Dict[str, str] = {}  # cut id -> reason
        self.passed = 0
        self.passed_seconds = 0.0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reason(self, cut: Cut) -> Optional[str]:
        if cut.duration < self.min_duration:
            return f"too short ({cut.duration:.2f} s < --min-duration {self.min_duration})"
        if cut.duration > self.max_duration:
            return f"too long ({cut.duration:.2f} s > --max-cut-duration {self.max_duration})"
        text = " ".join(s.text or "" for s in cut.supervisions)
        if not text.strip():
            return "empty transcript"
        if self.text_len_fn is not None and self.max_text_len is not None:
            n = self.text_len_fn(text)
            if n > self.max_text_len:
                return f"transcript too long ({n} tokens > --max-text-tokens {self.max_text_len})"
        return None

    def __call__(self, cut: Cut) -> bool:
        why = self.reason(cut)
        if why is None:
            with self._lock:
                self.passed += 1
                self.passed_seconds += cut.duration
            return True
        with self._lock:
            if cut.id not in self.dropped:
                self.dropped[cut.id] = why
                logging.warning(f"{self.name}: dropping cut {cut.id}: {why}")
        return False

    def summary(self) -> Dict[str, int]:
        return dict(Counter(r.split(" (")[0] for r in self.dropped.values()))

    def reset_counts(self) -> None:
        with self._lock:
            self.passed, self.passed_seconds = 0, 0.0
