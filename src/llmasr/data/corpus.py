"""Corpus -> lhotse manifests -> features, with every bad utterance named and counted.

Three corpus readers produce the same kind of manifests
(``<prefix>_recordings_<part>.jsonl.gz`` / ``<prefix>_supervisions_<part>.jsonl.gz``, then
``<prefix>_cuts_<part>.jsonl.gz`` with features):

* ``librispeech``: ``<dir>/<part>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac`` + ``*.trans.txt``;
  ids, speaker, language and text exactly as lhotse's ``prepare_librispeech``.
* ``aishell``: ``<dir>/data_aishell/wav/<part>/<spk>/<uttid>.wav`` + ``transcript/aishell_transcript_v0.8.txt``;
  as lhotse's ``prepare_aishell`` (its ``text_normalize``, spaces removed).
* ``kaldi``: Kaldi data dirs (``wav.scp``, ``text``, optional ``segments``, ``utt2spk``); one dir per part.

The readers only list utterances; :func:`build_manifests` checks every one of them (audio present,
readable, sampling rate, transcript non-empty, segment inside the audio) in parallel and writes the
manifests of the good ones. Every skipped utterance is logged with its id, file and reason and
listed in ``<prefix>_skipped_<part>.tsv`` next to the manifests. lhotse's own recipes would stop on
the first unreadable file (or silently drop missing ones), hence the shared checker here; the
resulting manifests are identical to the recipes' on clean data (tests/test_prepare.py checks it).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import soundfile as sf
from lhotse import (
    CutSet,
    Recording,
    RecordingSet,
    SupervisionSegment,
    SupervisionSet,
    fix_manifests,
    load_manifest_lazy,
    validate_recordings_and_supervisions,
)
from lhotse.audio import AudioSource
from lhotse.cut import Cut
from lhotse.lazy import LazyManifestIterator
from lhotse.serialization import decode_json_line, deserialize_item

from llmasr.config import UserError, read_text_lines
from llmasr.io import atomic_write, atomic_write_text

SAMPLING_RATE = 16000
# Shortest utterance kept: FireRedASR's front end needs 85 ms for its minimum of 7 frames, lhotse's
# fbank 25 ms for one frame; nothing shorter holds a word a model could learn or transcribe.
MIN_SECONDS = 0.1
LIBRISPEECH_PARTS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other",
                     "test-clean", "test-other", "train-clean-5", "dev-clean-2")
AISHELL_PARTS = ("train", "dev", "test")


class CorpusError(UserError):
    """The corpus cannot be read at all (wrong directory, missing transcript file ...)."""


@dataclass
class Utt:
    id: str
    audio: str  # file path, or a shell command ending in "|" (Kaldi wav.scp pipes)
    text: Optional[str]
    speaker: Optional[str]
    language: Optional[str]
    recording_id: Optional[str] = None  # defaults to id
    start: float = 0.0
    end: Optional[float] = None  # None: until the end of the recording (Kaldi segments "-1" too)
    problem: Optional[str] = None  # found by the reader (e.g. a transcript without audio): skipped


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------
def scan_librispeech(corpus_dir, parts: Optional[Sequence[str]] = None) -> Dict[str, List[Utt]]:
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise CorpusError(f"LibriSpeech directory not found: {corpus_dir} (check --dl-dir; expected "
                          f"<dl-dir>/LibriSpeech/<part>/<spk>/<chapter>/*.flac)")
    present = [p for p in LIBRISPEECH_PARTS if (corpus_dir / p).is_dir()]
    if parts:
        missing = [p for p in parts if p not in present]
        if missing:
            raise CorpusError(f"LibriSpeech parts {missing} not found in {corpus_dir} (present: {present})")
        present = list(parts)
    if not present:
        raise CorpusError(f"no LibriSpeech part ({', '.join(LIBRISPEECH_PARTS[:7])}) found in {corpus_dir}")
    out: Dict[str, List[Utt]] = {}
    for part in present:
        utts = []
        for trans in sorted((corpus_dir / part).rglob("*.trans.txt")):
            for lineno, line in read_text_lines(trans):
                if not line.strip():
                    continue
                fields = line.strip().split(maxsplit=1)
                uid = fields[0]
                audio = corpus_dir / part / Path(uid.replace("-", "/")).parent / f"{uid}.flac"
                utts.append(Utt(uid, str(audio), fields[1].strip() if len(fields) > 1 else "",
                                uid.split("-")[0], "English"))
        out[part] = utts
    return out


def scan_aishell(corpus_dir) -> Dict[str, List[Utt]]:
    from lhotse.recipes.aishell import text_normalize

    corpus_dir = Path(corpus_dir)
    trans = corpus_dir / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt"
    if not trans.is_file():
        raise CorpusError(f"AISHELL transcript not found: {trans} (check --dl-dir; expected "
                          f"<dl-dir>/aishell/data_aishell/{{wav,transcript}})")
    texts = {}
    for _, line in read_text_lines(trans):
        fields = line.split()
        if fields:
            texts[fields[0]] = text_normalize(" ".join(fields[1:])).strip().replace(" ", "")
    out: Dict[str, List[Utt]] = {}
    for part in AISHELL_PARTS:
        wav_dir = corpus_dir / "data_aishell" / "wav" / part
        if not wav_dir.is_dir():
            continue
        out[part] = [Utt(w.stem, str(w), texts.get(w.stem), w.parts[-2], "Chinese")
                     for w in sorted(wav_dir.rglob("*.wav"))]
    if not out:
        raise CorpusError(f"no AISHELL part (train/dev/test) under {corpus_dir}/data_aishell/wav")
    return out


def _read_kaldi_map(path: Path, required: bool = True) -> Dict[str, str]:
    if not path.is_file():
        if required:
            raise CorpusError(f"Kaldi data dir file missing: {path}")
        return {}
    out = {}
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        fields = line.strip().split(maxsplit=1)
        if fields[0] in out:
            raise CorpusError(f"{path}:{lineno}: duplicate key {fields[0]}")
        out[fields[0]] = fields[1] if len(fields) > 1 else ""
    return out


def scan_kaldi_dir(data_dir, language: Optional[str] = None) -> List[Utt]:
    """One Kaldi data dir -> utterances. Without ``segments`` every wav.scp entry is an utterance."""
    data_dir = Path(data_dir)
    wav_scp = _read_kaldi_map(data_dir / "wav.scp")
    text = _read_kaldi_map(data_dir / "text")
    utt2spk = _read_kaldi_map(data_dir / "utt2spk", required=False)
    utts = []
    if (data_dir / "segments").is_file():
        for lineno, line in read_text_lines(data_dir / "segments"):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 4:
                raise CorpusError(f"{data_dir / 'segments'}:{lineno}: expected '<utt> <rec> <start> <end>'")
            uid, rec, start, end = fields
            if rec not in wav_scp:
                raise CorpusError(f"{data_dir / 'segments'}:{lineno}: utterance {uid} refers to recording "
                                  f"{rec} which is not in wav.scp")
            utts.append(Utt(uid, wav_scp[rec], text.get(uid), utt2spk.get(uid), language, rec,
                            float(start), None if float(end) < 0 else float(end)))
    else:
        for uid, audio in wav_scp.items():
            utts.append(Utt(uid, audio, text.get(uid), utt2spk.get(uid), language))
    listed = {u.id for u in utts}
    where = "segments" if (data_dir / "segments").is_file() else "wav.scp"
    for uid in text:
        if uid not in listed:
            utts.append(Utt(uid, "", text[uid], utt2spk.get(uid), language,
                            problem=f"in {data_dir / 'text'} but not in {where}: no audio"))
    return utts


def scan_kaldi(corpus_dir, part: Optional[str] = None, language: Optional[str] = None) -> Dict[str, List[Utt]]:
    """``corpus_dir`` is one Kaldi data dir (part name = ``part`` or its basename) or a directory
    whose sub-directories with a ``wav.scp`` are the parts."""
    corpus_dir = Path(corpus_dir)
    if (corpus_dir / "wav.scp").is_file():
        return {part or corpus_dir.name: scan_kaldi_dir(corpus_dir, language)}
    if not corpus_dir.is_dir():
        raise CorpusError(f"Kaldi data dir not found: {corpus_dir} (check --dl-dir)")
    parts = {d.name: scan_kaldi_dir(d, language) for d in sorted(corpus_dir.iterdir())
             if (d / "wav.scp").is_file()}
    if not parts:
        raise CorpusError(f"{corpus_dir} has no wav.scp and no sub-directory with one (a Kaldi data dir "
                          f"needs wav.scp and text)")
    return parts


def scan_corpus(corpus: str, corpus_dir, **kwargs) -> Dict[str, List[Utt]]:
    if corpus == "librispeech":
        return scan_librispeech(corpus_dir, kwargs.get("parts"))
    if corpus == "aishell":
        return scan_aishell(corpus_dir)
    if corpus == "kaldi":
        return scan_kaldi(corpus_dir, kwargs.get("part"), kwargs.get("language"))
    raise ValueError(f"unknown --corpus {corpus!r}: expected librispeech, aishell or kaldi")


# --------------------------------------------------------------------------------------------
# Checking and manifest building
# --------------------------------------------------------------------------------------------
def _audio_info(audio: str) -> Tuple[int, int, int]:
    """(sampling_rate, num_samples, channels) of a file or a command's stdout (raises on failure)."""
    if audio.endswith("|"):
        data = subprocess.run(audio[:-1], shell=True, check=True, capture_output=True).stdout
        info = sf.info(io.BytesIO(data))
    else:
        info = sf.info(audio)
    if info.frames <= 0:
        raise RuntimeError("no audio samples")
    return info.samplerate, info.frames, info.channels


def _check_recording(audio: str, resample: bool) -> Tuple[Optional[Tuple[int, int, int]], Optional[str]]:
    if not audio.endswith("|") and not os.path.isfile(audio):
        return None, "missing audio file"
    try:
        sr, n, ch = _audio_info(audio)
    except Exception as e:  # soundfile / the command: any failure means unreadable audio
        return None, f"unreadable audio ({type(e).__name__}: {str(e).strip()[:200]})"
    if sr != SAMPLING_RATE and not resample:
        return None, f"sampling rate {sr} Hz, expected {SAMPLING_RATE} Hz (resample it, or pass --resample true)"
    return (sr, n, ch), None


def _make_recording(rec_id: str, audio: str, info: Tuple[int, int, int]) -> Recording:
    sr, n, ch = info
    if audio.endswith("|"):
        source = AudioSource(type="command", channels=list(range(ch)), source=audio[:-1].strip())
    else:
        # Same as Recording.from_file (what lhotse's recipes store), without re-reading the header.
        source = AudioSource(type="file", channels=list(range(ch)), source=audio)
    rec = Recording(id=rec_id, sources=[source], sampling_rate=sr, num_samples=n, duration=n / sr)
    if sr != SAMPLING_RATE:
        rec = rec.resample(SAMPLING_RATE)  # lhotse resamples when the audio is loaded
    return rec


def build_manifests(
    utts: Sequence[Utt],
    num_jobs: int = 1,
    resample: bool = False,
) -> Tuple[RecordingSet, SupervisionSet, List[Tuple[str, str, str]]]:
    """Check utterances and build manifests; returns (recordings, supervisions, skipped) where
    skipped lists ``(utt_id, audio, reason)``."""
    skipped: List[Tuple[str, str, str]] = []
    audios = sorted({u.audio for u in utts if u.problem is None})
    with ThreadPoolExecutor(max(1, num_jobs)) as ex:
        checked = dict(zip(audios, ex.map(lambda a: _check_recording(a, resample), audios)))
    recordings: Dict[str, Recording] = {}
    supervisions = []
    seen = set()
    for u in utts:
        info, problem = (None, u.problem) if u.problem is not None else checked[u.audio]
        rec_id = u.recording_id or u.id
        if problem is None and u.id in seen:
            problem = "duplicate utterance id"
        if problem is None and (u.text is None):
            problem = "no transcript"
        if problem is None and not u.text.strip():
            problem = "empty transcript"
        if problem is None:
            rec = recordings.get(rec_id) or _make_recording(rec_id, u.audio, info)
            end = rec.duration if u.end is None else u.end
            if u.start < 0 or end > rec.duration + 0.01 or end <= u.start:
                problem = f"segment {u.start:.2f}-{end:.2f} s outside the audio (duration {rec.duration:.2f} s)"
            elif min(end, rec.duration) - u.start < MIN_SECONDS:
                problem = (f"too short ({min(end, rec.duration) - u.start:.3f} s < {MIN_SECONDS} s: "
                           f"too little audio for features)")
        if problem is not None:
            skipped.append((u.id, u.audio, problem))
            continue
        seen.add(u.id)
        recordings[rec_id] = rec
        supervisions.append(SupervisionSegment(
            id=u.id, recording_id=rec_id, start=u.start,
            duration=round(min(end, rec.duration) - u.start, 6) if u.end is not None else rec.duration,
            channel=0, language=u.language, speaker=u.speaker, text=u.text.strip(),
        ))
    recording_set = RecordingSet.from_recordings(recordings.values())
    supervision_set = SupervisionSet.from_segments(supervisions)
    if len(supervision_set):
        recording_set, supervision_set = fix_manifests(recording_set, supervision_set)
        validate_recordings_and_supervisions(recording_set, supervision_set)
    return recording_set, supervision_set, skipped


def report_skipped(skipped: Sequence[Tuple[str, str, str]], tsv: Optional[Path], what: str) -> None:
    """Log every skipped utterance (id, file, reason) and the counts per reason; write the tsv."""
    for uid, audio, reason in skipped:
        logging.warning(f"{what}: skipping utterance {uid} ({audio}): {reason}")
    if skipped:
        counts = Counter(r.split(" (")[0].split(",")[0] for _, _, r in skipped)  # the reason without details
        logging.warning(f"{what}: skipped {len(skipped)} utterance(s): "
                        + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    if tsv is not None:
        atomic_write_text(tsv, "".join(f"{u}\t{a}\t{r}\n" for u, a, r in skipped))


def prepare_manifests(
    corpus: str,
    corpus_dir,
    output_dir,
    prefix: str,
    num_jobs: int = 1,
    resample: bool = False,
    max_skip_fraction: float = 0.2,
    **scan_kwargs,
) -> Dict[str, Dict[str, object]]:
    """Write ``<prefix>_{recordings,supervisions}_<part>.jsonl.gz`` (+ ``_skipped_<part>.tsv``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    parts = scan_corpus(corpus, corpus_dir, **scan_kwargs)
    result = {}
    for part, utts in parts.items():
        recs, sups, skipped = build_manifests(utts, num_jobs=num_jobs, resample=resample)
        report_skipped(skipped, output_dir / f"{prefix}_skipped_{part}.tsv", f"{prefix} {part}")
        total = len(utts)
        logging.info(f"{prefix} {part}: {len(sups)} of {total} utterances kept, {len(skipped)} skipped, "
                     f"{sum(s.duration for s in sups) / 3600:.3f} h")
        if total == 0 or len(sups) == 0:
            raise CorpusError(f"{prefix} {part}: no usable utterance in {corpus_dir}"
                              + (f" (first problem: {skipped[0]})" if skipped else ""))
        if len(skipped) > max_skip_fraction * total:
            raise CorpusError(f"{prefix} {part}: {len(skipped)} of {total} utterances are unusable "
                              f"(> {max_skip_fraction:.0%}); see {output_dir / f'{prefix}_skipped_{part}.tsv'}")
        recs.to_file(output_dir / f"{prefix}_recordings_{part}.jsonl.gz")
        sups.to_file(output_dir / f"{prefix}_supervisions_{part}.jsonl.gz")
        result[part] = {"recordings": recs, "supervisions": sups, "skipped": skipped}
    return result


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def manifest_parts(manifest_dir, prefix: str) -> List[str]:
    pat = f"{prefix}_supervisions_"
    return sorted(p.name[len(pat):-len(".jsonl.gz")] for p in Path(manifest_dir).glob(f"{pat}*.jsonl.gz"))


def _init_feature_worker() -> None:
    import torch

    torch.set_num_threads(1)


def compute_features(
    manifest_dir,
    fbank_dir,
    prefix: str,
    extractor,
    num_jobs: int = 1,
    parts: Optional[Sequence[str]] = None,
    storage_type=None,
) -> Dict[str, Path]:
    """Cuts with stored features: ``<fbank_dir>/<prefix>_cuts_<part>.jsonl.gz``, features in
    ``<fbank_dir>/<prefix>_feats_<part>/``. Parts whose cuts file exists are kept as they are.

    Cut ids are the utterance ids; cuts are written sorted by id. A cut whose audio fails to load
    during extraction (lhotse then drops it) is logged by id and counted.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from llmasr.features import default_storage_type

    torch.set_num_threads(1)  # parallelism comes from num_jobs worker processes
    manifest_dir, fbank_dir = Path(manifest_dir), Path(fbank_dir)
    fbank_dir.mkdir(parents=True, exist_ok=True)
    storage_type = storage_type or default_storage_type()
    parts = list(parts) if parts else manifest_parts(manifest_dir, prefix)
    if not parts:
        raise CorpusError(f"no {prefix}_supervisions_*.jsonl.gz in {manifest_dir}: run the manifest stage first")
    out = {part: fbank_dir / f"{prefix}_cuts_{part}.jsonl.gz" for part in parts}
    todo = [part for part in parts if not out[part].is_file()]
    for part in parts:
        if part not in todo:
            logging.info(f"{out[part]} exists - skipping")
    # One pool for all parts: "spawn" workers (safe with torch) start once, not once per part.
    executor = (ProcessPoolExecutor(num_jobs, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_init_feature_worker)
                if num_jobs > 1 and todo else None)
    try:
        for part in todo:
            recs = load_manifest_lazy(manifest_dir / f"{prefix}_recordings_{part}.jsonl.gz")
            sups = load_manifest_lazy(manifest_dir / f"{prefix}_supervisions_{part}.jsonl.gz")
            cuts = CutSet.from_manifests(recordings=recs, supervisions=sups).to_eager()
            if any(len(c.supervisions) != 1 or c.supervisions[0].start != 0 or
                   abs(c.supervisions[0].duration - c.duration) > 1e-3 for c in cuts):
                # Kaldi segments: one cut per utterance.
                cuts = cuts.trim_to_supervisions(keep_overlapping=False)
            # Cut id = utterance id (lhotse would append "-<index>"), so results name utterances.
            cuts = CutSet.from_cuts(c.with_id(c.supervisions[0].id) for c in cuts)
            other_rate = [c for c in cuts if c.sampling_rate != SAMPLING_RATE]
            if other_rate:
                # (manifests not written by stage 1, which resamples or skips such audio): the
                # extractors compute 16 kHz features and would silently treat other rates as 16 kHz
                logging.warning(f"{prefix} {part}: resampling {len(other_rate)} cuts to {SAMPLING_RATE} Hz "
                                f"(first: {other_rate[0].id} at {other_rate[0].sampling_rate} Hz)")
                cuts = CutSet.from_cuts(c.resample(SAMPLING_RATE) for c in cuts)
            logging.info(f"{prefix} {part}: computing {extractor.name} features ({extractor.feature_dim(SAMPLING_RATE)} "
                         f"dims) for {len(cuts)} cuts with {num_jobs} jobs")
            with_feats = cuts.compute_and_store_features(
                extractor=extractor,
                storage_path=fbank_dir / f"{prefix}_feats_{part}",
                num_jobs=num_jobs if executor is not None else None,
                executor=executor,
                storage_type=storage_type,
                progress_bar=False,
            )
            with_feats = sorted(with_feats, key=lambda c: c.id)
            lost = sorted(set(cuts.ids) - {c.id for c in with_feats})
            if lost:
                skipped = [(cid, str(cuts[cid].recording.sources[0].source), "audio failed to load during "
                            "feature extraction") for cid in lost]
                report_skipped(skipped, fbank_dir / f"{prefix}_skipped_{part}.tsv", f"{prefix} {part}")
            atomic_write(out[part], CutSet.from_cuts(with_feats).to_file)
    finally:
        if executor is not None:
            executor.shutdown()
    return out


def combine_shuffled(cut_paths: Iterable[Path], out_path: Path, seed: int = 42) -> int:
    """Concatenate cut manifests and shuffle them (the ``*_train-all-shuf`` file); returns the count."""
    import random

    cuts = [c for p in cut_paths for c in load_manifest_lazy(p)]
    random.Random(seed).shuffle(cuts)
    atomic_write(out_path, CutSet.from_cuts(cuts).to_file)
    return len(cuts)


# --------------------------------------------------------------------------------------------
# Reading cuts
# --------------------------------------------------------------------------------------------
class _CheckedCutManifest(LazyManifestIterator):
    """lhotse's lazy JSONL reader; a line that is not UTF-8, not JSON or not a cut is an error
    naming the file and the line (lhotse's own reader fails with a bare decoder error)."""

    def __iter__(self):
        path = self.path
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    item = deserialize_item(decode_json_line(raw.decode("utf-8")))
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1}); rewrite the manifest as UTF-8") from None
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not a JSON line ({e})") from None
                if not isinstance(item, Cut):
                    raise UserError(f"{path}:{lineno}: a {type(item).__name__}, not a cut: pass a cuts manifest "
                                    f"(<prefix>_cuts_<part>.jsonl.gz)")
                yield item


def load_cuts_lazy(path) -> CutSet:
    """A cuts manifest (``.jsonl[.gz]``), read lazily; bad lines are reported with file:line."""
    return CutSet(_CheckedCutManifest(path))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def validate_cuts_file(path, read_features: bool = True, num_jobs: int = 1, frame_tolerance: int = 2) -> List[str]:
    """Problems of a cuts manifest (empty list = valid): features present and readable, finite,
    shape consistent with ``num_frames``/``num_features``, ``num_frames`` consistent with the
    duration (``round(duration / frame_shift)`` within ``frame_tolerance``), text non-empty."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        return [f"{path}: manifest not found"]
    try:
        cuts = list(load_cuts_lazy(path))
    except UserError as e:
        return [str(e)]
    problems: List[str] = []
    if not cuts:
        problems.append(f"{path}: no cuts")
    for c in cuts:
        if not c.supervisions or any(not (s.text or "").strip() for s in c.supervisions):
            problems.append(f"{path}: cut {c.id}: empty transcript")
        if not c.has_features:
            problems.append(f"{path}: cut {c.id}: no features")
            continue
        expected = round(c.duration / c.frame_shift)
        if abs(c.num_frames - expected) > frame_tolerance:
            problems.append(f"{path}: cut {c.id}: num_frames {c.num_frames} inconsistent with duration "
                            f"{c.duration:.3f} s ({expected} frames expected)")

    def check(c) -> Optional[str]:
        try:
            feats = c.load_features()
        except Exception as e:
            return (f"{path}: cut {c.id}: cannot read features from {c.features.storage_path} "
                    f"({type(e).__name__}: {e})")
        if feats.shape != (c.num_frames, c.num_features):
            return f"{path}: cut {c.id}: features shape {feats.shape} != ({c.num_frames}, {c.num_features})"
        if not np.isfinite(feats).all():
            return f"{path}: cut {c.id}: non-finite feature values"
        return None

    if read_features:
        with ThreadPoolExecutor(max(1, num_jobs)) as ex:
            problems += [p for p in ex.map(check, [c for c in cuts if c.has_features]) if p]
    return problems
