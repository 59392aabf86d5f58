#!/usr/bin/env python3
"""Decode wavs with a released FireRedASR-AED or FireRedASR-LLM directory (like FireRedASR's speech2text.py).

  python src/firered_speech2text.py --asr-type aed --model-dir models/FireRedASR-AED-L \
      --wav-scp data/test/wav.scp --output exp/firered/aed.txt \
      --batch-size 2 --beam-size 3 --nbest 1 --decode-max-len 0 --softmax-smoothing 1.25 \
      --aed-length-penalty 0.6 --eos-penalty 1.0

  python src/firered_speech2text.py --asr-type llm --model-dir models/FireRedASR-LLM-L \
      --wav-scp data/test/wav.scp --output exp/firered/llm.txt --batch-size 1 --beam-size 3 \
      --decode-max-len 0 --decode-min-len 0 --repetition-penalty 3.0 --llm-length-penalty 1.0 --temperature 1.0

By default every utterance gets exactly the released code's batch-size-1 result, whatever --batch-size;
add --compat-reference-padding to reproduce its batched results (padding frames attended) instead.

Long recordings: a file longer than --max-segment-duration (FireRedASR's limits: LLM 30 s, AED 60 s)
is split by voice activity detection (llmasr.vad, silero-vad) into speech segments of at most that
length, decoded as utterances ``<uttid>-NNNNN``; the file's line is their texts in order
(--segments FILE: one JSON line per segment). Shorter files are decoded whole, as the release does.
"""
import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmasr.config import UserError, run_cli
from llmasr.firered.decode import add_decode_args, run, wav_list

LIMITS = {"llm": 30.0, "aed": 60.0}  # FireRedASR's README


def main(argv=None):
    return run_cli(_speech2text, argv)


def _add_long_args(parser: argparse.ArgumentParser) -> None:
    from llmasr import vad

    g = parser.add_argument_group("long recordings (voice activity detection)")
    g.add_argument("--vad", choices=["silero", "none"], default="silero",
                   help="silero: files longer than --max-segment-duration are split into speech segments; "
                        "none: every file is one utterance")
    g.add_argument("--vad-threshold", type=float, default=vad.THRESHOLD)
    g.add_argument("--vad-min-silence", type=float, default=vad.MIN_SILENCE)
    g.add_argument("--vad-speech-pad", type=float, default=vad.SPEECH_PAD)
    g.add_argument("--max-segment-duration", type=float, default=None,
                   help="seconds (default and maximum: LLM 30, AED 60)")
    g.add_argument("--segments", default=None, help='one JSON line per segment: {"id", "start", "end", "text"}')


def _speech2text(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(parser)
    _add_long_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    limit = LIMITS[args.asr_type] if args.max_segment_duration is None else args.max_segment_duration
    if limit > LIMITS[args.asr_type]:
        raise UserError(f"--max-segment-duration {limit:g} is above FireRedASR-{args.asr_type.upper()}'s limit of "
                        f"{LIMITS[args.asr_type]:g} s")
    with tempfile.TemporaryDirectory(prefix="speech2text-") as tmp:
        files = _segment_long_files(args, limit, Path(tmp)) if args.vad == "silero" else None
        results = run(args) if files is None else _run_segments(args, files)
    for uttid, text in results:
        print(f"{uttid}\t{text}")
    return results


def _segment_long_files(args, limit: float, tmp: Path):
    """None when no file is longer than ``limit`` (and no --segments); else [(uttid, [(start, end, segment id)])] with the
    segments written as 16 kHz mono wavs listed in a wav.scp under ``tmp`` (args point at it)."""
    import soundfile as sf

    from llmasr import vad

    wavs = wav_list(args)
    durations = {}
    for uttid, path in wavs:
        with vad.open_audio(path) as f:
            durations[uttid] = f.frames / f.samplerate
    if all(d <= limit for d in durations.values()) and not args.segments:
        return None
    model = vad.load_model()
    files, scp = [], []
    for uttid, path in wavs:
        if durations[uttid] <= limit:
            files.append((uttid, [(0.0, durations[uttid], uttid)]))
            scp.append(f"{uttid} {path}")
            continue
        spans, _ = vad.segment_file(Path(path), limit, args.vad_threshold, args.vad_min_silence,
                                    args.vad_speech_pad, model)
        if not spans:
            logging.warning(f"{path} (utterance {uttid}): no speech found, empty transcript")
        segs = []
        for k, (a, b) in enumerate(spans):
            seg_id = f"{uttid}-{k:05d}"
            out = tmp / f"{seg_id}.wav"
            sf.write(str(out), _read_16k_mono(path, a, b), vad.SAMPLE_RATE, subtype="PCM_16")
            scp.append(f"{seg_id} {out}")
            segs.append((a, b, seg_id))
        files.append((uttid, segs))
    (tmp / "wav.scp").write_text("".join(line + "\n" for line in scp), encoding="utf-8")
    args.wav_path, args.wav_paths, args.wav_dir, args.wav_scp = None, None, None, str(tmp / "wav.scp")
    return files


def _read_16k_mono(path, start: float, end: float):
    """Samples ``start``..``end`` s of ``path``, channels averaged, resampled to 16 kHz (the released
    front end takes 16 kHz mono only)."""
    import numpy as np

    from llmasr import vad

    with vad.open_audio(path) as f:
        rate = f.samplerate
        f.seek(int(start * rate))
        x = f.read(int((end - start) * rate), dtype="float32", always_2d=True).mean(axis=1)
    if rate != vad.SAMPLE_RATE:
        r = vad.StreamResampler(rate)
        x = np.concatenate([r(x), r.flush()])
    return x


def _run_segments(args, files):
    """Decodes the segments (output and scoring per file, after joining)."""
    output, ref_text = args.output, args.ref_text
    args.output, args.ref_text = None, None
    hyps = dict(run(args))
    results = [(u, " ".join(t for t in (" ".join(hyps[s].split()) for _, _, s in segs) if t)) for u, segs in files]
    from llmasr.io import atomic_write_text

    if output:
        atomic_write_text(output, "".join(f"{u}\t{t}\n" for u, t in results))
    if args.segments:
        atomic_write_text(args.segments, "".join(
            json.dumps({"id": u, "start": round(a, 3), "end": round(b, 3), "text": " ".join(hyps[s].split())},
                       ensure_ascii=False) + "\n" for u, segs in files for a, b, s in segs))
    if ref_text:
        from llmasr.firered.decode import read_text
        from llmasr.scoring import write_results

        refs = read_text(ref_text)
        missing = [u for u, _ in results if u not in refs]
        if missing:
            raise UserError(f"{ref_text}: no reference for {missing[:5]}")
        out_dir = Path(output).parent if output else Path(".")
        write_results(out_dir, Path(ref_text).parent.name or "test", f"{args.asr_type}-beam{args.beam_size}",
                      [(u, refs[u], t) for u, t in results], mode="cer")
    return results


if __name__ == "__main__":
    main()
