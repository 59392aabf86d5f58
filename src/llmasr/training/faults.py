"""Surviving the cluster: preemption signals, automatic resume, runs of non-finite batches.

- SIGTERM / SIGUSR1 (SLURM, Kubernetes): :class:`StopOnSignal` only sets a flag; the training loop
  finishes the batch in progress, every rank agrees on the flag (one all-reduced int per batch, so
  all ranks stop at the same batch even when the signal reached only some), ``checkpoint-<batch>.pt``
  is written and the process exits with :data:`PREEMPTED_EXIT_STATUS`.
- ``--auto-resume true``: :func:`find_resume_point` picks the newest loadable checkpoint of
  ``--exp-dir`` (``epoch-N.pt`` or ``checkpoint-B.pt``, whichever is later in training), so that a
  requeued job can rerun its command unchanged.
- ``--max-bad-batches N``: a batch with a non-finite loss or gradients is skipped and counted; N in
  a row save the batch and the model under ``<exp-dir>/bad-batch-<global batch>/`` and stop.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from llmasr.config import UserError, str2bool

__all__ = ["PREEMPTED_EXIT_STATUS", "Preempted", "TooManyBadBatchesError", "StopOnSignal",
           "add_fault_tolerance_arguments", "check_fault_tolerance_arguments", "find_resume_point",
           "apply_auto_resume", "stop_agreed", "save_bad_batch_dir"]

# EX_TEMPFAIL (sysexits.h): "try again later". Not 0, so that `train && decode` does not go on
# with a half-trained model; a requeue wrapper tests for it.
PREEMPTED_EXIT_STATUS = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the training loop after the stop checkpoint is written (carries its path)."""

    def __init__(self, checkpoint: Optional[Path], signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}")
        self.checkpoint = checkpoint
        self.signum = signum


class TooManyBadBatchesError(UserError):
    """``--max-bad-batches`` non-finite batches in a row (a one-line error, like bad input: the data
    or the learning rate, not the code, is what to look at)."""


def add_fault_tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fault tolerance")
    g.add_argument("--auto-resume", type=str2bool, default=False,
                   help="Start from the newest checkpoint in --exp-dir (epoch-N.pt or checkpoint-B.pt, whichever is "
                   "later in training), or from scratch if there is none: a preempted job reruns its command as is.")
    g.add_argument("--max-bad-batches", type=int, default=10,
                   help="Skip (and count) a batch whose loss or gradients are not finite; stop after this many in a "
                   "row, saving the last one under <exp-dir>/bad-batch-<batch>/. 1: stop at the first.")
    g.add_argument("--dist-timeout-min", type=float, default=10.0,
                   help="Collective timeout in minutes: how long ranks wait for a lost or hung rank before exiting.")
    g.add_argument("--dist-backend", type=str, default="auto", choices=["auto", "nccl", "gloo"],
                   help="Process-group backend (auto: nccl when CUDA is available, else gloo).")


def check_fault_tolerance_arguments(args, error) -> None:
    """``error(message)``: the parser's error (one line, exit 2)."""
    if args.max_bad_batches < 1:
        error(f"--max-bad-batches must be >= 1, got {args.max_bad_batches}")
    if not args.dist_timeout_min > 0:
        error(f"--dist-timeout-min must be > 0, got {args.dist_timeout_min}")
    if args.auto_resume and (args.start_batch > 0 or args.start_epoch > 1):
        error("--auto-resume true picks the start itself: drop --start-epoch / --start-batch")


# --------------------------------------------------------------------------- signals


class StopOnSignal:
    """While installed, SIGTERM/SIGUSR1 set ``self.signum`` instead of killing the process (the
    previous handlers come back on :meth:`restore`)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> "StopOnSignal":
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.signum:  # (logging from a handler is not safe; the loop logs it)
            self.signum = signum

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


def stop_agreed(local_signum: int, device: torch.device) -> int:
    """The signal number any rank has received (0: none); collective when distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_signum
    t = torch.tensor([local_signum], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# --------------------------------------------------------------------------- auto-resume

_EPOCH = re.compile(r"epoch-(\d+)\.pt")
_BATCH = re.compile(r"checkpoint-(\d+)\.pt")


def _batch_count(path: Path) -> Optional[int]:
    """The checkpoint's global batch count, or None if it cannot be read (logged)."""
    from llmasr.io import load_torch_file

    try:
        ckpt = load_torch_file(path, mmap=True)
        return int(ckpt["batch_idx_train"])
    except Exception as e:  # a damaged file: an older one is the resume point
        logging.warning("--auto-resume: skipping %s (%s)", path, e)
        return None


def find_resume_point(exp_dir: Path) -> Tuple[int, int, Optional[Path]]:
    """``(start_epoch, start_batch, path)`` of the newest readable checkpoint in ``exp_dir``
    (``(1, 0, None)``: none). A ``checkpoint-B.pt`` is later than ``epoch-N.pt`` when B exceeds the
    epoch checkpoint's batch count (a batch checkpoint at an epoch's last batch is not: the epoch
    checkpoint has the epoch's end, validation included)."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return 1, 0, None
    epochs, batches = [], []
    for f in exp_dir.iterdir():
        if m := _EPOCH.fullmatch(f.name):
            epochs.append((int(m.group(1)), f))
        elif m := _BATCH.fullmatch(f.name):
            batches.append((int(m.group(1)), f))
    epoch_point = None  # (batch count, epoch, path)
    for n, f in sorted(epochs, reverse=True):
        count = _batch_count(f)
        if count is not None:
            epoch_point = (count, n, f)
            break
    for b, f in sorted(batches, reverse=True):
        if epoch_point is not None and b <= epoch_point[0]:
            break
        if _batch_count(f) is not None:
            return 1, b, f
    if epoch_point is not None:
        return epoch_point[1] + 1, 0, epoch_point[2]
    return 1, 0, None


def apply_auto_resume(params, rank: int) -> None:
    """Set ``params.start_epoch`` / ``start_batch`` from :func:`find_resume_point` (rank 0's
    choice on every rank), logging which checkpoint."""
    from llmasr.training.dist import broadcast_object

    if not params.get("auto_resume"):
        return
    point = broadcast_object(find_resume_point(params.exp_dir) if rank == 0 else None)
    params.start_epoch, params.start_batch, path = point
    if path is None:
        logging.info("--auto-resume: no checkpoint in %s, starting from scratch", params.exp_dir)
    else:
        logging.info("--auto-resume: resuming from %s (%s)", path,
                     f"--start-batch {params.start_batch}" if params.start_batch else f"--start-epoch {params.start_epoch}")


# --------------------------------------------------------------------------- bad batches


def save_bad_batch_dir(batch, model, exp_dir: Path, batch_idx: int, rank: int) -> Path:
    """``<exp_dir>/bad-batch-<batch_idx>/``: this rank's batch (cut ids + features) as
    ``batch-rank<rank>.pt`` and, from rank 0, the trainable weights as ``model.pt``."""
    from llmasr.io import atomic_torch_save, unwrap_model

    out = Path(exp_dir) / f"bad-batch-{batch_idx}"
    payload = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in batch.items()}
    payload["cut_ids"] = list(batch.get("cut_ids", []))
    atomic_torch_save(payload, out / f"batch-rank{rank}.pt")
    if rank == 0:
        m = unwrap_model(model)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        state = {k: v.detach().cpu() for k, v in m.state_dict().items() if k in trainable}
        atomic_torch_save({"model": state}, out / "model.pt")
    return out
