"""Cut manifests -> PyTorch DataLoaders (icefall's asr_datamodule conventions).

Batches are dicts::

    {"features": (N, T, F) float32, padded with log(1e-10) (lhotse's LOG_EPSILON),
     "feature_lens": (N,) int64,
     "texts": list[str],      # supervision text as stored in the manifest
     "cut_ids": list[str]}

with the cuts of a batch ordered by decreasing duration (as lhotse's K2SpeechRecognitionDataset).
``--feature-type firered`` batches are FireRedASR's own: ``feature_lens`` are its snip_edges frame
counts (``llmasr.features.firered.num_frames``, 2-3 fewer than the lhotse manifest's
round(duration / 10 ms)), the padding value is 0.0 (FireRedASR's, after CMVN) and T = max(feature_lens),
the same for stored and on-the-fly features.
Training/validation cuts go through :class:`CutFilter` (duration limits and an optional transcript
length limit, e.g. LLM tokens); every dropped cut is logged once with its id and reason and counted.
Test cuts are never filtered (a dropped test utterance would silently change the WER).
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from lhotse import CutSet, load_manifest_lazy
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
from lhotse.utils import fix_random_seed
from torch.utils.data import DataLoader

from ..config import str2bool
from llmasr.features import FEATURE_TYPES, make_feature_extractor




class CutFilter:
    """Keeps cuts with ``min_duration <= duration <= max_duration`` and, if ``text_len_fn`` is given,
    ``text_len_fn(text) <= max_text_len``. Dropped cuts are logged (once per id) and counted;
    :meth:`summary` gives the counts per reason. Picklable, so it can run in any process."""

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
                return f"transcript too long ({n} > {self.max_text_len} tokens)"
        return None

    def __call__(self, cut: Cut) -> bool:
        why = self.reason(cut)
        if why is None:
            return True
        with self._lock:
            if cut.id not in self.dropped:
                self.dropped[cut.id] = why
                logging.warning(f"{self.name}: dropping cut {cut.id}: {why}")
        return False

    def summary(self) -> Dict[str, int]:
        return dict(Counter(r.split(" (")[0] for r in self.dropped.values()))


class AsrDataset(torch.utils.data.Dataset):
    """A lhotse-sampled CutSet -> one batch dict (see the module docstring)."""

    def __init__(self, input_strategy=None, cut_transforms: Sequence = (), input_transforms: Sequence = (),
                 feature_type: str = "fbank"):
        self.input_strategy = input_strategy if input_strategy is not None else PrecomputedFeatures()
        self.cut_transforms = list(cut_transforms)
        self.input_transforms = list(input_transforms)
        self.firered = feature_type == "firered"

    def __getitem__(self, cuts: CutSet) -> Dict[str, object]:
        # Longest first: the first cut fixes the padded length (lhotse/icefall batch layout).
        cuts = cuts.sort_by_duration(ascending=False)
        for tfm in self.cut_transforms:
            cuts = tfm(cuts)
        cuts = cuts.sort_by_duration(ascending=False)
        try:
            features, feature_lens = self.input_strategy(cuts)[:2]
        except Exception as e:
            raise RuntimeError(_explain_load_failure(cuts, e)) from e
        if self.firered:
            features, feature_lens = _firered_batch(
                cuts, features, feature_lens, stored=isinstance(self.input_strategy, PrecomputedFeatures))
        if self.input_transforms:
            segments = torch.stack(
                [torch.arange(len(cuts)), torch.zeros(len(cuts), dtype=torch.int64), feature_lens], dim=1
            ).to(torch.int32)
            for tfm in self.input_transforms:
                features = tfm(features, supervision_segments=segments)
            if self.firered:  # whatever a transform wrote past the lengths
                features = _pad_with(features, feature_lens, 0.0)
        return {
            "features": features.to(torch.float32),
            "feature_lens": feature_lens.to(torch.int64),
            "texts": [" ".join(s.text for s in c.supervisions) for c in cuts],
            "cut_ids": [c.id for c in cuts],
        }


def _firered_batch(cuts: CutSet, features: torch.Tensor, lhotse_lens: torch.Tensor, stored: bool):
    """lhotse-collated FireRedASR features (rows up to round(duration / 10 ms), padded with anything)
    -> FireRedASR's batch: true frame counts, zero padding, T = max(feature_lens)."""
    from llmasr.features.firered import SAMPLE_RATE, check_length, num_frames

    lens = []
    for c, n in zip(cuts, lhotse_lens.tolist()):
        kind = getattr(getattr(c, "features", None), "type", "firered-fbank")  # MixedCut: no .features
        if stored and kind != "firered-fbank":
            raise ValueError(f"cut {c.id}: --feature-type firered but its stored features are "
                             f"{kind!r} ({c.features.storage_path}); prepare the manifests with "
                             f"local/prepare.sh --feature-type firered or use --on-the-fly-feats true")
        t = num_frames(round(c.duration * SAMPLE_RATE))
        check_length(t, f"cut {c.id}")
        if t > n:
            raise ValueError(f"cut {c.id}: {n} feature frames, fewer than FireRedASR's {t} for "
                             f"{c.duration} s")
        lens.append(t)
    lens = torch.tensor(lens, dtype=torch.int64)
    return _pad_with(features[:, : int(lens.max())], lens, 0.0), lens


def _pad_with(features: torch.Tensor, lens: torch.Tensor, value: float) -> torch.Tensor:
    beyond = torch.arange(features.size(1))[None, :] >= lens[:, None]
    return features.masked_fill(beyond[:, :, None], value)


def _explain_load_failure(cuts: CutSet, err: Exception) -> str:
    """Find the cut whose features/audio cannot be loaded and name it with its file."""
    for c in cuts:
        try:
            c.load_features() if c.has_features else c.load_audio()
        except Exception as e:  # the first broken cut
            src = c.features.storage_path if c.has_features else (
                c.recording.sources[0].source if c.has_recording else "?")
            key = f", key {c.features.storage_key}" if c.has_features else ""
            return f"cannot load {'features' if c.has_features else 'audio'} of cut {c.id} from {src}{key}: {e}"
    return f"cannot collate batch of cuts {[c.id for c in cuts][:5]}...: {err}"


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
        self.cap = max(self.cap, upper)

    def close_to_exceeding(self) -> bool:
        if self.max_cuts is not None and self.num_cuts >= self.max_cuts:
            return True
        return self.max_duration is not None and (self.num_cuts + 1) * self.cap > self.max_duration

    def reset(self) -> None:
        super().reset()
        self.cap = 0.0


class StrictDynamicBucketingSampler(DynamicBucketingSampler):
    """DynamicBucketingSampler whose batches never exceed ``max_duration`` seconds of audio
    (see :class:`BucketCappedTimeConstraint`), with lhotse's exact-resume ``state_dict``."""

    def __init__(self, cuts, max_duration: float, ceiling: float, num_buckets: int = 10,
                 num_cuts_for_bins_estimate: int = 10000, **kwargs):
        bins = estimate_duration_buckets(itertools.islice(iter(cuts), num_cuts_for_bins_estimate),
                                         num_buckets=num_buckets)
        constraint = BucketCappedTimeConstraint(max_duration=max_duration, duration_bins=tuple(bins),
                                                ceiling=ceiling)
        super().__init__(cuts, constraint=constraint, duration_bins=list(bins),
                         num_cuts_for_bins_estimate=num_cuts_for_bins_estimate, **kwargs)

    def state_dict(self) -> Dict:
        # lhotse refuses state_dict() with a custom constraint only because it cannot rebuild
        # one; ours is rebuilt by __init__ from the same arguments, so the rest of the state is
        # all that resuming needs.
        constraint, self.constraint = self.constraint, None
        try:
            return super().state_dict()
        finally:
            self.constraint = constraint


class _SeedWorkers:
    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, worker_id: int):
        fix_random_seed(self.seed + worker_id)


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

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(title="Data", description="lhotse manifests, sampling, batching")
        group.add_argument("--manifest-dir", type=Path, default=Path("data/fbank"),
                           help="directory with <prefix>_cuts_<part>.jsonl.gz")
        group.add_argument("--dataset-prefix", type=str, default="librispeech",
                           help="manifest prefix: librispeech, aishell, or the --name of a Kaldi corpus")
        group.add_argument("--train-cuts", type=str, default="train-all-shuf",
                           help="part name, manifest path, or comma-separated 'name_or_path[:weight]' "
                                "entries multiplexed with CutSet.mux")
        group.add_argument("--dev-cuts", type=str, default=None,
                           help="comma-separated parts/paths (default: dev-clean,dev-other that exist for "
                                "librispeech, else dev)")
        group.add_argument("--max-duration", type=float, default=200.0,
                           help="maximum total seconds of audio in a batch")
        group.add_argument("--bucketing-sampler", type=str2bool, default=True,
                           help="DynamicBucketingSampler (batches of similar durations) instead of SimpleCutSampler")
        group.add_argument("--num-buckets", type=int, default=30, help="buckets of the training sampler")
        group.add_argument("--test-num-buckets", type=int, default=10,
                           help="buckets of the decoding sampler (10: lhotse's default, the batches of the "
                                "icefall/SpeechLLM decode scripts; a small test set decodes in bigger batches with 1-2)")
        group.add_argument("--strict-max-duration", type=str2bool, default=True,
                           help="training batches never exceed --max-duration (sizes each batch by the upper "
                                "edge of its duration bucket); false: lhotse's budget, which the last cut of a "
                                "batch may overshoot (icefall's exact batches)")
        group.add_argument("--shuffle", type=str2bool, default=True, help="shuffle training cuts every epoch")
        group.add_argument("--drop-last", type=str2bool, default=True, help="drop the last incomplete batch")
        group.add_argument("--num-workers", type=int, default=2, help="dataloader worker processes")
        group.add_argument("--on-the-fly-feats", type=str2bool, default=False,
                           help="compute features from audio at run time (same extractor as local/prepare.sh)")
        group.add_argument("--feature-type", type=str, default="fbank", choices=list(FEATURE_TYPES),
                           help="extractor for --on-the-fly-feats; firered also for stored FireRedASR "
                                "features (its frame counts, padding 0.0)")
        group.add_argument("--firered-cmvn", type=str, default=None,
                           help="cmvn.ark of a FireRedASR model, for --feature-type firered")
        group.add_argument("--num-mel-bins", type=int, default=80, help="80, or 128 for Whisper large-v3")
        group.add_argument("--enable-spec-aug", type=str2bool, default=True, help="SpecAugment (training only)")
        group.add_argument("--spec-aug-time-warp-factor", type=int, default=80,
                           help="SpecAugment time warp factor; < 1 disables time warping")
        group.add_argument("--enable-musan", type=str2bool, default=False,
                           help="mix MUSAN noise (<manifest-dir>/musan_cuts.jsonl.gz) into training cuts")
        group.add_argument("--min-duration", type=float, default=0.5,
                           help="drop training/validation cuts shorter than this (seconds)")
        group.add_argument("--max-cut-duration", type=float, default=30.0,
                           help="drop training/validation cuts longer than this (seconds)")
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
            if not p.is_file() and not p.is_absolute() and (Path(self.args.manifest_dir) / p).is_file():
                p = Path(self.args.manifest_dir) / p
        else:
            p = Path(self.args.manifest_dir) / f"{self.args.dataset_prefix}_cuts_{name}.jsonl.gz"
        if not p.is_file():
            raise FileNotFoundError(f"cut manifest not found: {p} (check --manifest-dir/--dataset-prefix, "
                                    f"or run local/prepare.sh)")
        return p

    def load_cuts(self, names: Union[str, Sequence[str]]) -> CutSet:
        """One or more part names/paths, concatenated lazily."""
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        sets = [load_manifest_lazy(self.cuts_path(n.strip())) for n in names]
        return _concat(sets)

    def train_cuts(self, name: Optional[str] = None) -> CutSet:
        spec = name or self.args.train_cuts
        entries = [e.strip() for e in spec.split(",") if e.strip()]
        if len(entries) == 1 and not _has_weight(entries[0]):
            logging.info(f"training cuts: {self.cuts_path(entries[0])}")
            return load_manifest_lazy(self.cuts_path(entries[0]))
        names, weights = zip(*(_split_weight(e) for e in entries))
        logging.info(f"training cuts: mux of {list(names)} with weights {list(weights)}")
        return mux([load_manifest_lazy(self.cuts_path(n)) for n in names], weights=list(weights),
                   seed=self.args.seed)

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
        return load_manifest_lazy(self.cuts_path(name))

    def _exists(self, name: str) -> bool:
        try:
            self.cuts_path(name)
            return True
        except FileNotFoundError:
            return False

    def filter_cuts(self, cuts: CutSet, name: str) -> CutSet:
        """Lazily drop cuts outside the duration limits / over the text limit (logged, counted in
        ``self.filters[name].summary()``)."""
        f = CutFilter(self.args.min_duration, self.args.max_cut_duration, self.text_len_fn,
                      self.max_text_len, name=name)
        self.filters[name] = f
        return cuts.filter(f)

    # ---------------------------------------------------------------------------------------
    # DataLoaders
    # ---------------------------------------------------------------------------------------
    def _input_strategy(self):
        if self.args.on_the_fly_feats:
            return OnTheFlyFeatures(make_feature_extractor(self.args.feature_type, self.args.num_mel_bins,
                                                           getattr(self.args, "firered_cmvn", None)))
        return PrecomputedFeatures()

    def train_dataloader(
        self,
        cuts: CutSet,
        sampler_state_dict: Optional[Dict] = None,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> DataLoader:
        """Training loader; ``world_size``/``rank`` default to torch.distributed's. Save
        ``loader.sampler.state_dict()`` in checkpoints and pass it back to resume mid-epoch."""
        args = self.args
        cuts = self.filter_cuts(cuts, "train")
        cut_transforms = []
        if args.enable_musan:
            musan = load_manifest_lazy(self.cuts_path("musan_cuts.jsonl.gz")).to_eager()
            cut_transforms.append(CutMix(cuts=musan, p=0.5, snr=(10, 20), preserve_id=True))
        input_transforms = []
        if args.enable_spec_aug:
            input_transforms.append(SpecAugment(time_warp_factor=args.spec_aug_time_warp_factor,
                                                num_frame_masks=10, features_mask_size=27,
                                                num_feature_masks=2, frames_mask_size=100))
        dataset = AsrDataset(self._input_strategy(), cut_transforms, input_transforms,
                             feature_type=args.feature_type)
        if args.bucketing_sampler and args.strict_max_duration:
            if args.max_cut_duration > args.max_duration:
                logging.warning(f"--max-cut-duration {args.max_cut_duration} > --max-duration {args.max_duration}: "
                                f"a single cut can exceed the batch budget")
            sampler = StrictDynamicBucketingSampler(
                cuts, max_duration=args.max_duration, ceiling=args.max_cut_duration,
                num_buckets=_num_buckets(cuts, args.num_buckets, "train"), shuffle=args.shuffle,
                buffer_size=args.num_buckets * 2000, drop_last=args.drop_last, world_size=world_size,
                rank=rank, seed=args.seed,
            )
        elif args.bucketing_sampler:
            sampler = DynamicBucketingSampler(
                cuts, max_duration=args.max_duration, shuffle=args.shuffle,
                num_buckets=_num_buckets(cuts, args.num_buckets, "train"),
                buffer_size=args.num_buckets * 2000,
                drop_last=args.drop_last, world_size=world_size, rank=rank, seed=args.seed,
            )
        else:
            sampler = SimpleCutSampler(cuts, max_duration=args.max_duration, shuffle=args.shuffle,
                                       drop_last=args.drop_last, world_size=world_size, rank=rank,
                                       seed=args.seed)
        if sampler_state_dict is not None:
            logging.info("loading the training sampler state")
            sampler.load_state_dict(sampler_state_dict)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=args.num_workers,
                          persistent_workers=args.num_workers > 0,
                          worker_init_fn=_SeedWorkers(args.seed + 1000 * _rank(rank)))

    def valid_dataloader(self, cuts: CutSet, world_size: Optional[int] = None,
                         rank: Optional[int] = None) -> DataLoader:
        cuts = self.filter_cuts(cuts, "valid")
        sampler = DynamicBucketingSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                          num_buckets=_num_buckets(cuts, 10, "valid"),
                                          world_size=world_size, rank=rank)
        dataset = AsrDataset(self._input_strategy(), feature_type=self.args.feature_type)
        return DataLoader(dataset, sampler=sampler, batch_size=None,
                          num_workers=min(2, self.args.num_workers), persistent_workers=False)

    def test_dataloader(self, cuts: CutSet) -> DataLoader:
        """No shuffling, no filtering: lhotse DynamicBucketingSampler(max_duration, shuffle=False)
        with ``--test-num-buckets`` buckets, by default lhotse's 10, as icefall/SpeechLLM decode
        scripts (same batches, so results that depend on padding are reproducible). Sets with fewer
        cuts than buckets use one bucket per cut (lhotse cannot estimate more buckets than cuts)."""
        wanted = getattr(self.args, "test_num_buckets", 10)
        if wanted < 1:
            raise ValueError(f"--test-num-buckets must be >= 1, got {wanted}")
        num_buckets = _num_buckets(cuts, wanted, "test")
        if num_buckets == 1:  # lhotse's bucketing needs >= 2 buckets; one bucket is the plain sampler
            sampler = SimpleCutSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                       world_size=1, rank=0)
        else:
            sampler = DynamicBucketingSampler(cuts, max_duration=self.args.max_duration, shuffle=False,
                                              num_buckets=num_buckets, world_size=1, rank=0)
        dataset = AsrDataset(self._input_strategy(), feature_type=self.args.feature_type)
        return DataLoader(dataset, sampler=sampler, batch_size=None,
                          num_workers=self.args.num_workers)


def _rank(rank: Optional[int]) -> int:
    if rank is not None:
        return rank
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _num_buckets(cuts: CutSet, wanted: int, name: str) -> int:
    """``wanted``, or the number of cuts when there are fewer (lhotse cannot estimate more buckets
    than cuts); only the first ``wanted`` cuts are read."""
    n = sum(1 for _ in itertools.islice(iter(cuts), wanted))
    if n == 0:
        raise ValueError(f"{name}: no cuts left (after filtering) - nothing to load")
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
        raise ValueError(f"{len(cut_sets)} cut sets but {len(weights)} weights")
    if weights is not None and any(w <= 0 for w in weights):
        raise ValueError(f"mux weights must be positive, got {list(weights)}")
    return CutSet.mux(*cut_sets, weights=list(weights) if weights is not None else None,
                      stop_early=stop_early, seed=seed)
