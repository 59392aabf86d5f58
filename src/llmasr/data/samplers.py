"""The samplers: the one lhotse sampler every loader is built on (:func:`make_sampler`), a bucketing
sampler whose batches never exceed their budget, and the resumable training sampler and loader."""
from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler
from lhotse.dataset.sampling.base import TimeConstraint
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from torch.utils.data import DataLoader

from llmasr.config import UserError
from llmasr.data.seeding import SeededCuts, batch_seed

if TYPE_CHECKING:
    from llmasr.data.shar import SharShards


def make_sampler(cuts: CutSet, name: str, max_duration: float, num_buckets: int, *, bucketing: bool = True,
                 strict_ceiling: Optional[float] = None, shuffle: bool = False, drop_last: bool = False,
                 buffer_size: Optional[int] = None, quadratic_duration: Optional[float] = None,
                 world_size: Optional[int] = None, rank: Optional[int] = None, seed: int = 0):
    """The lhotse sampler of the ``name`` loader (train, valid, test): batches of at most ``max_duration``
    seconds of audio from a DynamicBucketingSampler over ``num_buckets`` buckets (fewer for a set of
    fewer cuts), a :class:`StrictDynamicBucketingSampler` for cuts up to ``strict_ceiling`` seconds when
    that is given, and lhotse's SimpleCutSampler without ``bucketing`` or with one bucket (lhotse's
    bucketing needs at least two). ``buffer_size`` None: lhotse's default; ``world_size``/``rank`` None:
    torch.distributed's. With ``bucketing`` an empty set is a UserError naming ``name``."""
    buckets = _num_buckets(cuts, num_buckets, name) if bucketing else 1
    common = dict(max_duration=max_duration, shuffle=shuffle, drop_last=drop_last, world_size=world_size,
                  rank=rank, seed=seed)
    if buckets == 1:
        return SimpleCutSampler(cuts, **common)
    bucketed = dict(common, num_buckets=buckets, quadratic_duration=quadratic_duration)
    if buffer_size is not None:
        bucketed["buffer_size"] = buffer_size
    if strict_ceiling is None:
        return DynamicBucketingSampler(cuts, **bucketed)
    if strict_ceiling > max_duration:
        logging.warning(f"--max-cut-duration {strict_ceiling} > --max-duration {max_duration}: "
                        f"a single cut can exceed the batch budget")
    return StrictDynamicBucketingSampler(cuts, ceiling=strict_ceiling, **bucketed)


def _num_buckets(cuts: CutSet, wanted: int, name: str) -> int:
    """``wanted``, or the number of cuts when there are fewer (lhotse cannot estimate more buckets
    than cuts); only the first ``wanted`` cuts are read."""
    n = sum(1 for _ in itertools.islice(iter(cuts), wanted))
    if n == 0:
        raise UserError(f"{name}: no cuts left (after filtering) - nothing to load")
    if n < wanted:
        logging.info(f"{name}: only {n} cuts, using {n} buckets instead of {wanted}")
    return min(n, wanted)


@dataclass
class BucketCappedTimeConstraint(TimeConstraint):
    """lhotse's TimeConstraint checks the budget *after* adding a cut, so a batch can end up to one
    cut over ``max_duration``. This one assumes that the next cut is as long as the upper edge of
    the current bucket (every cut of a bucket is at most that long), so the total duration of a
    batch never exceeds ``max_duration`` (for cuts up to ``ceiling`` seconds, the upper edge of
    the last bucket)."""

    duration_bins: Tuple[float, ...] = ()
    ceiling: float = float("inf")
    cap: float = 0.0

    def add(self, example: Cut) -> None:
        super().add(example)
        d = self.measure_length(example)
        i = bisect.bisect_left(self.duration_bins, d)  # lhotse's bucket index for d
        upper = self.duration_bins[i] if i < len(self.duration_bins) else max(self.ceiling, d)
        self.cap = max(self.cap, self._maybe_apply_quadratic_correction(upper))  # (as the budget counts)

    def close_to_exceeding(self) -> bool:
        if self.max_cuts is not None and self.num_cuts >= self.max_cuts:
            return True
        return self.max_duration is not None and (self.num_cuts + 1) * self.cap > self.max_duration

    def reset(self) -> None:
        super().reset()
        self.cap = 0.0


class StrictDynamicBucketingSampler(DynamicBucketingSampler):
    """DynamicBucketingSampler whose batches never exceed ``max_duration`` seconds of audio
    (see :class:`BucketCappedTimeConstraint`)."""

    def __init__(self, cuts, max_duration: float, ceiling: float, num_buckets: int = 10,
                 num_cuts_for_bins_estimate: int = 10000, quadratic_duration: Optional[float] = None, **kwargs):
        bins = estimate_duration_buckets(itertools.islice(iter(cuts), num_cuts_for_bins_estimate),
                                         num_buckets=num_buckets)
        constraint = BucketCappedTimeConstraint(max_duration=max_duration, duration_bins=tuple(bins),
                                                ceiling=ceiling, quadratic_duration=quadratic_duration)
        super().__init__(cuts, constraint=constraint, duration_bins=list(bins),
                         num_cuts_for_bins_estimate=num_cuts_for_bins_estimate, **kwargs)


class ResumableSampler(torch.utils.data.Sampler):
    """The training sampler: a lhotse sampler (its batches are a function of --seed and the epoch)
    yielding :class:`SeededCuts`, with a state that is exact for any --num-workers.

    The DataLoader draws ``num_workers * prefetch_factor`` batches ahead of training, so the lhotse
    sampler's own position (its ``state_dict``) is ahead of what was trained. The position here is
    counted by :class:`TrainLoader` as it hands batches out: (epoch, batches handed out, cut ids of
    the last one). :meth:`load_state_dict` re-creates the epoch and iterates the lhotse sampler past
    that many batches (cut manifests only: no features are read); the last batch's cut ids check
    that the data and the sampler options are those of the checkpoint.

    ``rank``/``world_size``: the process's global ones when they are not the lhotse sampler's (Shar
    shards read per rank: each rank's sampler is a world of one, see :class:`SharShards`); the epoch is
    also passed on to the Shar sources, whose shard order it sets."""

    def __init__(self, sampler, seed: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                 shar_sources: Sequence[SharShards] = ()):
        self.sampler = sampler
        self.seed = seed
        self.rank = sampler.rank if rank is None else rank
        self.world_size = sampler.world_size if world_size is None else world_size
        self.shar_sources = list(shar_sources)
        self.epoch = 0
        self.position = 0  # batches of this epoch handed out by the loader
        self.last_cut_ids: List[str] = []
        self._resumed = None  # (lhotse sampler iterated up to the resumed position, that position)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resumed = None
        self.epoch = epoch
        for source in self.shar_sources:
            source.set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[SeededCuts]:
        # Lazy: a DataLoader with workers calls iter() twice as it starts and draws from the second.
        return self._batches()

    def _batches(self) -> Iterator[SeededCuts]:
        it, index = self._resumed or (iter(self.sampler), 0)
        self._resumed = None
        self.position = index
        while True:
            try:
                cuts = next(it)
            except StopIteration:
                return
            yield SeededCuts(cuts, batch_seed(self.seed, self.rank, self.epoch, index))
            index += 1

    def handed_out(self, cut_ids: Sequence[str]) -> None:
        self.position += 1
        self.last_cut_ids = sorted(cut_ids)

    def state_dict(self) -> Dict:
        return {"epoch": self.epoch, "batches": self.position, "last_cut_ids": list(self.last_cut_ids),
                "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: Dict) -> None:
        """Continue after the batches ``state`` counts; raises UserError if they cannot be the same."""
        missing = {"epoch", "batches", "last_cut_ids", "world_size"} - set(state)
        if missing:
            raise UserError(f"the sampler state has no {sorted(missing)} (an older checkpoint?): it cannot "
                            f"resume in the middle of an epoch; resume from an epoch-N.pt with --start-epoch")
        if state["world_size"] != self.world_size:
            raise UserError(f"the sampler state is of {state['world_size']} ranks, this run has "
                            f"{self.world_size}: resume in the middle of an epoch with as many processes")
        self.set_epoch(state["epoch"])
        it, last = iter(self.sampler), None
        for i in range(state["batches"]):
            last = next(it, None)
            if last is None:
                raise UserError(f"epoch {state['epoch']} has {i} batches, the sampler state says "
                                f"{state['batches']} were trained: the training cuts or sampler options changed")
        if last is not None and sorted(c.id for c in last) != state["last_cut_ids"]:
            raise UserError(f"batch {state['batches']} of epoch {state['epoch']} now holds cuts "
                            f"{sorted(c.id for c in last)[:3]}..., the trained one held "
                            f"{state['last_cut_ids'][:3]}...: the training cuts or sampler options "
                            f"(--max-duration, --num-buckets, --seed, ...) changed")
        self._resumed = (it, state["batches"])
        self.position, self.last_cut_ids = state["batches"], list(state["last_cut_ids"])


class TrainLoader(DataLoader):
    """The training DataLoader: tells its :class:`ResumableSampler` which batches it hands out, so
    that ``loader.sampler.state_dict()`` is the position of training, not of the prefetching workers.

    ``sync_ranks`` (each rank reads its own Shar shards, so the ranks' epochs differ in length): before
    handing out a batch the ranks agree that every one of them has one, and the epoch ends for all at
    the shortest rank (DDP/DeepSpeed steps are collective; lhotse's samplers end a manifest epoch at a
    round all ranks fill in the same way). Every rank must then draw its batches in lockstep."""

    sync_ranks = False

    def __iter__(self):
        return self._counted(super().__iter__())

    def _counted(self, batches):
        while True:
            batch = next(batches, None)
            if self.sync_ranks and not _every_rank_has(batch is not None):
                return
            if batch is None:
                return
            self.sampler.handed_out(batch["cut_ids"])
            yield batch


_SYNC_GROUP = None  # a gloo group for the CPU flag of TrainLoader.sync_ranks (the default one may be NCCL)


def _every_rank_has(flag: bool) -> bool:
    global _SYNC_GROUP
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if _SYNC_GROUP is None:
        default_is_gloo = torch.distributed.get_backend() == "gloo"
        _SYNC_GROUP = torch.distributed.group.WORLD if default_is_gloo else torch.distributed.new_group(backend="gloo")
    t = torch.tensor([int(flag)], dtype=torch.int32)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=_SYNC_GROUP)
    return bool(t.item())
