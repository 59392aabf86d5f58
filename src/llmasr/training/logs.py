"""Logging for training: per-rank log files, metric tracking, progress/ETA, tensorboard.

- ``exp-dir/log/log-train-<YYYY-mm-dd-HH-MM-SS>[-<rank>]`` (icefall naming), also echoed to the console.
- :class:`MetricsTracker` sums per-batch statistics (loss summed over label tokens, token counts,
  correct tokens, frames, utterances) so that ratios stay exact when batches differ in size and
  when ranks are combined.
- :class:`Progress` estimates the ETA of the epoch from the fraction of the epoch's cuts consumed.
- :class:`Throughput`: samples/s, frames/s and batch padding of each rank between log lines.
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from llmasr.config import format_duration

__all__ = ["setup_logger", "MetricsTracker", "Progress", "Throughput", "make_tb_writer"]


def setup_logger(log_prefix: str | os.PathLike, rank: int = 0, world_size: int = 1, level: str = "info") -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    if world_size > 1:
        path = Path(f"{log_prefix}-{stamp}-{rank}")
        fmt = f"%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] ({rank}/{world_size}) %(message)s"
    else:
        path = Path(f"{log_prefix}-{stamp}")
        fmt = "%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s"
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(path), format=fmt, level=getattr(logging, level.upper()), filemode="w", force=True
    )
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(fmt))
    logging.getLogger("").addHandler(console)
    return path


class MetricsTracker(defaultdict):
    """Sums of statistics; ``loss`` is the loss *summed* over ``tokens`` label tokens."""

    def __init__(self, init: Optional[Dict[str, float]] = None):
        super().__init__(float)
        if init:
            self.update(init)

    def __add__(self, other: "MetricsTracker") -> "MetricsTracker":
        out = MetricsTracker(self)
        for k, v in other.items():
            out[k] += v
        return out

    def scaled(self, alpha: float) -> "MetricsTracker":
        return MetricsTracker({k: v * alpha for k, v in self.items()})

    def normalized(self) -> Dict[str, float]:
        """Per-token loss and accuracy, plus raw counts."""
        tokens = max(self.get("tokens", 0.0), 1e-9)
        out = {}
        if "loss" in self:
            out["loss"] = self["loss"] / tokens
        if "correct" in self:
            out["acc"] = self["correct"] / tokens
        if self.get("aux_ctc_tokens", 0.0) > 0:
            out["aux_ctc"] = self["aux_ctc_loss_sum"] / self["aux_ctc_tokens"]
        for k in ("tokens", "utterances", "frames"):
            if k in self:
                out[k] = self[k]
        return out

    def __str__(self) -> str:
        parts = []
        for k, v in self.normalized().items():
            parts.append(f"{k}={v:.4g}" if k in ("loss", "acc", "aux_ctc") else f"{k}={v:.0f}")
        return ", ".join(parts)

    def reduce(self, device: torch.device) -> None:
        """Sum over ranks (in place)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        keys = sorted(self.keys())
        t = torch.tensor([self[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            self[k] = v

    def write_summary(self, tb_writer, prefix: str, step: int) -> None:
        for k, v in self.normalized().items():
            if k in ("loss", "acc"):
                tb_writer.add_scalar(prefix + k, v, step)


class Progress:
    """ETA for the current epoch from the fraction of its cuts consumed (all ranks together)."""

    def __init__(self, total_cuts: Optional[int], world_size: int, done_cuts: int = 0):
        self.total = total_cuts
        self.world_size = world_size
        self.start_done = done_cuts
        self.done = done_cuts
        self.t0 = time.time()

    def update(self, batch_cuts: int) -> None:
        # Every rank sees a different batch of about the same size.
        self.done += batch_cuts * self.world_size

    def __str__(self) -> str:
        elapsed = time.time() - self.t0
        if not self.total:
            return f"elapsed {format_duration(elapsed)}"
        frac = min(1.0, self.done / self.total)
        new = self.done - self.start_done
        if new <= 0:
            return f"{100 * frac:.1f}% of epoch"
        rate = new / max(elapsed, 1e-9)
        eta = max(0.0, (self.total - self.done) / rate)
        return f"{100 * frac:.1f}% of epoch, elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}"


class Throughput:
    """This rank's speed since the previous :meth:`report`: samples/s, feature frames/s, s/batch,
    and the padding of its batches (padded frames / all frames of the padded (N, T) batches - the
    compute spent on padding, which the bucketing sampler options trade against shuffling)."""

    def __init__(self):
        self._restart()

    def _restart(self) -> None:
        self.t0 = time.time()
        self.batches = self.samples = self.frames = self.slots = 0

    def update(self, feature_lens: torch.Tensor, padded_length: int) -> None:
        self.batches += 1
        self.samples += len(feature_lens)
        self.frames += int(feature_lens.sum())
        self.slots += len(feature_lens) * padded_length

    def report(self) -> Dict[str, float]:
        """The rates since the previous report; starts the next interval."""
        dt = max(time.time() - self.t0, 1e-9)
        rates = {"samples_per_s": self.samples / dt, "frames_per_s": self.frames / dt,
                 "padding": 1.0 - self.frames / self.slots if self.slots else 0.0,
                 "s_per_batch": dt / max(self.batches, 1)}
        self._restart()
        return rates

    @staticmethod
    def format(rates: Dict[str, float]) -> str:
        return (f"{rates['samples_per_s']:.2f} samples/s, {rates['frames_per_s']:.0f} frames/s, "
                f"padding {rates['padding']:.3f}, {rates['s_per_batch']:.3f}s/batch")


def make_tb_writer(exp_dir: Path, enabled: bool, rank: int):
    if not enabled or rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(exp_dir) / "tensorboard"))
