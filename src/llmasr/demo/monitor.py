"""Training progress for the demo's console, from the metrics file src/train.py writes
(``<exp-dir>/log/metrics-train.jsonl``, :func:`llmasr.training.logs.read_metrics`), not its log text."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from llmasr.demo.console import fmt_time, say
from llmasr.training.logs import METRICS_FILE, read_metrics


class TrainMonitor:
    """One progress line per metrics record (a warm-up or training log interval), with an overall
    ETA; polls the file from a thread between :meth:`start` and :meth:`stop`.

    The records carry no position within the epoch: until the first epoch is over (its ``valid``
    record gives its last batch) an epoch's length is estimated as ``num_train_cuts`` over the
    mean utterances per batch."""

    def __init__(self, exp_dir: Path, num_epochs: int, warmup_steps: int, num_train_cuts: int,
                 poll_seconds: float = 1.0):
        self.path = Path(exp_dir) / METRICS_FILE
        self.num_epochs, self.warmup_steps, self.num_train_cuts = num_epochs, warmup_steps, num_train_cuts
        self.poll_seconds = poll_seconds
        self.t0 = time.time()
        self.seen, self.size = 0, -1
        self.epoch_end: Dict[int, int] = {}  # epoch -> its last global batch (from its valid record)
        self.utterances: List[float] = []
        self.first: Optional[Tuple[float, float]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "TrainMonitor":
        self._thread = threading.Thread(target=self._loop, name="demo-train-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # the records written after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def poll(self) -> None:
        """Show the records added since the last call."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == self.size:
            return
        self.size = size
        records = read_metrics(self.path.parent.parent)
        if len(records) < self.seen:  # the training rewrote the file (a new run)
            self.seen = 0
        for rec in records[self.seen:]:
            self.show(rec)
        self.seen = len(records)

    def epoch_fraction(self, rec: dict) -> float:
        """How far into its epoch a train record is, in [0, 1)."""
        start = self.epoch_end.get(rec["epoch"] - 1, 0)
        if self.epoch_end:
            first = min(self.epoch_end)
            per_epoch = self.epoch_end[first] - self.epoch_end.get(first - 1, 0)
        else:
            per_batch = sum(self.utterances) / len(self.utterances) if self.utterances else 1.0
            per_epoch = self.num_train_cuts / max(per_batch, 1e-9)
        return min(0.999, (rec["batch"] - start) / max(per_epoch, 1.0))

    def show(self, rec: dict) -> None:
        now = time.time()
        if rec["stage"] == "valid":
            self.epoch_end[rec["epoch"]] = rec["batch"]
        elif rec["stage"] == "warmup":
            say(f"  projector warm-up: step {rec['batch']}/{self.warmup_steps}, aux CTC loss {rec['loss']:.3f}, "
                f"elapsed {fmt_time(now - self.t0)}")
        else:
            if "utterances" in rec:
                self.utterances.append(rec["utterances"])
            epoch, frac = rec["epoch"], self.epoch_fraction(rec)
            done = (epoch - 1 + frac) / self.num_epochs
            if self.first is None:  # the rate is measured from the first logged batch on
                self.first = (now, done)
            t1, d1 = self.first
            eta = (now - t1) * (1 - done) / (done - d1) if done > d1 else float("nan")
            say(f"  train: epoch {epoch}/{self.num_epochs} {100 * frac:5.1f}%, batch {rec['batch']}, "
                f"loss {rec['loss']:.3f}, elapsed {fmt_time(now - self.t0)}, ETA {fmt_time(eta)}")
