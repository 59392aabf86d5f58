"""Cut manifests -> PyTorch DataLoaders (icefall's asr_datamodule conventions): :class:`AsrDataModule`
finds and loads the cuts of each part (manifests, Shar data, mixes of corpora: :func:`mux`) and builds the
train/valid/test loaders.

The pieces, one module each: the batch layout and its features (:mod:`llmasr.data.dataset`), which cuts are
kept (:mod:`llmasr.data.filters`: training/validation cuts outside the duration limits or over the
transcript limit are logged once and counted; test cuts are never filtered), the one sampler builder and
the resumable training sampler (:mod:`llmasr.data.samplers`), the training batches' seeds
(:mod:`llmasr.data.seeding`) and Shar data read per rank (:mod:`llmasr.data.shar`). Their public names
are importable from here too.
"""
from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from lhotse import CutSet
from lhotse.dataset import CutMix, OnTheFlyFeatures, PrecomputedFeatures, SpecAugment
from torch.utils.data import DataLoader

from ..config import UserError, str2bool
from llmasr.data.corpus import load_cuts_lazy
from llmasr.data.dataset import JOINED_FEATURES, AsrDataset, FeatureJoin, speech_inputs
from llmasr.data.filters import CutFilter
from llmasr.data.samplers import (
    BucketCappedTimeConstraint,
    ResumableSampler,
    StrictDynamicBucketingSampler,
    TrainLoader,
    make_sampler,
)
from llmasr.data.seeding import SeededCuts, batch_seed
from llmasr.data.shar import SharShards, shar_fields, shar_sources
from llmasr.features import feature_type_arg, make_feature_extractor, split_feature_types

__all__ = [
    "AsrDataModule", "AsrDataset", "BucketCappedTimeConstraint", "CutFilter", "FeatureJoin", "JOINED_FEATURES",
    "ResumableSampler", "SeededCuts", "SharShards", "StrictDynamicBucketingSampler", "TrainLoader", "batch_seed",
    "make_sampler", "mux", "shar_fields", "speech_inputs",
]


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
        if len({any(True for _ in shar_sources(c)) for c in sets}) > 1:
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

        shar = list(shar_sources(cuts))
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
        sampler = make_sampler(
            cuts, "train", args.max_duration, args.num_buckets, bucketing=args.bucketing_sampler,
            strict_ceiling=args.max_cut_duration if args.strict_max_duration else None, shuffle=args.shuffle,
            drop_last=args.drop_last, buffer_size=args.sampler_buffer_size or args.num_buckets * 2000,
            quadratic_duration=args.quadratic_duration, world_size=world_size, rank=rank, seed=args.seed,
        )
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
        sampler = make_sampler(cuts, "valid", self.args.max_duration, 10, world_size=world_size, rank=rank)
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
        sampler = make_sampler(cuts, "test", self.args.max_duration, wanted, world_size=1, rank=0)
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
