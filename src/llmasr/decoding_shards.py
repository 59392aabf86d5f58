"""Decoding at scale: every rank of ``torchrun --nproc-per-node N`` decodes a disjoint share of each
test set (balanced by duration), and every rank keeps what it finished in a partial file so that a
killed decode started again with the same command decodes only what is left (whole batches of the
one-process plan: a batch of which any cut is missing from the partial files is decoded again).

Splitting (:func:`shard_batches`): the ranks share the batches of the one-process decode (the test
dataloader's sampler, over the whole set), not cuts: every rank then runs exactly the computations a
single process would, so the result files are byte-identical whatever the model's floating-point
sensitivity to batch shapes, and also with ``--compat-reference-padding`` (results that depend on the
batch by design). Batches are taken longest first (ties by position) and each goes to the rank with
the least audio so far (ties: the lowest rank), :func:`balance_by_duration`; the split depends only on
the batches and the world size, so every rank computes the same one without talking to the others, and
the shares' totals end within the longest batch of each other. :func:`shard_cuts` is the same split at
the level of cuts (for callers that batch each share themselves, e.g. transcription).

Partial files (:class:`PartialResults`): ``<decode dir>/.partial/<set>-rank<R>.jsonl``, a header line
``{"fingerprint": ...}`` (the checkpoint files, the options and the manifest: see
:func:`fingerprint`), then one JSON line per finished cut, ``{"id", "ref", "hyp"}``, or ``{"id",
"dropped"}`` for a cut the dataloader dropped (non-finite features). Each batch's lines are appended,
flushed and fsync'ed together, so a kill loses at most the batch in flight; a torn last line is
ignored (and cut off before the file is appended to again). Rank 0 reads the files of every rank
(any earlier world size) whose header has this decode's fingerprint, so a restart with another
number of ranks resumes too; a file with another fingerprint (other weights, options or manifest) is
removed, never used.

The files of a finished set are kept until every test set of the decode has its result files (so a
decode of several sets killed in a later set does not decode the finished ones again), then removed
(:func:`remove_partials`): the decode dir holds icefall's files only, and rerunning a finished decode
decodes again, as it always did. ``--resume false`` removes them first and decodes from scratch.

Gathering (:meth:`PartialResults.gather`): rank 0 receives every rank's new results with
``gather_object`` (no shared file system needed for that; resuming does need one, or the same node)
and writes the result files; a rank whose decode raised sends its error instead, and every rank then
stops with a message naming it (a rank that died outright is reported by torchrun, or ends the others
at the ``--dist-timeout-min`` collective timeout).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.distributed as dist

from llmasr.config import UserError

__all__ = ["DecodeShard", "PartialResults", "balance_by_duration", "fingerprint", "pending_batches", "remove_partials",
           "shard_batches", "shard_cuts", "world_from_env"]

PARTIAL_DIR = ".partial"
Gathered = Tuple[List[Tuple[str, Any, Any]], List[Tuple[str, str]]]  # (results, dropped cuts) of a test set


def balance_by_duration(items: Sequence[Tuple[str, float]], world_size: int) -> List[List[str]]:
    """Split ``(cut id, duration)`` items over ``world_size`` ranks: longest first (ties by id), each into
    the rank with the least total so far (ties: the lowest rank). Returns the ids of each rank in
    the order of ``items``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owner: Dict[str, int] = {}
    for cut_id, duration in sorted(items, key=lambda it: (-it[1], it[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[cut_id] = rank
        load[rank] += duration
    shares: List[List[str]] = [[] for _ in range(world_size)]
    for cut_id, _ in items:
        shares[owner[cut_id]].append(cut_id)
    return shares


def shard_cuts(cuts, rank: int, world_size: int, log_shares: bool = False):
    """The share of rank ``rank`` of ``world_size`` of a lhotse CutSet (:func:`balance_by_duration`),
    in the manifest's order; ``cuts`` itself for one rank. ``log_shares``: log every rank's share
    (cuts, seconds)."""
    if world_size == 1 and not log_shares:
        return cuts
    durations = {c.id: float(c.duration) for c in cuts}
    shares = balance_by_duration(list(durations.items()), world_size)
    if log_shares:
        for r, ids in enumerate(shares):
            logging.info(f"rank {r} of {world_size}: {len(ids)} cuts, {sum(durations[i] for i in ids):.1f} s")
    if world_size == 1:
        return cuts
    mine = set(shares[rank])

    def in_share(c) -> bool:
        return c.id in mine

    return cuts.filter(in_share)


def shard_batches(batches: Sequence, rank: int, world_size: int, log_shares: bool = False) -> List:
    """The batches (lhotse CutSets, in the order given) that rank ``rank`` decodes: whole batches of
    the one-process plan, balanced by their audio (:func:`balance_by_duration`). Every rank then runs
    exactly the computations of a one-process decode, so the results are the same bit for bit,
    whatever the model's numerics (and with --compat-reference-padding, whose results depend on the
    batch). ``log_shares``: log every rank's share (batches, cuts, seconds)."""
    durations = [(str(i), float(sum(c.duration for c in b))) for i, b in enumerate(batches)]
    shares = balance_by_duration(durations, world_size)
    if log_shares:
        for r, ids in enumerate(shares):
            picked = [batches[int(i)] for i in ids]
            logging.info(f"rank {r} of {world_size}: {len(picked)} batches, {sum(len(b) for b in picked)} cuts, "
                         f"{sum(durations[int(i)][1] for i in ids):.1f} s")
    return [batches[int(i)] for i in shares[rank]]


def pending_batches(batches: Sequence, done: set) -> List:
    """The batches with a cut that ``done`` (the ids in the partial files) does not hold."""
    return [b for b in batches if any(c.id not in done for c in b)]


def remove_partials(decode_dir, set_names: Iterable[str]) -> None:
    """Remove the partial files of these sets (every rank's), and the directory once empty."""
    root = Path(decode_dir) / PARTIAL_DIR
    for name in set_names:
        for path in root.glob(f"{name}-rank*.jsonl"):
            path.unlink()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) of a torchrun process; (0, 1, 0) when not launched by one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    return 0, 1, 0


def fingerprint(obj: Any) -> str:
    """SHA-1 of ``obj`` as sorted JSON (non-JSON values as ``str``): what a partial file must match."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path) -> List[Any]:
    """(name, size, mtime in ns) of a file: changes when the file is rewritten, costs no reading."""
    st = Path(path).stat()
    return [Path(path).name, st.st_size, st.st_mtime_ns]


class DecodeShard:
    """This process's place in a decode: rank, world size, and whether partial files resume it."""

    def __init__(self, rank: int = 0, world_size: int = 1, resume: bool = True):
        self.rank, self.world_size, self.resume = rank, world_size, resume

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def partial(self, decode_dir: Path, set_name: str, fp: str) -> "PartialResults":
        return PartialResults(decode_dir, set_name, fp, self)

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, obj, error: Optional[BaseException] = None, what: str = "on its share") -> Optional[List]:
        """Rank 0: every rank's ``obj`` in rank order; other ranks: None. Collective; if any rank
        passes an ``error``, every rank raises one naming that rank (no rank is left waiting)."""
        mine = {"obj": obj, "error": None if error is None else f"{type(error).__name__}: {error}"}
        parts = [mine]
        if self.world_size > 1:
            parts = [None] * self.world_size if self.is_main else None
            dist.gather_object(mine, parts, dst=0)
            failed = self.broadcast(next(((r, p["error"]) for r, p in enumerate(parts) if p["error"]), None)
                                    if self.is_main else None)
            if failed:
                rank, message = failed
                if error is not None and rank == self.rank:
                    raise error
                raise UserError(f"rank {rank} of {self.world_size} failed {what} (this rank {self.rank} stops "
                                f"too): {message}")
        if error is not None:
            raise error
        return [p["obj"] for p in parts] if self.is_main else None


class PartialResults:
    """The partial files of one test set in one decode dir (see the module docstring)."""

    def __init__(self, decode_dir: Path, set_name: str, fp: str, shard: DecodeShard):
        self.dir = Path(decode_dir) / PARTIAL_DIR
        self.set_name, self.fp, self.shard = set_name, fp, shard
        self.path = self.dir / f"{set_name}-rank{shard.rank}.jsonl"
        self.results: Dict[str, Tuple[Any, Any]] = {}  # rank 0: what earlier runs finished
        self.dropped: Dict[str, str] = {}
        self._pending: List[str] = []
        self._file = None

    def _files(self) -> List[Path]:
        return sorted(self.dir.glob(f"{self.set_name}-rank*.jsonl"))

    def load(self) -> set:
        """Rank 0 reads (or with ``--resume false`` removes) every rank's files; every rank gets
        the set of finished cut ids (collective)."""
        done = None
        if self.shard.is_main:
            for path in self._files():
                if not self.shard.resume or not self._read(path):
                    path.unlink()
            done = set(self.results) | set(self.dropped)
            if done:
                logging.info(f"{self.set_name}: {len(done)} cuts already decoded (partial files in {self.dir})")
        return self.shard.broadcast(done)

    def _read(self, path: Path) -> bool:
        """Add ``path``'s records; False when it belongs to another decode (fingerprint)."""
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("fingerprint") != self.fp:
            logging.warning(f"{path}: written for other weights, options or test set; not used, removed")
            return False
        torn = 0
        for line in lines[1:-1]:  # (the last: "" after the final newline, or a torn line)
            try:
                rec = json.loads(line)
                cut_id = rec["id"]
                if "dropped" in rec:
                    self.dropped[cut_id] = rec["dropped"]
                else:
                    self.results[cut_id] = (rec["ref"], rec["hyp"])
            except (ValueError, KeyError, TypeError):
                torn += 1
        if lines[-1] or torn:
            logging.warning(f"{path}: {torn + bool(lines[-1])} incomplete line(s) ignored (a killed decode)")
        return True

    def open(self) -> None:
        """Open this rank's file for appending, a torn last line cut off, a header written when new."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                os.truncate(self.path, keep)
            self._file = open(self.path, "a", encoding="utf-8")
            if keep == 0:  # (not even the header survived)
                self._write([json.dumps({"fingerprint": self.fp, "set": self.set_name})])
        else:
            self._file = open(self.path, "a", encoding="utf-8")
            self._write([json.dumps({"fingerprint": self.fp, "set": self.set_name})])

    def add(self, cut_id: str, ref, hyp) -> None:
        self._pending.append(json.dumps({"id": cut_id, "ref": ref, "hyp": hyp}, ensure_ascii=False))

    def commit(self, dropped: Iterable[Tuple[str, str]] = ()) -> None:
        """Append the results added since the last commit (and the batch's dropped cuts), durably."""
        lines = self._pending + [json.dumps({"id": i, "dropped": r}, ensure_ascii=False) for i, r in dropped]
        self._pending = []
        if lines:
            self._write(lines)

    def _write(self, lines: List[str]) -> None:
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def gather(self, results: List[Tuple[str, Any, Any]], dropped: List[Tuple[str, str]],
               error: Optional[BaseException] = None) -> Optional[Gathered]:
        """Rank 0: (all results, all dropped cuts) of the set, earlier runs' included; other ranks:
        None. Collective; if any rank passes an ``error``, every rank raises one naming it."""
        self.close()
        parts = self.shard.gather_to_main({"results": results, "dropped": dropped}, error,
                                          what=f"decoding {self.set_name}")
        if parts is None:
            return None
        # (a batch decoded again - one of its cuts was missing - replaces what earlier runs kept of it)
        merged, all_dropped = dict(self.results), dict(self.dropped)
        for p in parts:
            for cut_id, ref, hyp in p["results"]:
                merged[cut_id] = (ref, hyp)
                all_dropped.pop(cut_id, None)
            for cut_id, reason in p["dropped"]:
                all_dropped[cut_id] = reason
                merged.pop(cut_id, None)
        return [(cut_id, ref, hyp) for cut_id, (ref, hyp) in merged.items()], list(all_dropped.items())
