"""Distributed setup: ``--world-size N`` (spawns N processes) or an external launcher.

Three ways to run, all ending in ``run(rank, world_size, args)``:

- ``--world-size 1``: a single process, no process group.
- ``--world-size N``: icefall style, N processes spawned with torch.multiprocessing on this machine,
  rendezvous on ``localhost:--master-port``.
- ``torchrun`` / ``deepspeed`` launchers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT come
  from the environment; ``--world-size`` is ignored.

The backend is NCCL when CUDA is available and gloo otherwise (CPU training / tests).

Several machines: one launcher per node, e.g. ``torchrun --nnodes 2 --node-rank K --nproc-per-node 8
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB`` (README "Scaling out"). ``rank`` is then
the GLOBAL rank (RANK): it picks the sampler's share, the log file and the one process (global rank 0)
that writes checkpoints and tensorboard logs; LOCAL_RANK (0 on the first process of every node) only
picks the GPU.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["launch", "setup_dist", "cleanup_dist", "get_device", "launched_externally", "is_main",
           "exp_dir_is_shared"]


def launched_externally() -> bool:
    """True under torchrun / deepspeed (they export RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank_from_env(default: int) -> int:
    return int(os.environ.get("LOCAL_RANK", default))


def launch(run: Callable, args) -> None:
    """Call ``run(rank, world_size, args)`` once per process."""
    if launched_externally():
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    world_size = int(args.world_size)
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    if world_size == 1:
        run(0, 1, args)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"--world-size {world_size} but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    mp.spawn(run, args=(world_size, args), nprocs=world_size, join=True)


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_dist(rank: int, world_size: int, master_port: int | None = None, master_addr: str = "localhost") -> None:
    """Join the process group (no-op for world_size 1)."""
    if world_size <= 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", master_addr)
    if master_port is not None:
        os.environ.setdefault("MASTER_PORT", str(master_port))
    os.environ.setdefault("MASTER_PORT", "12354")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank_from_env(rank))
    dist.init_process_group(backend(), rank=rank, world_size=world_size)
    logging.debug("joined process group: rank %d of %d (%s)", rank, world_size, backend())


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
