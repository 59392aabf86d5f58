"""Cut manifests -> PyTorch DataLoaders (icefall's asr_datamodule conventions).

Batches are dicts::

    {"features": (N, T, F) float32, padded with log(1e-10) (lhotse's LOG_EPSILON),
     "feature_lens": (N,) int64,
     "texts": list[str],      # supervision text as stored in the manifest
     "cut_ids": list[str]}

with the cuts of a batch ordered by decreasing duration (as lhotse's K2SpeechRecognitionDataset).
With several --feature-type entries (MoSE whose encoders have different front ends) batches also hold
``"features_by_type": {type: (features, feature_lens)}``, "features" being the first type's
(:class:`AsrDataset`, :func:`speech_inputs`).
``--feature-type firered`` batches are FireRedASR's own: ``feature_lens`` are its snip_edges frame
counts (``llmasr.features.firered.num_frames``, 2-3 fewer than the lhotse manifest's
round(duration / 10 ms)), the padding value is 0.0 (FireRedASR's, after CMVN) and T = max(feature_lens),
the same for stored and on-the-fly features.
Training/validation cuts go through :class:`CutFilter` (duration limits and an optional transcript
length limit, e.g. LLM tokens); every dropped cut is logged once with its id and reason and counted.
Test cuts are never filtered (a dropped test utterance would silently change the WER); only a cut
whose features hold NaN/inf leaves its test batch, listed in the batch's ``"dropped"`` entry (the
decode recipe reports it).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import logging
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset.sampling.base import TimeConstraint
from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
from lhotse.dataset import (
    CutMix,
    DynamicBucketingSampler,
    OnTheFlyFeatures,
    PrecomputedFeatures,
    SimpleCutSampler,
    SpecAugment,
)
from lhotse.utils import fastcopy, fix_random_seed
from torch.utils.data import DataLoader

from ..config import UserError, str2bool
from llmasr.data.corpus import SAMPLING_RATE, load_cuts_lazy
from llmasr.features import feature_type_arg, make_feature_extractor, split_feature_types, stored_feature_type




class CutFilter:
    """Keeps cuts with ``min_duration <= duration <= max_duration`` and, if ``text_len_fn`` is given,
    ``text_len_fn(text) <= max_text_len``. Dropped cuts are logged (once per id) and counted;
    :meth:`summary` gives the counts per reason. ``passed`` / ``passed_seconds`` count the cuts
    kept since :meth:`reset_counts` (the sampler reads every cut once per epoch). Picklable, so it
    can run in any process."""

    def __init__(
        self,
        min_duration: float = 0.0,
        max_duration: float = float("inf"),
        text_len_fn: Optional[Callable[[str], int]] = None,
        max_text_len: Optional[int] = None,
        name: str = "cuts",
    ):
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.text_len_fn = text_len_fn
        self.max_text_len = max_text_len
        self.name = name
        self.dropped: Dict[str, str] = {}  # cut id -> reason
        self.passed = 0
        self.passed_seconds = 0.0
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reason(self, cut: Cut) -> Optional[str]:
        if cut.duration < self.min_duration:
            return f"too short ({cut.duration:.2f} s < --min-duration {self.min_duration})"
        if cut.duration > self.max_duration:
            return f"too long ({cut.duration:.2f} s > --max-cut-duration {self.max_duration})"
        text = " ".join(s.text or "" for s in cut.supervisions)
        if not text.strip():
            return "empty transcript"
        if self.text_len_fn is not None and self.max_text_len is not None:
            n = self.text_len_fn(text)
            if n > self.max_text_len:
                return f"transcript too long ({n} tokens > --max-text-tokens {self.max_text_len})"
        return None

    def __call__(self, cut: Cut) -> bool:
        why = self.reason(cut)
        if why is None:
            with self._lock:
                self.passed += 1
                self.passed_seconds += cut.duration
            return True
        with self._lock:
            if cut.id not in self.dropped:
                self.dropped[cut.id] = why
                logging.warning(f"{self.name}: dropping cut {cut.id}: {why}")
        return False

    def summary(self) -> Dict[str, int]:
        return dict(Counter(r.split(" (")[0] for r in self.dropped.values()))

    def reset_counts(self) -> None:
        with self._lock:
            self.passed, self.passed_seconds = 0, 0.0


class AsrDataset(torch.utils.data.Dataset):
    """A lhotse-sampled CutSet -> one batch dict (see the module docstring).

    Every front end computes features of 16 kHz audio: on-the-fly features of other rates are
    computed from the audio resampled to 16 kHz (as lhotse/icefall recipes resample their corpora;
    logged once per process and rate), stored features computed from other rates are an error.
    Features with NaN/inf values are an error naming the cuts, or with ``drop_nonfinite`` (decoding)
    those cuts leave the batch and are listed in its ``"dropped"`` entry as ``(cut id, reason)``.

    ``more_feature_types`` ({feature type: input strategy}, heterogeneous MoSE): the batch also holds
    ``"features_by_type"`` = {type: (features, lens)} for ``feature_type`` and each of these, every type
    computed as a batch of that type alone would be (its padding, frame counts, input transforms); a
    cut whose features are NaN/inf in any type leaves all of them. Stored features of the further
    types come from the cuts themselves (:class:`FeatureJoin`)."""

    def __init__(self, input_strategy=None, cut_transforms: Sequence = (), input_transforms: Sequence = (),
                 feature_type: str = "fbank", drop_nonfinite: bool = False,
                 transform_rng: Optional[random.Random] = None, more_feature_types: Optional[Dict[str, object]] = None):
        self.input_strategy = input_strategy if input_strategy is not None else PrecomputedFeatures()
        self.cut_transforms = list(cut_transforms)
        self.input_transforms = list(input_transforms)
        self.feature_type = feature_type
        self.more_feature_types = dict(more_feature_types or {})
        if feature_type in self.more_feature_types:
            raise ValueError(f"feature type {feature_type} given twice")
        self.drop_nonfinite = drop_nonfinite
        self.transform_rng = transform_rng  # the cut transforms' own RNG (CutMix's): seeded per batch too

    def __getitem__(self, cuts: Union[CutSet, SeededCuts]) -> Dict[str, object]:
        if isinstance(cuts, SeededCuts):  # a training batch: its augmentation depends on its seed alone
            with _seeded(cuts.seed, self.transform_rng):
                return self[cuts.cuts]
        # Longest first: the first cut fixes the padded length (lhotse/icefall batch layout).
        cuts = cuts.sort_by_duration(ascending=False)
        for tfm in self.cut_transforms:
            cuts = tfm(cuts)
        cuts = cuts.sort_by_duration(ascending=False)
        stored = isinstance(self.input_strategy, PrecomputedFeatures)
        cuts = _at_16k(cuts, stored)
        strategies = {self.feature_type: self.input_strategy, **self.more_feature_types}
        # feature type -> (its cuts: the stored features of that type, its features, its lengths)
        by_type = {t: self._features(cuts, t, strategy, stored) for t, strategy in strategies.items()}
        hetero = len(by_type) > 1
        bad = sorted({i for _, f, lens in by_type.values() for i in _nonfinite_rows(f, lens)})
        dropped = []
        if bad:
            if not self.drop_nonfinite:
                where = [_with_source(list(c)[i]) + (f" [{t}]" if hetero else "")
                         for t, (c, f, lens) in by_type.items() for i in _nonfinite_rows(f, lens)]
                raise UserError(f"non-finite feature values (NaN/inf) in cut(s) "
                                f"{', '.join(where)}; find every such cut with "
                                f"local/validate_manifests.py and recompute or remove them")
            rows = list(cuts)
            dropped = [(rows[i].id, "non-finite feature values (NaN/inf)") for i in bad]
            keep = [i for i in range(len(rows)) if i not in bad]
            cuts = CutSet.from_cuts(rows[i] for i in keep)
            for t, (c, features, feature_lens) in by_type.items():
                feature_lens = feature_lens[keep]
                # the padded length of the batch without them (encoder outputs can depend on padding)
                by_type[t] = (c, features[keep, : int(feature_lens.max()) if keep else 0], feature_lens)
        out = {}
        for t, (_, features, feature_lens) in by_type.items():
            if self.input_transforms:
                segments = torch.stack(
                    [torch.arange(len(cuts)), torch.zeros(len(cuts), dtype=torch.int64), feature_lens], dim=1
                ).to(torch.int32)
                for tfm in self.input_transforms:
                    features = tfm(features, supervision_segments=segments)
                if t == "firered":  # whatever a transform wrote past the lengths
                    features = _pad_with(features, feature_lens, 0.0)
            out[t] = (features.to(torch.float32), feature_lens.to(torch.int64))
        batch = {
            "features": out[self.feature_type][0],
            "feature_lens": out[self.feature_type][1],
            "texts": [" ".join(s.text for s in c.supervisions) for c in cuts],
            "cut_ids": [c.id for c in cuts],
        }
        if hetero:
            batch["features_by_type"] = out
        if self.drop_nonfinite:
            batch["dropped"] = dropped
        return batch

    def _features(self, cuts: CutSet, feature_type: str, strategy, stored: bool):
        """(cuts carrying the stored ``feature_type`` features, features, lengths) of one feature type."""
        if stored and feature_type != self.feature_type:
            cuts = _at_16k(_with_joined_features(cuts, feature_type), stored)
        try:
            features, feature_lens = strategy(cuts)[:2]
        except Exception as e:
            broken = _explain_load_failure(cuts)
            if broken is None:  # every cut loads alone: not the data
                raise RuntimeError(f"cannot collate batch of cuts {[c.id for c in cuts][:5]}...: "
                                   f"{type(e).__name__}: {e}") from e
            raise UserError(broken) from e
        if feature_type == "firered":
            features, feature_lens = _firered_batch(cuts, features, feature_lens, stored=stored)
        return cuts, features, feature_lens


def _nonfinite_rows(features: torch.Tensor, lens: torch.Tensor) -> List[int]:
    if torch.isfinite(features).all():  # one cheap pass over the batch; the rows only when needed
        return []
    return [i for i, n in enumerate(lens.tolist()) if not torch.isfinite(features[i, :n]).all()]


# cut.custom key of the stored features of the further feature types ({type: lhotse Features})
JOINED_FEATURES = "llmasr_features_by_type"


class FeatureJoin:
    """Heterogeneous MoSE with stored features: each cut of the manifest ``source`` (features of type
    ``feature_type``) gets the features of the other types, found by cut id in ``manifests``
    ({type: manifest of the same part in that type's --manifest-dir}), in ``cut.custom[JOINED_FEATURES]``
    (a ``CutSet.map`` function; the indexes are read once). A cut missing from one of them, or features
    of another type than the manifest's, are a UserError naming the cut and the manifest."""

    def __init__(self, source: Path, feature_type: str, manifests: Dict[str, Path]):
        self.source, self.feature_type, self.manifests = Path(source), feature_type, dict(manifests)
        self.index = {t: _features_by_id(p, t) for t, p in self.manifests.items()}

    def __call__(self, cut: Cut) -> Cut:
        _check_stored_type(cut, getattr(cut, "features", None), self.feature_type, self.source)
        joined = {}
        for t, index in self.index.items():
            feats = index.get(cut.id)
            if feats is None:
                raise UserError(f"cut {cut.id} of {self.source} has no {t} features in {self.manifests[t]}: every "
                                f"--manifest-dir must hold the same cuts (local/prepare.sh --feature-type {t})")
            joined[t] = feats
        return cut.with_custom(JOINED_FEATURES, joined)


def _features_by_id(manifest: Path, feature_type: str) -> Dict[str, object]:
    index = {}
    for c in load_cuts_lazy(manifest) or ():
        feats = getattr(c, "features", None)
        if feats is not None:
            _check_stored_type(c, feats, feature_type, manifest)
            index[c.id] = feats
    return index


def _check_stored_type(cut: Cut, feats, feature_type: str, manifest: Path) -> None:
    if feats is None:
        raise UserError(f"cut {cut.id} of {manifest} has no stored features ({feature_type} expected); "
                        f"prepare it with local/prepare.sh --feature-type {feature_type} or use --on-the-fly-feats true")
    if stored_feature_type(feats.type) != feature_type:
        raise UserError(f"cut {cut.id} of {manifest} holds {feats.type!r} features, not {feature_type} ones: the "
                        f"--manifest-dir entries must follow the --feature-type entries")


def _with_joined_features(cuts: CutSet, feature_type: str) -> CutSet:
    """The cuts with their stored ``feature_type`` features in place of their own (see :class:`FeatureJoin`)."""
    out = []
    for c in cuts:
        feats = (getattr(c, "custom", None) or {}).get(JOINED_FEATURES, {}).get(feature_type)
        if feats is None:
            raise UserError(f"cut {c.id} has no stored {feature_type} features: load the cuts through AsrDataModule "
                            f"with one --manifest-dir per --feature-type entry, or use --on-the-fly-feats true")
        out.append(fastcopy(c, features=feats))
    return CutSet.from_cuts(out)


_RESAMPLING_LOGGED: set = set()  # sampling rates already reported by this process


def _at_16k(cuts: CutSet, stored: bool) -> CutSet:
    """Cuts whose features are those of 16 kHz audio: other rates are resampled for on-the-fly
    features; stored features of another rate are refused (they would be read as 16 kHz ones)."""
    if stored:
        for c in cuts:
            feats = getattr(c, "features", None)  # (MixedCut: the features of its tracks)
            if feats is not None and feats.sampling_rate != SAMPLING_RATE:
                raise UserError(f"cut {c.id}: its stored features ({feats.storage_path}) were computed from "
                                f"{feats.sampling_rate} Hz audio, the models take features of {SAMPLING_RATE} Hz audio: "
                                f"recompute them (local/compute_fbank.py resamples) or use --on-the-fly-feats true")
        return cuts
    other = [c for c in cuts if c.has_recording and c.sampling_rate != SAMPLING_RATE]
    if not other:
        return cuts
    for c in other:
        if c.sampling_rate not in _RESAMPLING_LOGGED:
            _RESAMPLING_LOGGED.add(c.sampling_rate)
            logging.warning(f"cut {c.id} is {c.sampling_rate} Hz audio: resampling it and every other "
                            f"{c.sampling_rate} Hz cut to {SAMPLING_RATE} Hz for the features")
    return CutSet.from_cuts(c.resample(SAMPLING_RATE) if c.has_recording and c.sampling_rate != SAMPLING_RATE
                            else c for c in cuts)


def _firered_batch(cuts: CutSet, features: torch.Tensor, lhotse_lens: torch.Tensor, stored: bool):
    """lhotse-collated FireRedASR features (rows up to round(duration / 10 ms), padded with anything)
    -> FireRedASR's batch: true frame counts, zero padding, T = max(feature_lens)."""
    from llmasr.features.firered import SAMPLE_RATE, check_length, num_frames

    lens = []
    for c, n in zip(cuts, lhotse_lens.tolist()):
        kind = getattr(getattr(c, "features", None), "type", "firered-fbank")  # MixedCut: no .features
        if stored and kind != "firered-fbank":
            raise UserError(f"cut {c.id}: --feature-type firered but its stored features are "
                             f"{kind!r} ({c.features.storage_path}); prepare the manifests with "
                             f"local/prepare.sh --feature-type firered or use --on-the-fly-feats true")
        t = num_frames(round(c.duration * SAMPLE_RATE))
        check_length(t, f"cut {c.id}")
        if t > n:
            raise UserError(f"cut {c.id}: {n} feature frames, fewer than FireRedASR's {t} for "
                             f"{c.duration} s")
        lens.append(t)
    lens = torch.tensor(lens, dtype=torch.int64)
    return _pad_with(features[:, : int(lens.max())], lens, 0.0), lens


def _pad_with(features: torch.Tensor, lens: torch.Tensor, value: float) -> torch.Tensor:
    beyond = torch.arange(features.size(1))[None, :] >= lens[:, None]
    return features.masked_fill(beyond[:, :, None], value)


def _with_source(c: Cut) -> str:
    feats = getattr(c, "features", None)
    return f"{c.id} ({feats.storage_path}, key {feats.storage_key})" if feats is not None else c.id


def _explain_load_failure(cuts: CutSet) -> Optional[str]:
    """Name the first cut whose features/audio cannot be loaded, with its file (None: all load)."""
    for c in cuts:
        try:
            c.load_features() if c.has_features else c.load_audio()
        except Exception as e:  # the first broken cut
            src = c.features.storage_path if c.has_features else (
                c.recording.sources[0].source if c.has_recording else "?")
            key = f", key {c.features.storage_key}" if c.has_features else ""
            return (f"cannot load {'features' if c.has_features else 'audio'} of cut {c.id} from {src}{key}: "
                    f"{type(e).__name__}: {e}")
    return None


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


@contextlib.contextmanager
def _seeded(seed: int, rng: Optional[random.Random]):
    """python/numpy/torch's global RNGs (and ``rng``) seeded with ``seed``; the global ones are
    restored afterwards: with --num-workers 0 the batch is made in the training process, whose
    own random stream (dropout) must not depend on the data loading."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        fix_random_seed(seed)
        if rng is not None:
            rng.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


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
                 shar_sources: Sequence["SharShards"] = ()):
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


def _shar_sources(obj) -> Iterator[SharShards]:
    """The :class:`SharShards` a (filtered, muxed, mapped...) CutSet reads from."""
    if isinstance(obj, SharShards):
        yield obj
    elif isinstance(obj, CutSet):
        yield from _shar_sources(obj.data)
    else:
        for inner in [getattr(obj, "iterator", None), *getattr(obj, "iterators", ())]:
            if inner is not None:
                yield from _shar_sources(inner)


class AsrDataModule:
    """icefall-style data module. ``text_len_fn``/``max_text_len`` (e.g. the LLM tokenizer's token
    count and the room left in the context) drop training/validation cuts whose transcript would
    not fit."""

    def __init__(
        self,
        args: argparse.Namespace,
        text_len_fn: Optional[Callable[[str], int]] = None,
        max_text_len: Optional[int] = None,
    ):
        self.args = args
        self.text_len_fn = text_len_fn
        self.max_text_len = max_text_len
        self.filters: Dict[str, CutFilter] = {}
        # The feature types of the batches (several: heterogeneous MoSE); the first is the batches'
        # "features", and its --manifest-dir holds the cuts that are loaded.
        entries = split_feature_types(getattr(args, "feature_type", "fbank"))
        self.feature_types: List[str] = list(dict.fromkeys(entries))
        self.manifest_dirs: Dict[str, Path] = _manifest_dir_per_type(getattr(args, "manifest_dir", "data/fbank"),
                                                                     entries)
        self.manifest_dir = self.manifest_dirs[self.feature_types[0]]
        self._joins: Dict[Path, FeatureJoin] = {}
        if len(self.feature_types) > 1 and not getattr(args, "on_the_fly_feats", False):
            if len(set(self.manifest_dirs.values())) < len(self.feature_types):
                raise UserError(f"--feature-type {args.feature_type} with stored features needs one --manifest-dir per "
                                f"entry (e.g. data/fbank,data/fbank_whisper80,data/fbank_firered from local/prepare.sh "
                                f"--feature-type fbank|whisper|firered), or --on-the-fly-feats true")
            if getattr(args, "enable_musan", False):
                raise UserError("--enable-musan mixes noise into stored features of one type: with several "
                                "--feature-type entries use --on-the-fly-feats true (noise mixed into the audio)")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(title="Data", description="lhotse manifests, sampling, batching")
        group.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"),
                           help="directory with <prefix>_cuts_<part>.jsonl.gz; with several --feature-type entries "
                                "and stored features one directory per entry, comma-separated (the cuts of each part "
                                "are those of the first; the other types' features are joined by cut id)")
        group.add_argument("--dataset-prefix", type=str, default="librispeech",
                           help="manifest prefix: librispeech, aishell, or the --name of a Kaldi corpus")
        group.add_argument("--train-cuts", type=str, default="train-all-shuf",
                           help="part name, manifest path, or comma-separated 'name_or_path[:weight]' "
                                "entries multiplexed with CutSet.mux; an entry may be lhotse Shar data (a directory "
                                "of cuts.NNNNNN.jsonl.gz + features/recording.NNNNNN.tar shards from "
                                "local/export_shar.py, or a *.shar.json list of shard paths/URLs): each rank then "
                                "reads its own shards")
        group.add_argument("--dev-cuts", type=str, default=None,
                           help="comma-separated parts/paths (default: dev-clean,dev-other that exist for "
                                "librispeech, else dev)")
        group.add_argument("--max-duration", type=float, default=200.0,
                           help="maximum total seconds of audio in a batch")
        group.add_argument("--bucketing-sampler", type=str2bool, default=True,
                           help="DynamicBucketingSampler (batches of similar durations) instead of SimpleCutSampler")
        group.add_argument("--num-buckets", type=int, default=30, help="buckets of the training sampler")
        group.add_argument("--sampler-buffer-size", type=int, default=None,
                           help="cuts held in the buckets of the training sampler (lhotse buffer_size; more: "
                                "better shuffling and fuller batches, more memory); default 2000 * --num-buckets")
        group.add_argument("--quadratic-duration", type=float, default=None,
                           help="training bucketing sampler: count a cut of d seconds as d + d^2 / this in "
                                "--max-duration (lhotse's; 15-40 evens out the compute of attention models)")
        group.add_argument("--test-num-buckets", type=int, default=10,
                           help="buckets of the decoding sampler (10: lhotse's default, the batches of the "
                                "icefall/SpeechLLM decode scripts; a small test set decodes in bigger batches with 1-2)")
        group.add_argument("--strict-max-duration", type=str2bool, default=True,
                           help="training batches never exceed --max-duration (sizes each batch by the upper "
                                "edge of its duration bucket); false: lhotse's budget, which the last cut of a "
                                "batch may overshoot (icefall's exact batches)")
        group.add_argument("--shuffle", type=str2bool, default=True, help="shuffle training cuts every epoch")
        group.add_argument("--shuffle-shards", type=str2bool, default=True,
                           help="Shar training data: shuffle the shard order every epoch (seeded by --seed and the "
                                "epoch); false reads the shards in order, so one process gets the batches of the "
                                "same cuts as a manifest")
        group.add_argument("--drop-last", type=str2bool, default=True, help="drop the last incomplete batch")
        group.add_argument("--num-workers", type=int, default=2, help="dataloader worker processes")
        group.add_argument("--on-the-fly-feats", type=str2bool, default=False,
                           help="compute features from audio at run time (same extractor as local/prepare.sh)")
        group.add_argument("--feature-type", type=feature_type_arg, default="fbank",
                           help="fbank, whisper or firered: extractor for --on-the-fly-feats; firered also for "
                                "stored FireRedASR features (its frame counts, padding 0.0). MoSE whose encoders take "
                                "different features: one entry per encoder, e.g. fbank,whisper,firered (batches then "
                                "also hold features_by_type)")
        group.add_argument("--firered-cmvn", type=str, default=None,
                           help="cmvn.ark of a FireRedASR model, for --feature-type firered")
        group.add_argument("--num-mel-bins", type=int, default=80,
                           help="80, or 128 for Whisper large-v3 (with several --feature-type entries: the Whisper "
                                "features' bins; fbank and firered ones are 80-dim)")
        group.add_argument("--enable-spec-aug", type=str2bool, default=True, help="SpecAugment (training only)")
        group.add_argument("--spec-aug-time-warp-factor", type=int, default=80,
                           help="SpecAugment time warp factor; < 1 disables time warping")
        group.add_argument("--enable-musan", type=str2bool, default=False,
                           help="mix MUSAN noise (<manifest-dir>/musan_cuts.jsonl.gz) into training cuts")
        group.add_argument("--min-duration", type=float, default=0.5,
                           help="drop training/validation cuts shorter than this (seconds)")
        group.add_argument("--max-cut-duration", type=float, default=30.0,
                           help="drop training/validation cuts longer than this (seconds)")
        group.add_argument("--max-text-tokens", type=int, default=400,
                           help="drop training/validation cuts whose transcript has more LLM tokens (30 s of "
                                "speech is ~100-250; a longer transcript is a misaligned one); 0: no limit")
        if "--seed" not in parser._option_string_actions:  # the training script may define it
            group.add_argument("--seed", type=int, default=42, help="random seed")

    # ---------------------------------------------------------------------------------------
    # Cut sets
    # ---------------------------------------------------------------------------------------
    def cuts_path(self, name: Union[str, Path]) -> Path:
        """A part name (``test-clean`` -> ``<manifest-dir>/<prefix>_cuts_test-clean.jsonl.gz``),
        a file name inside ``--manifest-dir`` or a path."""
        name = str(name)
        if name.endswith((".jsonl.gz", ".jsonl", ".json")):
            p = Path(name)
            if not p.is_file() and not p.is_absolute() and (self.manifest_dir / p).is_file():
                p = self.manifest_dir / p
        else:
            p = self.manifest_dir / f"{self.args.dataset_prefix}_cuts_{name}.jsonl.gz"
        if not p.is_file():
            raise FileNotFoundError(f"cut manifest not found: {p} (check --manifest-dir/--dataset-prefix, "
                                    f"or run local/prepare.sh)")
        return p

    def load_cuts(self, names: Union[str, Sequence[str]]) -> CutSet:
        """One or more part names/paths, concatenated lazily."""
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        sets = [self._load(self.cuts_path(n.strip())) for n in names]
        return _concat(sets)

    def train_cuts(self, name: Optional[str] = None) -> CutSet:
        spec = name or self.args.train_cuts
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        if len(entries) == 1 and not _has_weight(entries[0]):
            return self._train_entry(entries[0])
        names, weights = zip(*(_split_weight(e) for e in entries))
        logging.info(f"training cuts: mux of {list(names)} with weights {list(weights)}")
        sets = [self._train_entry(n) for n in names]
        if len({any(True for _ in _shar_sources(c)) for c in sets}) > 1:
            raise UserError(f"--train-cuts {spec} mixes Shar data and cut manifests: each rank reads its own "
                            f"Shar shards but every cut of a manifest; export the manifests too (local/export_shar.py)")
        return mux(sets, weights=list(weights), seed=self.args.seed)

    def _train_entry(self, name: str) -> CutSet:
        """One --train-cuts entry: a part name or manifest path, or Shar data (:func:`shar_fields`)."""
        fields = shar_fields(name)
        if fields is None and not Path(name).is_absolute():
            fields = shar_fields(self.manifest_dir / name)
        if fields is None:
            logging.info(f"training cuts: {self.cuts_path(name)}")
            return self._load(self.cuts_path(name))
        if len(self.feature_types) > 1 and not self.args.on_the_fly_feats:
            raise UserError(f"Shar data {name}: several --feature-type entries with stored features join manifests "
                            f"by cut id, which Shar data cannot; use --on-the-fly-feats true (export the audio)")
        shards = SharShards(fields, name, getattr(self.args, "shuffle_shards", True), self.args.seed)
        logging.info(f"training cuts: Shar data {name}, {shards.num_shards} shards of {sorted(fields)}")
        return CutSet(shards)

    def dev_cuts(self, names: Optional[str] = None) -> CutSet:
        names = names or self.args.dev_cuts
        if names is None:
            candidates = ["dev-clean", "dev-other"] if self.args.dataset_prefix == "librispeech" else ["dev"]
            names = [n for n in candidates if self._exists(n)]
            if not names:
                raise FileNotFoundError(f"no dev cuts {candidates} for prefix {self.args.dataset_prefix} "
                                        f"in {self.args.manifest_dir}; pass --dev-cuts")
        return self.load_cuts(names)

    def test_cuts(self, name: str) -> CutSet:
        return self._load(self.cuts_path(name))

    def _load(self, path: Path) -> Optional[CutSet]:
        """The cuts of one manifest (lazily); with stored features of several types each cut also
        gets the other types' features, from the manifests of the same name in their --manifest-dir
        (:class:`FeatureJoin`)."""
        cuts = load_cuts_lazy(path)
        if cuts is None or len(self.feature_types) == 1 or self.args.on_the_fly_feats:
            return cuts
        join = self._joins.get(path)
        if join is None:
            manifests = {}
            for t in self.feature_types[1:]:
                manifests[t] = self.manifest_dirs[t] / path.name
                if not manifests[t].is_file():
                    raise FileNotFoundError(f"cut manifest not found: {manifests[t]} (the {t} features of {path}; "
                                            f"check --manifest-dir/--feature-type, or run local/prepare.sh "
                                            f"--feature-type {t})")
            join = self._joins[path] = FeatureJoin(path, self.feature_types[0], manifests)
        return cuts.map(join)

    def _exists(self, name: str) -> bool:
        try:
            self.cuts_path(name)
            return True
        except FileNotFoundError:
            return False

    def filter_cuts(self, cuts: CutSet, name: str) -> CutSet:
        """Lazily drop cuts outside the duration limits / over the text limit (logged, counted in
        ``self.filters[name].summary()``)."""
        f = self.filters.get(name)
        if f is None:  # one filter per name: every loader of it counts, and logs a dropped cut, once
            f = CutFilter(self.args.min_duration, self.args.max_cut_duration, self.text_len_fn,
                          self.max_text_len, name=name)
            self.filters[name] = f
        return cuts.filter(f)

    def epoch_summary(self, name: str, kept_cuts: int, kept_batches: int) -> str:
        """One log line on what the ``name`` filter and the sampler made of the cuts in the epoch
        just finished: ``kept_cuts`` / ``kept_batches`` are the sampler's (summed over ranks);
        the filter counts must have been reset (:meth:`CutFilter.reset_counts`) at the epoch's start."""
        f = self.filters[name]
        dropped = f.summary()
        text = f"{name}: {f.passed} cuts ({f.passed_seconds / 3600:.2f} h) passed the filters"
        if dropped:
            text += f" ({len(f.dropped)} dropped: {', '.join(f'{k}: {v}' for k, v in sorted(dropped.items()))})"
        text += f"; the sampler made {kept_batches} batches of {kept_cuts} cuts"
        left_out = f.passed - kept_cuts
        if left_out > 0:
            text += (f"; {left_out} cuts ({100.0 * left_out / max(f.passed, 1):.1f}%) were left out"
                     + (" by --drop-last (incomplete batches)" if self.args.drop_last else ""))
        return text

    def explain_empty_epoch(self, name: str = "train") -> str:
        """Why an epoch gave no batch, from the ``name`` filter's counts of that epoch."""
        args, f = self.args, self.filters[name]
        if f.passed == 0:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(f.summary().items())) or "the cut set is empty"
            return (f"no {name} cut passed the filters ({reasons}); check --min-duration {args.min_duration}, "
                    f"--max-cut-duration {args.max_cut_duration} and --max-text-tokens {args.max_text_tokens}")
        have = f"{f.passed} cuts, {f.passed_seconds:.0f} s of audio"
        if args.drop_last and args.bucketing_sampler:
            return (f"{have}; with --num-buckets {args.num_buckets} and --max-duration {args.max_duration} no "
                    f"bucket fills a batch and --drop-last drops them: lower --num-buckets or --max-duration "
                    f"or set --drop-last false")
        if args.drop_last:
            return (f"{have}; no batch of --max-duration {args.max_duration} s fills up and --drop-last drops "
                    f"the incomplete one: lower --max-duration or set --drop-last false")
        return f"{have} passed the filters, yet the sampler made no batch (--max-duration {args.max_duration})"

    # ---------------------------------------------------------------------------------------
    # DataLoaders
    # ---------------------------------------------------------------------------------------
    def _input_strategy(self, feature_type: Optional[str] = None):
        if self.args.on_the_fly_feats:
            feature_type = feature_type or self.feature_types[0]
            # several types: --num-mel-bins is the Whisper features' (fbank, firered: 80)
            bins = self.args.num_mel_bins if len(self.feature_types) == 1 or feature_type == "whisper" else 80
            cmvn = getattr(self.args, "firered_cmvn", None)
            return OnTheFlyFeatures(make_feature_extractor(feature_type, bins, cmvn))
        return PrecomputedFeatures()

    def _feature_options(self) -> Dict[str, object]:
        """AsrDataset's feature type options: the batches' feature type(s) and how to get them."""
        return dict(feature_type=self.feature_types[0],
                    more_feature_types={t: self._input_strategy(t) for t in self.feature_types[1:]})

    def train_dataloader(
        self,
        cuts: CutSet,
        sampler_state_dict: Optional[Dict] = None,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        sync_ranks: bool = True,
    ) -> DataLoader:
        """Training loader (a :class:`TrainLoader` over a :class:`ResumableSampler`);
        ``world_size``/``rank`` default to torch.distributed's. Save ``loader.sampler.state_dict()``
        in checkpoints and pass it back to resume mid-epoch: the resumed batches and their
        augmentation are those of an uninterrupted run, for any --num-workers.

        Shar data (:class:`SharShards`): each rank's sampler batches the cuts of its own shards (a lhotse
        sampler of world size 1) and, with ``sync_ranks`` and a process group, the ranks end each epoch
        together (:class:`TrainLoader`); a mid-epoch resume re-reads the rank's shards up to its position."""
        from lhotse.dataset.dataloading import get_rank, get_world_size

        shar = list(_shar_sources(cuts))
        global_rank = get_rank() if rank is None else rank
        global_world_size = get_world_size() if world_size is None else world_size
        if shar:
            for source in shar:
                source.rank, source.world_size = global_rank, global_world_size
            rank, world_size = 0, 1  # the shards are this rank's already
        args = self.args
        if args.quadratic_duration is not None and not args.bucketing_sampler:
            raise UserError("--quadratic-duration needs --bucketing-sampler true")
        cuts = self.filter_cuts(cuts, "train")
        cut_transforms = []
        mix_rng = random.Random(args.seed)
        if args.enable_musan:
            musan = load_cuts_lazy(self.cuts_path("musan_cuts.jsonl.gz")).to_eager()
            cut_transforms.append(CutMix(cuts=musan, p=0.5, snr=(10, 20), preserve_id=True, seed=mix_rng))
        input_transforms = []
        if args.enable_spec_aug:
            input_transforms.append(SpecAugment(time_warp_factor=args.spec_aug_time_warp_factor,
                                                num_frame_masks=10, features_mask_size=27,
                                                num_feature_masks=2, frames_mask_size=100))
        dataset = AsrDataset(self._input_strategy(), cut_transforms, input_transforms,
                             transform_rng=mix_rng, **self._feature_options())
        buffer_size = args.sampler_buffer_size or args.num_buckets * 2000
        # lhotse's bucketing needs at least two buckets: a one-cut corpus gets the plain sampler.
        bucketing = args.bucketing_sampler and _num_buckets(cuts, args.num_buckets, "train") > 1
        if bucketing and args.strict_max_duration:
            if args.max_cut_duration > args.max_duration:
                logging.warning(f"--max-cut-duration {args.max_cut_duration} > --max-duration {args.max_duration}: "
                                f"a single cut can exceed the batch budget")
            sampler = StrictDynamicBucketingSampler(
                cuts, max_duration=args.max_duration, ceiling=args.max_cut_duration,
                num_buckets=_num_buckets(cuts, args.num_buckets, "train"), shuffle=args.shuffle,
                buffer_size=buffer_size, quadratic_duration=args.quadratic_duration, drop_last=args.drop_last,
                world_size=world_size, rank=rank, seed=args.seed,
            )
        elif bucketing:
            sampler = DynamicBucketingSampler(
                cuts, max_duration=args.max_duration, shuffle=args.shuffle,
                num_buckets=_num_buckets(cuts, args.num_buckets, "train"),
                buffer_size=buffer_size, quadratic_duration=args.quadratic_duration,
                drop_last=args.drop_last, world_size=world_size, rank=rank, seed=args.seed,
            )
        else:
            sampler = SimpleCutSampler(cuts, max_duration=args.max_duration, shuffle=args.shuffle,
                                       drop_last=args.drop_last, world_size=world_size, rank=rank,
                                       seed=args.seed)
        sampler = ResumableSampler(sampler, args.seed, rank=global_rank, world_size=global_world_size,
                                   shar_sources=shar)
        if sampler_state_dict is not None:
            logging.info("loading the training sampler state")
            sampler.load_state_dict(sampler_state_dict)
        # Its own generator: creating an iterator draws the workers' base seed, which must not come
        # from the training process's RNG (a resumed run creates one more iterator than an
        # uninterrupted one, whose persistent workers serve every epoch).
        loader = TrainLoader(dataset, sampler=sampler, batch_size=None, num_workers=args.num_workers,
                             persistent_workers=args.num_workers > 0,
                             generator=torch.Generator().manual_seed(args.seed))
        loader.sync_ranks = bool(shar) and sync_ranks and global_world_size > 1
        return loader

    def valid_dataloader(self, cuts: CutSet, world_size: Optional[int] = None,
                         rank: Optional[int] = None) -> DataLoader:
        cuts = self.filter_cuts(cuts, "valid")
        num_buckets = _num_buckets(cuts, 10, "valid")
        if num_buckets == 1:  # lhotse's bucketing needs >= 2 buckets (a one-cut dev set)
            sampler = SimpleCutSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                       world_size=world_size, rank=rank)
        else:
            sampler = DynamicBucketingSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                              num_buckets=num_buckets, world_size=world_size, rank=rank)
        dataset = AsrDataset(self._input_strategy(), **self._feature_options())
        return DataLoader(dataset, sampler=sampler, batch_size=None,
                          num_workers=min(2, self.args.num_workers), persistent_workers=False)

    def test_dataloader(self, cuts: CutSet) -> DataLoader:
        """No shuffling, no filtering: lhotse DynamicBucketingSampler(max_duration, shuffle=False)
        with ``--test-num-buckets`` buckets, by default lhotse's 10, as icefall/SpeechLLM decode
        scripts (same batches, so results that depend on padding are reproducible). Sets with fewer
        cuts than buckets use one bucket per cut (lhotse cannot estimate more buckets than cuts)."""
        wanted = getattr(self.args, "test_num_buckets", 10)
        if wanted < 1:
            raise UserError(f"--test-num-buckets must be >= 1, got {wanted}")
        num_buckets = _num_buckets(cuts, wanted, "test")
        if num_buckets == 1:  # lhotse's bucketing needs >= 2 buckets; one bucket is the plain sampler
            sampler = SimpleCutSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                       world_size=1, rank=0)
        else:
            sampler = DynamicBucketingSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                              num_buckets=num_buckets, world_size=1, rank=0)
        # a cut with NaN/inf features must not stop a decode: it leaves its batch, named in "dropped"
        dataset = AsrDataset(self._input_strategy(), drop_nonfinite=True, **self._feature_options())
        return DataLoader(dataset, sampler=sampler, batch_size=None,
                          num_workers=self.args.num_workers)


def _manifest_dir_per_type(manifest_dir, feature_types: Sequence[str]) -> Dict[str, Path]:
    """--manifest-dir: one directory, or one per --feature-type entry (comma-separated)."""
    dirs = [Path(d.strip()) for d in str(manifest_dir).split(",") if d.strip()]
    if len(dirs) == 1:
        return {t: dirs[0] for t in feature_types}
    if len(dirs) != len(feature_types):
        raise UserError(f"--manifest-dir lists {len(dirs)} directories for {len(feature_types)} --feature-type "
                        f"entries ({','.join(feature_types)}): give one directory, or one per entry")
    out: Dict[str, Path] = {}
    for t, d in zip(feature_types, dirs):
        if out.setdefault(t, d) != d:
            raise UserError(f"--manifest-dir gives two directories for the {t} features: {out[t]} and {d}")
    return out


def speech_inputs(batch: Dict[str, object], device, non_blocking: bool = False):
    """``(features, feature_lens, extra)`` of a batch on ``device``: ``extra`` is
    ``{"features_by_type": {type: (features, lens)}}`` for batches of several feature types
    (heterogeneous MoSE) and empty otherwise - keyword arguments of SpeechLLM.forward/encode/decode."""
    features = batch["features"].to(device, non_blocking=non_blocking)
    feature_lens = batch["feature_lens"].to(device, non_blocking=non_blocking)
    extra = {}
    if "features_by_type" in batch:
        extra["features_by_type"] = {
            t: (f.to(device, non_blocking=non_blocking), n.to(device, non_blocking=non_blocking))
            for t, (f, n) in batch["features_by_type"].items()
        }
    return features, feature_lens, extra


def _num_buckets(cuts: CutSet, wanted: int, name: str) -> int:
    """``wanted``, or the number of cuts when there are fewer (lhotse cannot estimate more buckets
    than cuts); only the first ``wanted`` cuts are read."""
    n = sum(1 for _ in itertools.islice(iter(cuts), wanted))
    if n == 0:
        raise UserError(f"{name}: no cuts left (after filtering) - nothing to load")
    if n < wanted:
        logging.info(f"{name}: only {n} cuts, using {n} buckets instead of {wanted}")
    return min(n, wanted)


def _concat(sets: Sequence[CutSet]) -> CutSet:
    out = sets[0]
    for s in sets[1:]:
        out = out + s
    return out


def _has_weight(entry: str) -> bool:
    return ":" in entry and _is_float(entry.rsplit(":", 1)[1])


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _split_weight(entry: str):
    if _has_weight(entry):
        name, w = entry.rsplit(":", 1)
        return name, float(w)
    return entry, 1.0


def mux(cut_sets: Sequence[CutSet], weights: Optional[Sequence[float]] = None, seed: int = 0,
        stop_early: bool = False) -> CutSet:
    """Lazily interleave several corpora: at every step the next cut comes from corpus ``i`` with
    probability proportional to ``weights[i]`` (lhotse ``CutSet.mux``; uniform by default). With
    ``stop_early`` the mix ends when the first corpus is exhausted, otherwise when all are."""
    if weights is not None and len(weights) != len(cut_sets):
        raise UserError(f"{len(cut_sets)} cut sets but {len(weights)} weights")
    if weights is not None and any(w <= 0 for w in weights):
        raise UserError(f"mux weights must be positive, got {list(weights)}")
    return CutSet.mux(*cut_sets, weights=list(weights) if weights is not None else None,
                      stop_early=stop_early, seed=seed)
