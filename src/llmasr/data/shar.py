"""lhotse Shar training data read per rank (:class:`SharShards`): which shards an entry of --train-cuts
holds (:func:`shar_fields`) and which of them a rank reads in an epoch."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

from lhotse import CutSet

from llmasr.config import UserError


# lhotse Shar shard files: <field>.<6-digit shard>.<ext> (or <field>.<ext> when written unsharded)
_SHAR_FILE = re.compile(r"([A-Za-z0-9_]+)(?:\.(\d+))?\.(jsonl\.gz|jsonl|tar\.gz|tar)")


def shar_fields(entry: Union[str, Path]) -> Optional[Dict[str, List[str]]]:
    """The shards of a lhotse Shar data set, ``{field: [shard, ...]}`` (``cuts`` and e.g. ``features``,
    ``recording``) as ``CutSet.from_shar(fields=...)`` takes them, or None if ``entry`` is not one: a
    directory written by ``CutSet.to_shar`` (local/export_shar.py), or a ``*.shar.json`` file holding such
    a dict whose shards may be paths relative to the file, URLs or ``pipe:`` commands (shards on other
    disks or servers)."""
    path = Path(entry)
    if str(entry).endswith(".shar.json") and path.is_file():
        try:
            fields = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not a JSON file ({e})") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("cuts"), list):
            raise UserError(f"{path}: expected a JSON object {{\"cuts\": [shard, ...], \"features\": [...], ...}}")
        fields = {k: [v if "://" in v or v.startswith("pipe:") or Path(v).is_absolute() else str(path.parent / v)
                      for v in vs] for k, vs in fields.items()}
    elif path.is_dir():
        fields = {}
        for f in sorted(path.iterdir()):
            m = _SHAR_FILE.fullmatch(f.name)
            if m:
                fields.setdefault(m.group(1), []).append(str(f))
        if "cuts" not in fields:
            return None
    else:
        return None
    counts = {k: len(v) for k, v in fields.items()}
    if len(set(counts.values())) != 1:
        raise UserError(f"Shar data {entry}: every field needs one file per shard, found {counts}")
    return fields


class SharShards:
    """The cuts of this rank's Shar shards (lazy, a CutSet source): each epoch the shards are ordered
    (shuffled with ``seed + epoch`` if ``shuffle``, the same order on every rank) and rank ``r`` of ``W``
    reads shards ``r, r + W, ...`` of that order, as lhotse's ``from_shar(split_for_dataloading=True,
    shuffle_shards=True)``. Unlike lhotse's reader, whose shard order follows a counter of completed
    iterations, the order is a function of the epoch (:meth:`set_epoch`, called by :class:`ResumableSampler`):
    an epoch cut short (the ranks stop at the shortest, --drop-last) or a resumed run sees the same shards.
    ``rank``/``world_size`` default to torch.distributed's (or RANK/WORLD_SIZE)."""

    def __init__(self, fields: Dict[str, List[str]], name: str, shuffle: bool, seed: int,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        self.fields, self.name, self.shuffle, self.seed = fields, name, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    @property
    def num_shards(self) -> int:
        return len(self.fields["cuts"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def my_shards(self) -> List[int]:
        from lhotse.dataset.dataloading import get_rank, get_world_size

        rank = get_rank() if self.rank is None else self.rank
        world_size = get_world_size() if self.world_size is None else self.world_size
        if self.num_shards < world_size:
            raise UserError(f"Shar data {self.name} has {self.num_shards} shards for {world_size} ranks (each reads "
                            f"its own): export it with a smaller --shard-size (local/export_shar.py)")
        order = list(range(self.num_shards))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order[rank::world_size]

    def __iter__(self):
        from lhotse.shar import LazySharIterator

        mine = self.my_shards()
        return iter(LazySharIterator(fields={k: [v[i] for i in mine] for k, v in self.fields.items()}))


def shar_sources(obj) -> Iterator[SharShards]:
    """The :class:`SharShards` a (filtered, muxed, mapped...) CutSet reads from."""
    if isinstance(obj, SharShards):
        yield obj
    elif isinstance(obj, CutSet):
        yield from shar_sources(obj.data)
    else:
        for inner in [getattr(obj, "iterator", None), *getattr(obj, "iterators", ())]:
            if inner is not None:
                yield from shar_sources(inner)
