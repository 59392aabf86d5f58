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
"""
from __future__ import annotations

import argparse
import logging
import sys
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
    return parser


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
    from lhotse import CutSet, Recording

    cuts = []
    for uid, path in items:
        try:
            rec = Recording.from_file(path, recording_id=uid)
        except Exception as e:  # soundfile/audioread say why in their own words
            raise UserError(f"cannot read audio file {path} (utterance {uid}): {e}") from None
        cuts.append(rec.to_cut())
    return CutSet.from_cuts(cuts)


def feature_loader(args, cuts):
    """Batches of on-the-fly features: the data module's front end for --feature-type (audio of any
    sampling rate resampled to 16 kHz first)."""
    from llmasr.data import AsrDataModule

    args.on_the_fly_feats = True
    return AsrDataModule(args).test_dataloader(cuts)


def transcribe(args) -> List[Tuple[str, str]]:
    from llmasr.recipes.decode import decode_dataset, generation_options_from_args
    from llmasr.recipes.inference import choose_checkpoint, load_for_inference, load_weights
    from llmasr.recipes.recipe import recipe_of

    items = read_inputs(args.audio, args.wav_scp)
    cuts = make_cuts(items)
    state_dict, source = load_weights(args, choose_checkpoint(args))
    model, _ = load_for_inference(recipe_of(args), args, state_dict, source)
    decoded = decode_dataset(model, feature_loader(args, cuts), num_cuts=len(items),
                             **generation_options_from_args(args))
    # one line per file: a newline or tab the LLM wrote inside a transcript becomes a space
    hyps = {cut_id: " ".join(hyp.split()) for cut_id, _, hyp in decoded}
    return [(uid, hyps[uid]) for uid, _ in items]


def _main(argv) -> List[Tuple[str, str]]:
    args = parse_args_with_config(get_parser(), argv, section="decode", inherit="train")
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s",
                        level=getattr(logging, args.log_level.upper()))
    with torch.inference_mode():
        results = transcribe(args)
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

