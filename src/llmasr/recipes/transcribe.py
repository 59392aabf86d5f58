"""The recipe behind ``src/transcribe.py``: transcribe your own recordings with a trained model
(``<utt-id>\t<text>`` per file).

    python3 src/transcribe.py --config local/conf/demo_en.yaml --exp-dir exp/demo_en --epoch 2 --avg 1 \\
      --llm-path models/demo/SmolLM2-135M-Instruct --speech-encoder-path models/demo/whisper-base/whisper-base.pt \\
      hello.wav other.flac
    python3 src/transcribe.py ... --wav-scp wav.scp --output hyps.txt    # Kaldi wav.scp: <utt-id> <path>

The model flags, ``--config`` (its ``train:`` section gives the model flags, ``decode:`` the decoding
options) and ``--exp-dir`` + ``--epoch/--avg`` or ``--checkpoint`` are those of ``src/decode.py``
(the demo prints the full command). Audio of any sampling rate is resampled to 16 kHz; the
features are computed on the fly by the front end of the model's ``--feature-type``; files are
decoded in batches of up to ``--max-duration`` seconds. The utterance id of a file is its name
without the extension.

Long recordings (``--vad silero``, the default): each file is split by voice activity detection
(:mod:`llmasr.vad`) into speech segments of at most ``--max-segment-duration`` seconds; the segments
of all files are lhotse cuts decoded together in the same batches, and a file's transcript is its
segments' texts in order (``--segments FILE``: one JSON line per segment). A file that the VAD finds
a single segment in, and that fits the limit, is decoded whole, as with ``--vad none``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import torch

from llmasr.config import UserError, parse_args_with_config, run_cli
from llmasr.recipes.decode import get_decode_parser


def get_parser() -> argparse.ArgumentParser:
    parser = get_decode_parser(mose=False)
    parser.description = "Transcribe your own recordings with a trained model: prints <utt-id><TAB><text> per file."
    g = parser.add_argument_group("input / output")
    g.add_argument("audio", nargs="*", type=Path, help="Audio files (wav, flac, anything soundfile reads).")
    g.add_argument("--wav-scp", type=Path, default=None, help="Kaldi-style list: '<utt-id> <audio path>' per line.")
    g.add_argument("--output", type=Path, default=None, help="Also write the '<utt-id>\\t<text>' lines to this file.")
    g.add_argument("--segments", type=Path, default=None,
                   help='Write one JSON line per speech segment: {"id": <utt-id>, "start": s, "end": s, "text": ...}.')
    add_vad_arguments(parser)
    return parser


def add_vad_arguments(parser: argparse.ArgumentParser) -> None:
    from llmasr import vad

    g = parser.add_argument_group("long recordings (voice activity detection)")
    g.add_argument("--vad", choices=["silero", "none"], default="silero",
                   help="silero: split each file into speech segments (silero-vad); none: one utterance per file")
    g.add_argument("--vad-threshold", type=float, default=vad.THRESHOLD,
                   help="speech probability that starts a segment (silero's default)")
    g.add_argument("--vad-min-silence", type=float, default=vad.MIN_SILENCE,
                   help="seconds of silence that end a segment (silero: 0.1; shorter pauses are inside sentences)")
    g.add_argument("--vad-speech-pad", type=float, default=vad.SPEECH_PAD,
                   help="seconds of audio kept around each segment (silero: 0.03)")
    g.add_argument("--max-segment-duration", type=float, default=None,
                   help="longest segment in seconds, longer speech is cut at its quietest point (default: the "
                        "model's: what it was trained on (--max-cut-duration), at most its encoder's limit: "
                        "Whisper and FireRedASR-LLM 30 s, FireRedASR-AED 60 s)")


def read_inputs(audio: List[Path], wav_scp: Path = None) -> List[Tuple[str, Path]]:
    """(utt-id, path) of every input, in the given order; ids must be unique, files must exist."""
    items = [(p.stem, p) for p in audio]
    if wav_scp is not None:
        if not wav_scp.is_file():
            raise UserError(f"--wav-scp {wav_scp} does not exist")
        for lineno, line in enumerate(wav_scp.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=1)
            if len(fields) != 2:
                raise UserError(f"{wav_scp}:{lineno}: expected '<utt-id> <audio path>', got {line!r}")
            items.append((fields[0], Path(fields[1].strip())))
    if not items:
        raise UserError("no input: give audio files and/or --wav-scp")
    seen = set()
    for uid, path in items:
        if uid in seen:
            raise UserError(f"utterance id {uid!r} ({path}) occurs twice; rename the file or use --wav-scp")
        seen.add(uid)
        if not path.is_file():
            raise UserError(f"audio file {path} (utterance {uid}) does not exist")
    return items


def make_cuts(items: List[Tuple[str, Path]]):
    """One lhotse cut per whole file (no supervision: nothing to score)."""
    from lhotse import CutSet

    return CutSet.from_cuts(_file_cut(uid, path) for uid, path in items)


def encoder_limit(args) -> float:
    """The longest input the model's encoder takes, in seconds (inf: no hard limit)."""
    from llmasr.encoders.whisper import KNOWN_WHISPER_SIZES
    from llmasr.recipes.recipe import recipe_of

    recipe = recipe_of(args)
    if recipe.name == "aed":
        return 60.0  # FireRedASR's README: AED up to 60 s
    limits = [float("inf")]
    for t in recipe.encoder_types(args):
        if t in ("firered", "firered-conformer"):
            limits.append(30.0)  # FireRedASR's README: FireRedASR-LLM up to 30 s
        elif t == "whisper" or t in KNOWN_WHISPER_SIZES:
            limits.append(30.0)  # Whisper's 3000-frame window
    return min(limits)


def max_segment_duration(args) -> float:
    """--max-segment-duration, by default the training cuts' limit capped by the encoder's; a value
    above the encoder's limit is refused."""
    limit = encoder_limit(args)
    if args.max_segment_duration is None:
        return min(limit, getattr(args, "max_cut_duration", None) or 30.0)
    if args.max_segment_duration > limit:
        raise UserError(f"--max-segment-duration {args.max_segment_duration:g} is above the encoder's limit of "
                        f"{limit:g} s")
    if args.max_segment_duration < 1.0:
        raise UserError(f"--max-segment-duration {args.max_segment_duration:g}: give at least 1 s")
    return args.max_segment_duration


@dataclass
class FileSegments:
    """One input file: its speech segments (start, end in seconds) and their cut ids."""

    uid: str
    path: Path
    spans: List[Tuple[float, float]] = field(default_factory=list)
    cut_ids: List[str] = field(default_factory=list)


def _file_cut(uid: str, path: Path, say: bool = True):
    """The whole file as one mono cut: channels averaged (lhotse's downmix sums them); ``say``: log
    that."""
    from lhotse import Recording

    try:
        rec = Recording.from_file(path, recording_id=uid)
    except Exception as e:  # soundfile/audioread say why in their own words
        raise UserError(f"cannot read audio file {path} (utterance {uid}): {e}") from None
    cut = rec.to_cut()
    if rec.num_channels > 1:
        if say:
            logging.info(f"{path}: {rec.num_channels} channels, averaged to mono")
        cut = cut.to_mono(mono_downmix=True).perturb_volume(1.0 / rec.num_channels).with_id(uid)
    return cut


def segment_inputs(items: List[Tuple[str, Path]], args) -> Tuple[List[FileSegments], "CutSet"]:
    """Every file's speech segments as lhotse cuts (``--vad none``: the whole file)."""
    from lhotse import CutSet

    from llmasr import vad

    files, cuts = [], []
    if not 0 < args.vad_threshold < 1:
        raise UserError(f"--vad-threshold {args.vad_threshold:g}: a speech probability, between 0 and 1")
    for flag, value in (("--vad-min-silence", args.vad_min_silence), ("--vad-speech-pad", args.vad_speech_pad)):
        if value < 0:
            raise UserError(f"{flag} {value:g}: seconds, at least 0")
    limit = max_segment_duration(args) if args.vad == "silero" else None
    model = vad.load_model() if args.vad == "silero" else None
    start, total, done = time.time(), len(items), 0
    last = start
    for n, (uid, path) in enumerate(items, start=1):
        whole = _file_cut(uid, path, say=model is None)  # (the VAD says it too)
        entry = FileSegments(uid, path)
        files.append(entry)
        if whole.duration == 0:
            logging.warning(f"{path} (utterance {uid}): zero-length audio, empty transcript")
            continue
        if model is None:
            if whole.duration > encoder_limit(args):
                raise UserError(f"{path} (utterance {uid}) is {whole.duration:.1f} s long, above the encoder's limit "
                                f"of {encoder_limit(args):g} s: use --vad silero to split it")
            spans = [(0.0, whole.duration)]
        else:
            spans, _ = vad.segment_file(path, limit, args.vad_threshold, args.vad_min_silence,
                                        args.vad_speech_pad, model)
            if not spans:
                logging.warning(f"{path} (utterance {uid}): no speech found, empty transcript")
            elif len(spans) == 1 and whole.duration <= limit:
                spans = [(0.0, whole.duration)]  # decoded whole: the same text as without the VAD
        for k, (a, b) in enumerate(spans):
            entry.spans.append((a, b))
            entry.cut_ids.append(uid if spans == [(0.0, whole.duration)] else f"{uid}-{k:05d}")
            cuts.append(whole if entry.cut_ids[-1] == uid else
                        whole.truncate(offset=a, duration=b - a).with_id(entry.cut_ids[-1]))
        done += whole.duration
        if model is not None and total > 1 and (n == total or time.time() - last > 30):
            last = time.time()
            eta = (time.time() - start) / n * (total - n)
            logging.info(f"VAD: {n}/{total} files, {done:.0f} s of audio, {len(cuts)} segments, ETA {eta:.0f} s")
    ids = [c.id for c in cuts]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise UserError(f"segment id {dup!r} is also a file's utterance id: rename that file or use --wav-scp")
    return files, CutSet.from_cuts(cuts)


def feature_loader(args, cuts):
    """Batches of on-the-fly features: the data module's front end for --feature-type (audio of any
    sampling rate resampled to 16 kHz first)."""
    from llmasr.data import AsrDataModule

    args.on_the_fly_feats = True
    return AsrDataModule(args).test_dataloader(cuts)


def transcribe(args) -> List[Tuple[str, str]]:
    """``(utt id, text)`` of every input file, in the order given. Under ``torchrun --nproc-per-node N``
    each rank segments and decodes a share of the files (balanced by duration) and rank 0 returns
    (and writes) everything; the other ranks return []."""
    from llmasr.recipes.decode import join_decode
    from llmasr.training.dist import cleanup_dist

    items = read_inputs(args.audio, args.wav_scp)
    shard = join_decode(args)
    try:
        return _transcribe_share(args, items, shard)
    finally:
        cleanup_dist()


def _transcribe_share(args, items, shard) -> List[Tuple[str, str]]:
    from llmasr.decoding_shards import balance_by_duration
    from llmasr.recipes.decode import decode_dataset, generation_options_from_args
    from llmasr.recipes.inference import choose_checkpoint, load_for_inference, load_weights
    from llmasr.recipes.recipe import recipe_of
    from llmasr.vllm_engine import check_vllm_options, import_vllm, make_engine

    order = {uid: i for i, (uid, _) in enumerate(items)}
    if shard.world_size > 1:
        mine = set(balance_by_duration([(uid, _duration(path)) for uid, path in items], shard.world_size)[shard.rank])
        items = [(uid, path) for uid, path in items if uid in mine]
        logging.info(f"rank {shard.rank} of {shard.world_size}: {len(items)} files")
    gen = generation_options_from_args(args)
    if getattr(args, "engine", "hf") == "vllm":  # before the model is built: options, then the install
        check_vllm_options(**gen)
        import_vllm()
    files, hyps, error, engine = [], {}, None, None
    try:
        state_dict, source = load_weights(args, choose_checkpoint(args), save=shard.is_main)
        files, cuts = segment_inputs(items, args)
        model, _ = load_for_inference(recipe_of(args), args, state_dict, source)
        if len(cuts):
            engine = make_engine(args, model, gen)  # None: --engine hf
            decoded = decode_dataset(model, feature_loader(args, cuts), num_cuts=len(cuts), engine=engine, **gen)
            # one line per file: a newline or tab the LLM wrote inside a transcript becomes a space
            hyps = {cut_id: " ".join(hyp.split()) for cut_id, _, hyp in decoded}
    except Exception as e:  # noqa: BLE001 - every rank stops with a line naming the failed one
        if shard.world_size == 1:
            raise
        error = e
    finally:
        if engine is not None:
            engine.close()
    parts = shard.gather_to_main((files, hyps), error, what="transcribing its files")
    if parts is None:
        return []
    files = sorted((f for fs, _ in parts for f in fs), key=lambda f: order[f.uid])
    hyps = {k: v for _, h in parts for k, v in h.items()}
    if args.segments is not None:
        write_segments(args.segments, files, hyps)
    # (a cut the decoder dropped, e.g. NaN features, was logged there and reads as empty)
    return [(f.uid, " ".join(t for t in (hyps.get(c, "") for c in f.cut_ids) if t)) for f in files]


def _duration(path: Path) -> float:
    """Seconds of audio in ``path`` from its header (0 when unreadable: segment_inputs names it)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except Exception:  # noqa: BLE001 - reported by segment_inputs on the rank that gets it
        return 0.0


def write_segments(path: Path, files: List[FileSegments], hyps) -> None:
    import json

    from llmasr.io import atomic_write_text

    lines = [json.dumps({"id": f.uid, "start": round(a, 3), "end": round(b, 3), "text": hyps.get(c, "")},
                        ensure_ascii=False)
             for f in files for (a, b), c in zip(f.spans, f.cut_ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _main(argv) -> List[Tuple[str, str]]:
    args = parse_args_with_config(get_parser(), argv, section="decode", inherit="train")
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=getattr(logging, args.log_level.upper()))
    with torch.inference_mode():
        results = transcribe(args)
    from llmasr.decoding_shards import world_from_env

    if world_from_env()[0] != 0:  # (rank 0 writes every rank's transcripts)
        return results
    lines = "".join(f"{uid}\t{text}\n" for uid, text in results)
    sys.stdout.write(lines)
    sys.stdout.flush()
    if args.output is not None:
        from llmasr.io import atomic_write_text

        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, lines)
    return results


def main(argv=None) -> List[Tuple[str, str]]:
    """A bad input is one line on stderr and exit status 1 (--debug: the traceback)."""
    return run_cli(_main, argv)

