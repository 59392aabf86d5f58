"""The decode recipe behind ``src/decode.py`` / ``src/decode_mose.py``: choose or average the
checkpoint, build the model, decode every test set in batches (progress + ETA), and write icefall's
``recogs-*`` / ``errs-*`` / ``wer-summary-*`` files into ``<exp-dir>/decode-<checkpoint>-<options>/``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llmasr.aux_ctc import MODES as AUX_CTC_MODES
from llmasr.config import UserError, format_duration


def decode_dataset(
    model,
    dataloader: Iterable[Dict[str, Any]],
    beam_size: int = 1,
    max_new_tokens: Optional[int] = None,
    log_interval: float = 30.0,
    num_cuts: Optional[int] = None,
    skipped: Optional[List[Tuple[str, str]]] = None,
    **gen_opts,
) -> Iterator[Tuple[str, str, str]]:
    """Decode every batch of ``dataloader`` (dicts with ``features``, ``feature_lens``, ``texts``,
    ``cut_ids``, and ``features_by_type`` for encoders of several feature types) and yield
    ``(cut_id, ref, hyp)``; logs progress, speed and ETA every ``log_interval`` seconds (ETA needs
    ``num_cuts``). The cuts a batch lists in ``"dropped"`` (NaN/inf features, see
    llmasr.data.AsrDataset) are logged and appended to ``skipped`` as (cut id, reason)."""
    from llmasr.data.datamodule import speech_inputs

    device = next(model.parameters()).device
    start = last = time.time()
    done = 0
    audio_sec = 0.0
    for batch_idx, batch in enumerate(dataloader):
        for cut_id, reason in batch.get("dropped", ()):
            logging.warning(f"skipping cut {cut_id}: {reason}")
            if skipped is not None:
                skipped.append((cut_id, reason))
        if not batch["cut_ids"]:
            continue
        features, feature_lens, more = speech_inputs(batch, device)  # more: features_by_type (mixed front ends)
        hyps = model.decode(features, feature_lens, beam_size=beam_size, max_new_tokens=max_new_tokens, **more,
                            **gen_opts)
        if len(hyps) != len(batch["cut_ids"]):
            raise RuntimeError(f"batch {batch_idx}: {len(hyps)} hypotheses for {len(batch['cut_ids'])} cuts")
        for cut_id, ref, hyp in zip(batch["cut_ids"], batch["texts"], hyps):
            yield cut_id, ref, hyp
        done += len(hyps)
        frame_shift = batch.get("frame_shift", 0.01)
        audio_sec += float(feature_lens.sum()) * frame_shift
        now = time.time()
        if now - last >= log_interval or batch_idx == 0:
            last = now
            elapsed = now - start
            rate = done / max(elapsed, 1e-9)
            msg = f"batch {batch_idx}, {done} cuts" + (f"/{num_cuts}" if num_cuts else "")
            msg += f", {rate:.2f} utt/s, RTF {elapsed / max(audio_sec, 1e-9):.3f}"
            if num_cuts:
                msg += f", ETA {format_duration((num_cuts - done) / max(rate, 1e-9))}"
            logging.info(msg)
    elapsed = time.time() - start
    logging.info(
        f"decoded {done} cuts in {format_duration(elapsed)} ({done / max(elapsed, 1e-9):.2f} utt/s, "
        f"RTF {elapsed / max(audio_sec, 1e-9):.3f})"
    )


def add_decoding_arguments(parser) -> None:
    g = parser.add_argument_group("decoding")
    g.add_argument("--beam-size", type=int, default=1, help="1 = greedy search; > 1 = beam search.")
    g.add_argument("--max-new-tokens", type=int, default=200, help="Upper bound on generated tokens.")
    g.add_argument("--max-new-tokens-per-speech-token", type=float, default=None,
                   help="Optional per-utterance cap: ceil(value * number of speech positions).")
    g.add_argument("--repetition-guard", type=int, default=0,
                   help="Stop an utterance when a pattern of <= 8 tokens repeats this many times (0 = off).")
    g.add_argument("--length-penalty", type=float, default=1.0, help="Beam search length penalty.")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Hugging Face repetition penalty over the generated tokens (1.0 = off; FireRedASR-LLM uses 3.0).")
    g.add_argument("--ctc-weight", type=float, default=0.0,
                   help="Joint decoding with the projector's aux CTC (llmasr/ctc_prefix.py): each next token scores "
                   "(1-w) log P_llm + w (CTC prefix score gain). For models trained with --aux-ctc-* (0 = off).")
    g.add_argument("--ctc-mode", type=str, default=None, choices=AUX_CTC_MODES,
                   help="The aux CTC's mode for --ctc-weight (default: the --ctc-compress-frames mode). "
                   "The blank is the prompt format's pad token, the aux CTC's default --aux-ctc-blank.")
    g.add_argument("--decode-dtype", type=str, default=None, choices=["float32", "bfloat16", "float16"],
                   help="Decode the LLM in this dtype and run the encoders under autocast to it (SpeechLLM."
                   "set_decode_dtype; bfloat16 on CPUs with AVX512-BF16/AMX, float16/bfloat16 on CUDA). "
                   "Default: the --llm-dtype LLM with fp32 encoders (all fp32 on CPU: the golden results).")


def generation_options_from_args(args) -> Dict[str, Any]:
    """Keyword arguments for ``SpeechLLM.decode`` / :func:`decode_dataset` from parsed flags."""
    if getattr(args, "model_type", "speechllm") == "aed":
        from llmasr.firered.aed_recipe import decoding_options

        return decoding_options(args)
    return dict(
        beam_size=args.beam_size,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_per_speech_token=args.max_new_tokens_per_speech_token,
        repetition_guard=args.repetition_guard,
        length_penalty=args.length_penalty,
        repetition_penalty=getattr(args, "repetition_penalty", 1.0),
        **({"ctc_weight": args.ctc_weight, "ctc_mode": args.ctc_mode} if getattr(args, "ctc_weight", 0.0) else {}),
    )


def get_decode_parser(mose: bool = False, model_type: str = "speechllm"):
    """``model_type`` "aed": FireRedASR-AED (src/decode_aed.py) instead of a SpeechLLM."""
    import argparse

    from llmasr.data import AsrDataModule
    from llmasr.recipes.model_args import add_model_arguments

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--exp-dir", type=str,
                        default="exp/asr_librispeech_zipformer_mose_qwen2_1.5B" if mose
                        else "exp/asr_librispeech_zipformer_qwen2_1.5B", help="The experiment dir.")
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="Checkpoint file in --exp-dir (e.g. epoch-10-avg-5.pt); --epoch/--avg/--iter are ignored.")
    parser.add_argument("--epoch", type=int, default=-1, help="Decode epoch-<epoch>.pt (averaged with --avg).")
    parser.add_argument("--iter", type=int, default=0,
                        help="If > 0, average the --avg newest checkpoint-<batch>.pt with batch <= --iter.")
    parser.add_argument("--avg", type=int, default=1,
                        help="Number of consecutive checkpoints ending at --epoch (or --iter) to average.")
    parser.add_argument("--test-sets", type=str, default="test-clean,test-other",
                        help="Comma-separated test parts (<manifest-dir>/<prefix>_cuts_<part>.jsonl.gz) or manifest paths.")
    parser.add_argument("--scoring", type=str, default=None, choices=["wer", "cer"],
                        help="Error metric (default: the one of the --prompt-format's recipe, else wer).")
    parser.add_argument("--normalize", type=str, default=None, choices=["none", "en", "zh", "speechllm"],
                        help="Text normalisation before scoring. Default: as the --prompt-format's recipe scores "
                        "(speechllm: raw WER on whitespace-split words; whisper_llm_zh: CER over every character, "
                        "spaces and punctuation included), else en for WER, zh for CER. 'speechllm' scores like "
                        "SpeechLLM: lower-cased references, hypotheses split on whitespace.")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch CPU threads (SpeechLLM decodes with 1; 0 = torch default).")
    parser.add_argument("--log-level", type=str, default="info")
    if model_type == "aed":
        from llmasr.firered.aed_recipe import add_aed_arguments

        AsrDataModule.add_arguments(parser)
        add_aed_arguments(parser, training=False)
        return parser
    add_model_arguments(parser, mose=mose)
    add_decoding_arguments(parser)
    AsrDataModule.add_arguments(parser)
    return parser


def _checkpoint_tag(args) -> str:
    if args.checkpoint:
        name = Path(args.checkpoint).name
        return name[:-3] if name.endswith(".pt") else name
    if args.iter > 0:
        return f"iter-{args.iter}-avg-{args.avg}"
    return f"epoch-{args.epoch}-avg-{args.avg}"


def _options_tag(args) -> str:
    dtype_tag = f"-{args.decode_dtype}" if getattr(args, "decode_dtype", None) not in (None, "float32") else ""
    if getattr(args, "model_type", "speechllm") == "aed":
        from llmasr.firered.aed_recipe import decoding_options_tag

        return decoding_options_tag(args) + dtype_tag
    tag = f"beam{args.beam_size}"
    if args.max_new_tokens != 200:
        tag += f"-maxnew{args.max_new_tokens}"
    if args.max_new_tokens_per_speech_token is not None:
        tag += f"-perspeech{args.max_new_tokens_per_speech_token:g}"
    if args.repetition_guard:
        tag += f"-repguard{args.repetition_guard}"
    if args.length_penalty != 1.0:
        tag += f"-lp{args.length_penalty:g}"
    if getattr(args, "repetition_penalty", 1.0) != 1.0:
        tag += f"-rp{args.repetition_penalty:g}"
    if getattr(args, "ctc_weight", 0.0):
        tag += f"-ctc{args.ctc_weight:g}"
    return tag + dtype_tag


def _test_set_name(args, name: str) -> str:
    """icefall/SpeechLLM style result-file name: librispeech + test-clean -> librispeech_test_clean."""
    base = Path(name).name
    for ext in (".jsonl.gz", ".jsonl", ".json"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return f"{args.dataset_prefix}_{base}".replace("-", "_")


def scoring_choice(args, fmt) -> Tuple[str, Optional[str]]:
    """(metric, normalisation) of a decode: ``--scoring`` / ``--normalize`` when given, else how the
    recipe of the prompt format scores (``fmt.score_metric`` / ``fmt.score_normalize``: its own
    numbers by default), else WER with :func:`llmasr.scoring.write_results`' default (None)."""
    metric = args.scoring or fmt.score_metric or "wer"
    normalize = args.normalize
    if normalize is None and metric == fmt.score_metric:
        normalize = fmt.score_normalize
    return metric, normalize


def min_decodable_frames(model, feature_types: Union[str, Sequence[str]] = "fbank") -> Dict[str, int]:
    """{feature type: the fewest frames of that type} a cut needs so that every speech encoder gives
    its projector one group of frames (a shorter cut would get no speech position in its prompt; the
    Zipformer refuses fewer than 9 frames and with them the whole batch). ``feature_types``: the type
    of every encoder, or one for all. Encoders without a static ``output_lengths`` rule are taken to
    need 1 frame; FireRedASR features need their own minimum."""
    encoders, projectors = list(getattr(model, "encoders", [])), list(getattr(model, "projectors", []))
    if isinstance(feature_types, str):
        feature_types = [feature_types] * max(len(encoders), 1)
    frames = torch.arange(1, 10001)
    need = dict.fromkeys(feature_types, 1)
    for feature_type, encoder, projector in zip(feature_types, encoders, projectors):
        lengths = getattr(encoder, "output_lengths", None)
        if lengths is None:
            continue
        ok = torch.nonzero(lengths(frames) // getattr(projector, "downsample_rate", 1) >= 1)
        if len(ok):
            need[feature_type] = max(need[feature_type], int(frames[ok[0, 0]]))
    if "firered" in need:
        from llmasr.features.firered import MIN_FRAMES

        need["firered"] = max(need["firered"], MIN_FRAMES)
    return need


def _num_frames(cut, args, feature_type: str) -> int:
    """Feature frames of ``feature_type`` the test dataloader gives ``cut`` (llmasr.data.AsrDataset)."""
    if feature_type == "firered":
        from llmasr.features.firered import SAMPLE_RATE, num_frames

        return num_frames(round(cut.duration * SAMPLE_RATE))
    # (a cut's own stored features are those of the first --feature-type; lhotse stores any
    # other type with the same frame count)
    if cut.has_features and not args.on_the_fly_feats:
        return cut.num_frames
    from lhotse.utils import compute_num_frames

    return compute_num_frames(cut.duration, 0.01, 16000)


def _write_skipped(decode_dir: Path, set_name: str, suffix: str, skipped, num_cuts: int) -> Path:
    """List the cuts of a test set that were not decoded (and so not scored) in
    ``skipped-<set>-<suffix>.txt`` (``cut id<TAB>reason``), or remove an older list."""
    from collections import Counter

    from llmasr.io import atomic_write_text

    path = decode_dir / f"skipped-{set_name}-{suffix}.txt"
    if not skipped:
        path.unlink(missing_ok=True)
        return path
    atomic_write_text(path, "".join(f"{cut_id}\t{reason}\n" for cut_id, reason in sorted(skipped)))
    counts = Counter(reason.split(" (")[0] for _, reason in skipped)
    logging.warning(f"{set_name}: {len(skipped)} of {num_cuts} cuts not decoded and not scored "
                    f"({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}); listed in {path}")
    return path


def _count_ckpt_layout(state_dict) -> Tuple[int, bool, bool]:
    """(number of encoder projectors, MoSE key layout, has LoRA) of a SpeechLLM state dict."""
    import re

    moses = {m.group(1) for k in state_dict for m in [re.match(r"encoder_projector\.(\d+)\.", k)] if m}
    single = any(k.startswith("encoder_projector.proj.") for k in state_dict)
    n = len(moses) if moses else int(single)
    return n, bool(moses), any(".lora_" in k for k in state_dict)


def result_location(args) -> Tuple[Path, str]:
    """(decode dir, file suffix) of a decode run with these flags: its result files are
    ``<dir>/recogs-<set>-<suffix>.txt``, ``errs-...`` and a ``<suffix>`` row in ``wer-summary-<set>.txt``,
    ``<set>`` being :func:`result_set_name` of each ``--test-sets`` entry."""
    return (Path(args.exp_dir) / f"decode-{_checkpoint_tag(args)}-{_options_tag(args)}",
            f"decode-{_options_tag(args)}-{_checkpoint_tag(args)}")


def result_set_name(args, test_set: str) -> str:
    """The ``<set>`` of the result-file names for one ``--test-sets`` entry."""
    return _test_set_name(args, test_set)


def run_decode(args, mose: bool = False) -> Dict[str, float]:
    """The decode recipe: pick/average the checkpoint, build the model, decode every test set,
    write recogs-/errs-/wer-summary- files into ``<exp-dir>/decode-<checkpoint>-<options>/``.
    Returns {test set name: error rate}. Everything that can be checked cheaply is checked before
    the model is built."""
    from llmasr import checkpoint as ckpt_lib
    from llmasr.data import AsrDataModule
    from llmasr.llm import check_llm_dir
    from llmasr.recipes.model_args import split_list

    exp_dir = Path(args.exp_dir)
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"--exp-dir {exp_dir} does not exist")
    if getattr(args, "ctc_weight", 0.0):
        if not 0.0 < args.ctc_weight <= 1.0:
            raise UserError(f"--ctc-weight must be in [0, 1], got {args.ctc_weight}")
        if not args.ctc_mode and getattr(args, "ctc_compress_frames", "none") in (None, "none"):
            raise UserError("--ctc-weight needs the aux CTC's mode: --ctc-mode, or --ctc-compress-frames")
        if mose:
            raise UserError("--ctc-weight supports one speech encoder (not decode_mose.py)")
    # 1. the checkpoint files
    if args.checkpoint:
        ckpt_path = Path(args.checkpoint)
        if not ckpt_path.is_absolute() and not ckpt_path.is_file():
            ckpt_path = exp_dir / args.checkpoint
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: {ckpt_path} does not exist")
    else:
        ckpt_lib.find_checkpoints(exp_dir, args.epoch, args.avg, args.iter if args.iter > 0 else None)
    # 2. the LLM directory, the encoders (FireRedASR-AED: its directory), the test sets
    aed = getattr(args, "model_type", "speechllm") == "aed"
    if aed:
        from llmasr.firered.aed_recipe import check_package_dir

        check_package_dir(args.init_from)
    else:
        check_llm_dir(args.llm_path, getattr(args, "llm_gguf_file", None))
    types = [] if aed else split_list(args.speech_encoder_type)
    for p in ([] if aed else split_list(args.speech_encoder_path)):
        if not Path(p).is_file() and not Path(p).is_dir():
            raise FileNotFoundError(f"--speech-encoder-path {p} does not exist")
    data = AsrDataModule(args)
    test_sets = [t.strip() for t in args.test_sets.split(",") if t.strip()]
    if not test_sets:
        raise UserError("--test-sets is empty")
    cuts = {}
    for name in test_sets:
        cs = data.test_cuts(name)
        first = None if cs is None else next(iter(cs), None)  # (lhotse gives None for an empty file)
        if first is None:
            raise UserError(f"test set {name} ({data.cuts_path(name)}) has no cuts")
        cuts[name] = cs

    decode_dir, suffix = result_location(args)
    with _log_to(decode_dir / f"log-{suffix}-{time.strftime('%Y-%m-%d-%H-%M-%S')}", args.log_level):
        return _run_decode(args, mose, exp_dir, decode_dir, suffix, data, test_sets, cuts, types,
                           ckpt_path if args.checkpoint else None)


@contextlib.contextmanager
def _log_to(path: Path, level: str):
    """Log to ``path`` (and to the console unless the root logger already prints somewhere) for
    the duration of the block; the handlers are removed afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s [%(filename)s:%(lineno)d] %(message)s")
    root = logging.getLogger()
    added = [logging.FileHandler(path, mode="w")]
    if not any(type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler) for h in root.handlers):
        added.append(logging.StreamHandler())
    for h in added:
        h.setFormatter(fmt)
        root.addHandler(h)
    old_level = root.level
    root.setLevel(getattr(logging, level.upper()))
    try:
        yield
    finally:
        root.setLevel(old_level)
        for h in added:
            root.removeHandler(h)
            h.close()


def _run_decode(args, mose, exp_dir, decode_dir, suffix, data, test_sets, cuts, types, ckpt_path):
    from llmasr import checkpoint as ckpt_lib
    from llmasr.features import check_feature_type
    from llmasr.recipes.model_args import build_model_from_args
    from llmasr.scoring import write_results

    logging.info(f"decoding into {decode_dir}")
    logging.info(f"arguments: {vars(args)}")

    # 3. the weights (averaging happens here, before the model is built)
    if args.checkpoint:
        logging.info(f"using checkpoint {ckpt_path}")
        state_dict, source = ckpt_lib.load_checkpoint(ckpt_path)["model"], str(ckpt_path)
    else:
        state_dict = ckpt_lib.averaged_checkpoint(exp_dir, args.epoch, args.avg, args.iter if args.iter > 0 else None)
        source = f"{exp_dir} {_checkpoint_tag(args)}"
    aed = getattr(args, "model_type", "speechllm") == "aed"
    n_proj, ckpt_mose, has_lora = _count_ckpt_layout(state_dict)
    if not aed and (n_proj != len(types) or ckpt_mose != mose):
        raise UserError(
            f"{source} holds {n_proj} encoder projector(s) in the {'MoSE' if ckpt_mose else 'single-encoder'} "
            f"layout, but {len(types)} encoder(s) are configured with {'decode_mose.py' if mose else 'decode.py'} "
            f"(--speech-encoder-type {args.speech_encoder_type})"
        )
    lora_expected = False if aed else bool(args.use_lora and args.unfreeze_llm)
    if has_lora != lora_expected:
        raise UserError(
            f"{source} {'has' if has_lora else 'has no'} LoRA weights but --use-lora {args.use_lora} "
            f"--unfreeze-llm {args.unfreeze_llm} {'does not add' if has_lora else 'adds'} LoRA; pass the training flags"
        )

    # 4. the model
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    model = build_model_from_args(args, mose=mose)
    encoder_feature_types = check_feature_type(getattr(model, "feature_types", model.feature_type), args.feature_type,
                                               getattr(model, "feature_dims", model.feature_dim),
                                               getattr(args, "num_mel_bins", None))
    ckpt_lib.load_model_state(model, state_dict, source=source)
    del state_dict
    model.to(device)
    model.eval()
    if not aed:
        model.merge_lora_for_inference()
    if getattr(args, "decode_dtype", None):
        model.set_decode_dtype(getattr(torch, args.decode_dtype))
        logging.info(f"decode dtype {args.decode_dtype}")

    # 5. decode + score
    gen = generation_options_from_args(args)
    metric, normalize = (args.scoring, args.normalize) if aed else scoring_choice(args, model.prompt_format)
    logging.info(f"scoring: {metric.upper()}, normalisation {normalize or 'default'}")
    rates = {}
    min_frames = min_decodable_frames(model, encoder_feature_types)
    for name in test_sets:
        set_name = _test_set_name(args, name)
        num_cuts, skipped = 0, []
        for c in cuts[name]:
            num_cuts += 1
            for feature_type, need in min_frames.items():
                n = _num_frames(c, args, feature_type)
                if n < need:
                    kind = f"{feature_type} feature frames" if len(min_frames) > 1 else "feature frames"
                    skipped.append((c.id, f"too short to decode ({n} {kind} < {need})"))
                    break
        test_cuts = cuts[name]
        if skipped:
            short = {cut_id for cut_id, _ in skipped}

            def decodable(c) -> bool:
                return c.id not in short

            test_cuts = test_cuts.filter(decodable)
        logging.info(f"decoding {name}: {num_cuts - len(skipped)} cuts")
        loader = data.test_dataloader(test_cuts) if len(skipped) < num_cuts else []
        results = []
        for cut_id, ref, hyp in decode_dataset(model, loader, num_cuts=num_cuts - len(skipped), skipped=skipped,
                                               **gen):
            # the reference as the model was trained to write it (e.g. lower-cased, no spaces)
            if not aed:
                ref = model.prompt_format.transform_text(ref)
            if normalize == "speechllm":
                ref = ref.lower()
            results.append((cut_id, ref, hyp))
        listed = _write_skipped(decode_dir, set_name, suffix, skipped, num_cuts)
        if not results:
            raise UserError(f"test set {name}: none of its {num_cuts} cuts could be decoded (see {listed})")
        rates[set_name] = write_results(
            decode_dir, set_name, suffix, results, mode=metric,
            normalize="none" if normalize == "speechllm" else normalize,
        )
        logging.info(f"{set_name}: {metric.upper()} {rates[set_name]:.2f}%"
                     + (f" over {len(results)} of {num_cuts} cuts ({len(skipped)} skipped)" if skipped else ""))
    logging.info("Done!")
    return rates


def main(argv: Optional[Sequence[str]] = None, mose: bool = False, model_type: str = "speechllm") -> Dict[str, float]:
    """``src/decode.py`` / ``decode_mose.py`` / ``decode_aed.py``: flags (and ``--config`` files) ->
    :func:`run_decode` under inference mode."""
    from llmasr.config import parse_args_with_config

    parser = get_decode_parser(mose=mose, model_type=model_type)
    args = parse_args_with_config(parser, argv, section="decode", inherit="train")
    with torch.inference_mode():
        return run_decode(args, mose=mose)
