"""The seeds of the training batches' random transforms (SpecAugment, MUSAN mixing): each batch's a
function of (--seed, rank, epoch, batch index) alone (:func:`batch_seed`), applied around the batch with
the process's own random streams restored afterwards (:func:`seeded`)."""
from __future__ import annotations

import contextlib
import random
from typing import List, NamedTuple, Optional

import numpy as np
import torch
from lhotse import CutSet
from lhotse.utils import fix_random_seed


class SeededCuts(NamedTuple):
    """A training batch as :class:`ResumableSampler` hands it to :class:`AsrDataset`: the cuts and
    the seed of their random transforms (SpecAugment, MUSAN mixing)."""

    cuts: CutSet
    seed: int


def batch_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The seed of batch ``index`` (0-based, within the epoch) of ``epoch`` on ``rank``: a function
    of these alone, so a batch is augmented identically whichever worker makes it, with any
    --num-workers, and in a resumed run."""
    return int(np.random.SeedSequence([seed, rank, epoch, index]).generate_state(1)[0])


def cuda_rng_devices() -> List[int]:
    """The CUDA devices whose generators :func:`seeded` restores: every visible one once this process
    has initialised CUDA, since lhotse's fix_random_seed reseeds them all and the training process's
    dropout on the GPU draws from them. None before: saving a state would initialise CUDA, which a
    forked DataLoader worker cannot and a spawned one need not do (its CUDA generators are unused)."""
    if not torch.cuda.is_initialized():
        return []
    return list(range(torch.cuda.device_count()))


@contextlib.contextmanager
def seeded(seed: int, rng: Optional[random.Random]):
    """python/numpy/torch's global RNGs (and ``rng``) seeded with ``seed``; the global ones (CPU and
    CUDA) are restored afterwards: with --num-workers 0 the batch is made in the training process,
    whose own random stream (dropout) must not depend on the data loading."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=cuda_rng_devices(), device_type="cuda"):
        fix_random_seed(seed)
        if rng is not None:
            rng.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
