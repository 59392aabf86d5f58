"""Distributed setup: ``--world-size N`` (spawns N processes) or an external launcher.

Three ways to run, all ending in ``run(rank, world_size, args)``:

- ``--world-size 1``: a single process, no process group.
- ``--world-size N``: icefall style, N processes spawned with torch.multiprocessing on this machine,
  rendezvous on ``localhost:--master-port``.
- ``torchrun`` / ``deepspeed`` launchers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT come
  from the environment; ``--world-size`` is ignored.

The backend is NCCL when CUDA is available and gloo otherwise (CPU training / tests), or what
``--dist-backend`` names. Collectives time out after ``--dist-timeout-min`` minutes (a lost or hung
rank then ends the others instead of holding them for NCCL's default 30 min). With ``--world-size N``,
a rank that raises stops the others (torch.multiprocessing terminates them) and its error is what the
user sees, one line naming the rank (:class:`RankFailed`); SIGTERM/SIGUSR1 to the launching process
are passed on to the ranks (``llmasr.training.faults``).

Several machines: one launcher per node, e.g. ``torchrun --nnodes 2 --node-rank K --nproc-per-node 8
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB`` (README "Scaling out"). ``rank`` is then
the GLOBAL rank (RANK): it picks the sampler's share, the log file and the one process (global rank 0)
that writes checkpoints and tensorboard logs; LOCAL_RANK (0 on the first process of every node) only
picks the GPU.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmasr.config import UserError

__all__ = ["RankFailed", "launch", "setup_dist", "cleanup_dist", "get_device", "launched_externally", "is_main",
           "exp_dir_is_shared"]


class RankFailed(RuntimeError):
    """A spawned rank raised or died; ``rank`` is the first that did."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


class UserRankFailed(RankFailed, UserError):
    """A rank's user error (bad input), reported as one line naming the rank."""


def launched_externally() -> bool:
    """True under torchrun / deepspeed (they export RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank_from_env(default: int) -> int:
    return int(os.environ.get("LOCAL_RANK", default))


def launch(run: Callable, args):
    """Call ``run(rank, world_size, args)`` once per process. Returns run's result in a single
    process (or under a launcher); with spawned ranks, whether a stop signal was passed on to them."""
    if launched_externally():
        return run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    world_size = int(args.world_size)
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    if world_size == 1:
        return run(0, 1, args)
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"--world-size {world_size} but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    return spawn(run, args, world_size)


_USER_ERROR_NAMES = ("llmasr.config.UserError", "UserError", "FileNotFoundError", "llmasr.io.CheckpointError",
                     "CheckpointError", "llmasr.io.DiskFullError", "DiskFullError",
                     "TooManyBadBatchesError", "llmasr.training.dist.UserRankFailed", "llmasr.training.faults.TooManyBadBatchesError")


def spawn(run: Callable, args, world_size: int) -> bool:
    """``run(rank, world_size, args)`` in ``world_size`` processes. SIGTERM/SIGUSR1 received here
    are sent on to every rank; a rank that fails stops the others and raises :class:`RankFailed`
    (a :class:`~llmasr.config.UserError` - one line - when the rank's error was one). Returns
    whether a signal was passed on."""
    ctx = mp.start_processes(run, args=(world_size, args), nprocs=world_size, join=False, start_method="spawn")

    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while not ctx.join(grace_period=5):  # then SIGTERM (our handler only flags it), 5 s, SIGKILL
            pass
        return bool(forwarded)
    except mp.ProcessRaisedException as e:  # the others have been terminated by join()
        lines = [ln for ln in e.msg.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else str(e)
        kind, _, message = last.partition(": ")
        if kind.strip() in _USER_ERROR_NAMES:
            raise UserRankFailed(f"rank {e.error_index} of {world_size} failed: {message}",
                                      e.error_index) from None
        raise RankFailed(f"rank {e.error_index} of {world_size} failed (the other ranks were stopped):\n{e.msg}",
                         e.error_index) from None
    except mp.ProcessExitedException as e:
        raise RankFailed(f"rank {e.error_index} of {world_size} exited with status {e.exit_code} "
                         f"(signal {e.signal_name})" if e.signal_name else
                         f"rank {e.error_index} of {world_size} exited with status {e.exit_code}; "
                         "the other ranks were stopped", e.error_index) from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def backend(choice: str = "auto") -> str:
    """``--dist-backend``: auto is nccl when CUDA is available, else gloo."""
    if choice not in ("auto", "nccl", "gloo"):
        raise ValueError(f"--dist-backend must be auto, nccl or gloo, got {choice!r}")
    if choice == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return choice


def setup_dist(rank: int, world_size: int, master_port: int | None = None, master_addr: str = "localhost",
               backend_choice: str = "auto", timeout_min: Optional[float] = None) -> None:
    """Join the process group (no-op for world_size 1); ``timeout_min``: the collective timeout."""
    if world_size <= 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", master_addr)
    if master_port is not None:
        os.environ.setdefault("MASTER_PORT", str(master_port))
    os.environ.setdefault("MASTER_PORT", "12354")
    name = backend(backend_choice)
    kwargs = {}
    if timeout_min is not None:
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_min)
    if torch.cuda.is_available() and name == "nccl":
        device = torch.device("cuda", local_rank_from_env(rank) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device  # binds the communicator to this GPU at once (no lazy init on cuda:0)
    dist.init_process_group(name, rank=rank, world_size=world_size, **kwargs)
    logging.debug("joined process group: rank %d of %d (%s)", rank, world_size, name)


def cleanup_dist() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank_from_env(rank) % torch.cuda.device_count())
    return torch.device("cpu")


def is_main(rank: int) -> bool:
    """The global rank 0 (not the first process of every node)."""
    return rank == 0


def exp_dir_is_shared(exp_dir) -> bool:
    """Whether every rank sees the same ``exp_dir`` (one file system), found by rank 0 creating a marker
    file there (collective; True without a process group). On node-local directories only global rank 0's
    node receives checkpoints."""
    import uuid
    from pathlib import Path

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    marker = Path(exp_dir) / f".shared-check-{broadcast_object(uuid.uuid4().hex)}"
    if dist.get_rank() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, marker.exists())
    if dist.get_rank() == 0:  # every rank has looked (all_gather returned)
        marker.unlink(missing_ok=True)
    return all(seen)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_replicas_in_sync(model, what: str = "trainable parameters") -> None:
    """Raise if the trainable parameters differ (bit-wise) between ranks; DDP must keep them equal.

    Compares a SHA-1 of every trainable tensor, so it costs one device-to-host copy of the
    trainable part (LoRA + projector) per call; the recipe calls it once per epoch.
    """
    import hashlib

    if not (dist.is_available() and dist.is_initialized()):
        return
    h = hashlib.sha1()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differ between ranks (sha1 per rank: {digests})")
    logging.info("%s identical on all %d ranks (sha1 %s)", what, len(digests), digests[0][:12])
