"""Logging for training: per-rank log files, metric tracking, progress/ETA, tensorboard.

- ``exp-dir/log/log-train-<YYYY-mm-dd-HH-MM-SS>[-<rank>]`` (icefall naming), also echoed to the console.
- :class:`MetricsTracker` sums per-batch statistics (loss summed over label tokens, token counts,
  correct tokens, frames, utterances) so that ratios stay exact when batches differ in size and
  when ranks are combined.
- :class:`Progress` estimates the ETA of the epoch from the fraction of the epoch's cuts consumed.
- :class:`Throughput`: samples/s, frames/s and batch padding of each rank between log lines.
- :class:`MetricsFile` / :func:`read_metrics`: the structured record of a run (below).

Metrics file (the contract for tools that plot or compare runs; read it only through
:func:`read_metrics`): ``<exp-dir>/log/metrics-train.jsonl``, one JSON object per line, written by
rank 0 and flushed per record. Every record has

- ``"stage"``: ``"warmup"`` (projector warm-up, :mod:`llmasr.training.warmup`), ``"train"`` (a
  training log line) or ``"valid"`` (a validation result);
- ``"epoch"`` (int; 0 for the warm-up), ``"batch"`` (int: the global batch index; the warm-up's own
  step counter for ``"warmup"``), ``"time_s"`` (float: seconds since training started, the warm-up
  included; a resumed run continues the clock of the records it keeps), ``"lr"`` (float) and
  ``"loss"`` (float: per-token loss; the transcript cross-entropy for train/valid, the aux CTC loss
  for the warm-up);

plus the tracker's other normalised fields where present: ``"acc"``, ``"aux_ctc"`` (aux CTC loss per
aligned token; the warm-up sets it equal to ``"loss"``), ``"tokens"``, ``"utterances"``, ``"frames"``;
train records also carry ``"tot_loss"`` (the decayed running loss of the log line) and, with fp16,
``"grad_scale"``. A run from scratch starts a new file; a resumed run keeps the records up to the
global batch it resumes from and appends after them.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from llmasr.config import format_duration
from llmasr.io import atomic_write_text

__all__ = ["setup_logger", "MetricsTracker", "Progress", "Throughput", "make_tb_writer",
           "METRICS_FILE", "STAGES", "MetricsFile", "read_metrics", "metrics_file"]


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


# --------------------------------------------------------------------------- metrics file

METRICS_FILE = Path("log") / "metrics-train.jsonl"
STAGES = ("warmup", "train", "valid")


class MetricsFile:
    """Appends one JSON record per line to ``path`` (see the module doc), flushed per record.

    Ranks other than 0 write nothing (``rank`` None: this process's rank in the initialised process
    group, else 0). ``time_s`` counts from ``start_time`` (default: now). ``last_lr`` is the lr of
    the latest record, for records written where no scheduler is at hand (validation).
    """

    def __init__(self, path: str | os.PathLike, rank: Optional[int] = None, start_time: Optional[float] = None):
        self.path = Path(path)
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.enabled = rank == 0
        self.start_time = time.time() if start_time is None else start_time
        self.last_lr = math.nan

    def write(self, stage: str, epoch: int, batch: int, lr: Optional[float] = None, **fields: Any) -> Optional[dict]:
        """Write one record; ``fields`` must hold ``loss``. Returns the record (None off rank 0)."""
        if stage not in STAGES:
            raise ValueError(f"metrics record: unknown stage {stage!r} (one of {', '.join(STAGES)})")
        if "loss" not in fields:
            raise ValueError(f"metrics record ({stage}, batch {batch}) has no loss")
        if lr is not None:
            self.last_lr = float(lr)
        if not self.enabled:
            return None
        record = {"stage": stage, "epoch": int(epoch), "batch": int(batch),
                  "time_s": round(time.time() - self.start_time, 3), "lr": self.last_lr}
        record.update({k: float(v) for k, v in fields.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan: a non-finite loss is a fact of the run, written as NaN/Infinity (Python's json reads them)
        line = json.dumps(record, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        return record


def read_metrics(exp_dir: str | os.PathLike, stage: Optional[str] = None) -> List[dict]:
    """The records of ``<exp_dir>/log/metrics-train.jsonl`` in file order (only ``stage``'s when given).

    A torn last line (a run killed mid-write) is skipped; a corrupt line before it raises
    ValueError naming the file and line. A missing file raises FileNotFoundError.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"read_metrics: unknown stage {stage!r} (one of {', '.join(STAGES)})")
    path = Path(exp_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (written by training since this version)")
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[-1] == ""  # every record ends with a newline; a torn one does not
    if complete:
        lines = lines[:-1]
    out = []
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or rec.get("stage") not in STAGES:
                raise ValueError("not a metrics record")
        except ValueError as e:
            if i == len(lines) and not complete:
                break  # the torn last line of a killed run
            raise ValueError(f"{path}:{i}: corrupt metrics record ({e}): {line[:80]!r}") from None
        if stage is None or rec["stage"] == stage:
            out.append(rec)
    return out


_OPEN: Dict[str, tuple] = {}


def metrics_file(params, rank: Optional[int] = None) -> MetricsFile:
    """The :class:`MetricsFile` of the run ``params`` describes (one per run and process).

    The first call of a run decides: from scratch (``start_epoch`` 1, ``start_batch`` 0) it starts
    an empty file; resuming, it keeps the records up to ``params.batch_idx_train`` (those a killed
    run wrote after its checkpoint are replaced by the resumed run's) and continues their clock.
    """
    path = Path(params.exp_dir) / METRICS_FILE
    key = str(path.resolve())
    entry = _OPEN.get(key)
    if entry is not None and entry[0] is params:
        return entry[1]
    mf = MetricsFile(path, rank)
    if mf.enabled:
        resuming = params.get("start_epoch", 1) > 1 or params.get("start_batch", 0) > 0
        kept = []
        if resuming and path.is_file():
            done = params.get("batch_idx_train", 0)
            # (warm-up steps count on their own and happen only before the first batch)
            kept = [r for r in read_metrics(params.exp_dir) if r["stage"] == "warmup" or r["batch"] <= done]
        if path.is_file() or kept:
            atomic_write_text(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        if kept:
            mf.start_time -= max(r["time_s"] for r in kept)
    _OPEN.clear()  # one run per process at a time; drop references to finished runs' params
    _OPEN[key] = (params, mf)
    return mf
