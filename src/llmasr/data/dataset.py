"""A lhotse-sampled CutSet -> one batch dict (:class:`AsrDataset`)::

    {"features": (N, T, F) float32, padded with log(1e-10) (lhotse's LOG_EPSILON),
     "feature_lens": (N,) int64,
     "texts": list[str],      # supervision text as stored in the manifest
     "cut_ids": list[str]}

with the cuts of a batch ordered by decreasing duration (as lhotse's K2SpeechRecognitionDataset).
With several --feature-type entries (MoSE whose encoders have different front ends) batches also hold
``"features_by_type": {type: (features, feature_lens)}``, "features" being the first type's
(:func:`speech_inputs`).
``--feature-type firered`` batches are FireRedASR's own: ``feature_lens`` are its snip_edges frame
counts (``llmasr.features.firered.num_frames``, 2-3 fewer than the lhotse manifest's
round(duration / 10 ms)), the padding value is 0.0 (FireRedASR's, after CMVN) and T = max(feature_lens),
the same for stored and on-the-fly features.
In test batches (``drop_nonfinite``) only a cut whose features hold NaN/inf leaves its batch, listed in
the batch's ``"dropped"`` entry (the decode recipe reports it).
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import PrecomputedFeatures
from lhotse.utils import fastcopy

from llmasr.config import UserError
from llmasr.data.corpus import SAMPLING_RATE, load_cuts_lazy
from llmasr.data.seeding import SeededCuts, seeded
from llmasr.features import stored_feature_type


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
            with seeded(cuts.seed, self.transform_rng):
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
