"""The decode recipe behind ``src/decode.py`` / ``src/decode_mose.py``: choose or average the
checkpoint, build the model, decode every test set in batches (progress + ETA), and write icefall's
``recogs-*`` / ``errs-*`` / ``wer-summary-*`` files into ``<exp-dir>/decode-<checkpoint>-<options>/``.
Under torchrun every rank decodes a share of each test set and rank 0 writes the files; every rank keeps
its finished batches in partial files that a restarted decode resumes from (llmasr.decoding_shards).
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from llmasr.config import UserError, format_duration
from llmasr.recipes.inference import checkpoint_tag as _checkpoint_tag
from llmasr.recipes.recipe import recipe_of
from llmasr.recipes.speechllm import add_decoding_arguments  # noqa: F401 (its home before the recipes)
from llmasr.vllm_engine import add_engine_arguments, check_vllm_options, import_vllm, make_engine


def decode_dataset(
    model,
    dataloader: Iterable[Dict[str, Any]],
    beam_size: int = 1,
    max_new_tokens: Optional[int] = None,
    log_interval: float = 30.0,
    num_cuts: Optional[int] = None,
    skipped: Optional[List[Tuple[str, str]]] = None,
    on_batch: Optional[Callable[[List[Tuple[str, str]]], None]] = None,
    engine=None,
    **gen_opts,
) -> Iterator[Tuple[str, str, str]]:
    """Decode every batch of ``dataloader`` (dicts with ``features``, ``feature_lens``, ``texts``,
    ``cut_ids``, and ``features_by_type`` for encoders of several feature types) and yield
    ``(cut_id, ref, hyp)``; logs progress, speed and ETA every ``log_interval`` seconds (ETA needs
    ``num_cuts``). The cuts a batch lists in ``"dropped"`` (NaN/inf features, see
    llmasr.data.AsrDataset) are logged and appended to ``skipped`` as (cut id, reason).
    ``on_batch(dropped)``: called once the caller has taken a batch's last result (the partial files
    of a resumable decode), with the batch's dropped (cut id, reason) pairs. ``engine``: a
    :class:`llmasr.vllm_engine.VllmEngine` decoding in place of ``model.decode``."""
    from llmasr.data.dataset import speech_inputs

    device = next(model.parameters()).device
    start = last = time.time()
    done = 0
    audio_sec = 0.0
    for batch_idx, batch in enumerate(dataloader):
        dropped = list(batch.get("dropped", ()))
        for cut_id, reason in dropped:
            logging.warning(f"skipping cut {cut_id}: {reason}")
            if skipped is not None:
                skipped.append((cut_id, reason))
        if not batch["cut_ids"]:
            if on_batch is not None:
                on_batch(dropped)
            continue
        features, feature_lens, more = speech_inputs(batch, device)  # more: features_by_type (mixed front ends)
        hyps = (engine or model).decode(features, feature_lens, beam_size=beam_size, max_new_tokens=max_new_tokens, **more,
                            **gen_opts)
        if len(hyps) != len(batch["cut_ids"]):
            raise RuntimeError(f"batch {batch_idx}: {len(hyps)} hypotheses for {len(batch['cut_ids'])} cuts")
        for cut_id, ref, hyp in zip(batch["cut_ids"], batch["texts"], hyps):
            yield cut_id, ref, hyp
        if on_batch is not None:
            on_batch(dropped)
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


def generation_options_from_args(args) -> Dict[str, Any]:
    """Keyword arguments for the model's ``decode`` / :func:`decode_dataset` from parsed flags (the
    recipe's decoding options)."""
    return recipe_of(args).decoding_options(args)


def get_decode_parser(mose: bool = False, model_type: Optional[str] = None, recipe=None):
    """The decoding parser of a recipe (:func:`llmasr.recipes.recipe.recipe_of`: ``recipe``, or
    the one called ``model_type``, or MoSE for ``mose``; default SpeechLLM)."""
    import argparse

    from llmasr.config import hide_from_help
    from llmasr.recipes.recipe import DECODE_KNOBS

    recipe = recipe_of(None, recipe or model_type, mose)
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--exp-dir", type=str, default=recipe.decode_exp_dir, help="The experiment dir.")
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
    add_scale_arguments(parser)
    recipe.add_decode_arguments(parser)
    if recipe.has_llm:
        add_engine_arguments(parser)
    parser.set_defaults(model_type=recipe.name)
    hide_from_help(parser, DECODE_KNOBS)
    return parser


def add_scale_arguments(parser) -> None:
    """Sharded (torchrun) and resumable decoding (llmasr.decoding_shards)."""
    from llmasr.config import str2bool

    g = parser.add_argument_group("decoding at scale (torchrun --nproc-per-node N; README \"Decoding at scale\")")
    g.add_argument("--resume", type=str2bool, default=True,
                   help="Do not decode again the batches that the partial files of this decode dir hold (a killed decode "
                   "started again continues; they are removed once every test set is scored). false: remove them "
                   "and start over.")
    g.add_argument("--dist-backend", type=str, default="auto", choices=["auto", "nccl", "gloo"],
                   help="Process group of a torchrun decode (auto: nccl on CUDA, gloo on CPU).")
    g.add_argument("--dist-timeout-min", type=float, default=10.0,
                   help="Collective timeout in minutes: how long ranks wait for a lost or hung rank before exiting.")


def _options_tag(args) -> str:
    dtype_tag = f"-{args.decode_dtype}" if getattr(args, "decode_dtype", None) not in (None, "float32") else ""
    engine_tag = "-vllm" if getattr(args, "engine", "hf") == "vllm" else ""  # its hypotheses may differ from hf's
    return recipe_of(args).decoding_options_tag(args) + dtype_tag + engine_tag


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


def result_location(args) -> Tuple[Path, str]:
    """(decode dir, file suffix) of a decode run with these flags: its result files are
    ``<dir>/recogs-<set>-<suffix>.txt``, ``errs-...`` and a ``<suffix>`` row in ``wer-summary-<set>.txt``,
    ``<set>`` being :func:`result_set_name` of each ``--test-sets`` entry."""
    return (Path(args.exp_dir) / f"decode-{_checkpoint_tag(args)}-{_options_tag(args)}",
            f"decode-{_options_tag(args)}-{_checkpoint_tag(args)}")


def result_set_name(args, test_set: str) -> str:
    """The ``<set>`` of the result-file names for one ``--test-sets`` entry."""
    return _test_set_name(args, test_set)


def run_decode(args, mose: bool = False, recipe=None) -> Dict[str, float]:
    """The decode recipe: pick/average the checkpoint, build the model, decode every test set,
    write recogs-/errs-/wer-summary- files into ``<exp-dir>/decode-<checkpoint>-<options>/``.
    Returns {test set name: error rate}. Everything that can be checked cheaply is checked before
    the model is built."""
    from llmasr.data import AsrDataModule
    from llmasr.recipes.inference import choose_checkpoint

    recipe = recipe_of(args, recipe, mose)
    exp_dir = Path(args.exp_dir)
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"--exp-dir {exp_dir} does not exist")
    if getattr(args, "ctc_weight", 0.0):
        if not 0.0 < args.ctc_weight <= 1.0:
            raise UserError(f"--ctc-weight must be in [0, 1], got {args.ctc_weight}")
        if not args.ctc_mode and getattr(args, "ctc_compress_frames", "none") in (None, "none"):
            raise UserError("--ctc-weight needs the aux CTC's mode: --ctc-mode, or --ctc-compress-frames")
        if recipe.multi_encoder:
            raise UserError(f"--ctc-weight supports one speech encoder (not {recipe.decode_script})")
    if getattr(args, "engine", "hf") == "vllm":  # before the model is built: options, then the install
        check_vllm_options(**generation_options_from_args(args))
        import_vllm()
    # 1. the checkpoint files
    ckpt_path = choose_checkpoint(args)
    # 2. the recipe's directories (LLM, encoders; FireRedASR-AED: its package), the test sets
    recipe.check_inputs(args)
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
    fp = _fingerprint_base(args, ckpt_path)  # (before the device is chosen per rank)
    shard = join_decode(args)
    log = decode_dir / f"log-{suffix}-{time.strftime('%Y-%m-%d-%H-%M-%S')}" if shard.is_main else None
    try:
        with _log_to(log, args.log_level, shard):
            return _run_decode(args, recipe, decode_dir, suffix, data, test_sets, cuts, ckpt_path, shard, fp)
    finally:
        from llmasr.training.dist import cleanup_dist

        cleanup_dist()


def join_decode(args):
    """This process's :class:`~llmasr.decoding_shards.DecodeShard`; under torchrun, joins the
    process group (gloo on CPU, nccl on CUDA unless --dist-backend says otherwise) and takes the GPU
    of its LOCAL_RANK."""
    from llmasr.decoding_shards import DecodeShard, world_from_env
    from llmasr.training.dist import setup_dist

    rank, world_size, local_rank = world_from_env()
    shard = DecodeShard(rank, world_size, resume=getattr(args, "resume", True))
    if world_size == 1:
        return shard
    device = str(args.device)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device} with {world_size} ranks: give --device cuda (or auto; each rank takes "
                        "cuda:LOCAL_RANK) or cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda, but no CUDA device is visible")
        args.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    setup_dist(rank, world_size, backend_choice=backend, timeout_min=args.dist_timeout_min)
    return shard


# Flags that cannot change a hypothesis: a partial file written under other values is still valid.
_NOT_IN_FINGERPRINT = ("log_level", "num_workers", "num_threads", "dist_backend", "dist_timeout_min", "resume",
                       "exp_dir", "test_sets", "config")


def _fingerprint_base(args, ckpt_path) -> Dict[str, Any]:
    """What a partial file must have been written with to be resumed from: the checkpoint files
    (name, size, mtime) and every flag that can change a result. Batching (--max-duration) counts
    only with --compat-reference-padding, the one mode whose results depend on the batch."""
    from llmasr.checkpoint import find_checkpoints
    from llmasr.decoding_shards import file_identity

    files = [ckpt_path] if ckpt_path else find_checkpoints(args.exp_dir, args.epoch, args.avg,
                                                          args.iter if args.iter > 0 else None)
    ignore = set(_NOT_IN_FINGERPRINT)
    if not getattr(args, "compat_reference_padding", False):
        ignore.add("max_duration")
    return {"checkpoints": [file_identity(f) for f in files],
            "args": {k: v for k, v in sorted(vars(args).items()) if k not in ignore}}


@contextlib.contextmanager
def _log_to(path: Optional[Path], level: str, shard=None):
    """Log to ``path`` (None: no file; ranks other than 0 of a sharded decode) and to the console
    unless the root logger already prints somewhere, for the duration of the block; the handlers are
    removed afterwards. Lines of a sharded decode name the rank."""
    tag = f"[rank {shard.rank}] " if shard is not None and shard.world_size > 1 else ""
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {tag}[%(filename)s:%(lineno)d] %(message)s")
    root = logging.getLogger()
    added = []
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        added.append(logging.FileHandler(path, mode="w"))
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


def _run_decode(args, recipe, decode_dir, suffix, data, test_sets, cuts, ckpt_path, shard=None, fp=None):
    from llmasr.decoding_shards import DecodeShard, file_identity, fingerprint, remove_partials
    from llmasr.recipes.inference import load_for_inference, load_weights

    shard = shard or DecodeShard()
    logging.info(f"decoding into {decode_dir}" + (f" (rank {shard.rank} of {shard.world_size})"
                                                   if shard.world_size > 1 else ""))
    logging.info(f"arguments: {vars(args)}")
    # 3. the weights (averaging happens here, before the model is built; rank 0 writes the average), 4. the model
    state_dict, source = load_weights(args, ckpt_path, save=shard.is_main)
    model, encoder_feature_types = load_for_inference(recipe, args, state_dict, source)
    engine = make_engine(args, model, generation_options_from_args(args))  # None: --engine hf
    rates = {}
    try:
        for name in test_sets:
            set_name = _test_set_name(args, name)
            set_fp = fingerprint({**(fp or {}), "test_set": file_identity(data.cuts_path(name))})
            rate = _decode_test_set(args, recipe, model, encoder_feature_types, data, name, cuts[name],
                                    decode_dir, suffix, shard.partial(decode_dir, set_name, set_fp), engine)
            if rate is not None:
                rates[set_name] = rate
    finally:
        if engine is not None:
            engine.close()
    if shard.is_main:  # (every set has its result files: nothing left to resume)
        remove_partials(decode_dir, [_test_set_name(args, name) for name in test_sets])
    logging.info("Done!")
    return rates


def _too_short(args, model, encoder_feature_types, cuts) -> Tuple[int, List[Tuple[str, str]]]:
    """(number of cuts, [(cut id, reason)] of those too short for the encoders)."""
    min_frames = min_decodable_frames(model, encoder_feature_types)
    num_cuts, skipped = 0, []
    for c in cuts:
        num_cuts += 1
        for feature_type, need in min_frames.items():
            n = _num_frames(c, args, feature_type)
            if n < need:
                kind = f"{feature_type} feature frames" if len(min_frames) > 1 else "feature frames"
                skipped.append((c.id, f"too short to decode ({n} {kind} < {need})"))
                break
    return num_cuts, skipped


def _loader_over(full, batches):
    """A dataloader like ``full`` (llmasr.data's test dataloader) giving only ``batches``, the
    CutSets its sampler yielded."""
    from torch.utils.data import DataLoader

    return DataLoader(full.dataset, sampler=batches, batch_size=None, num_workers=full.num_workers)


def _decode_test_set(args, recipe, model, encoder_feature_types, data, name, cuts, decode_dir, suffix,
                     partial=None, engine=None) -> Optional[float]:
    """Decode and score one test set (its result files in ``decode_dir``); returns its error rate.
    ``partial`` (llmasr.decoding_shards.PartialResults): this rank decodes its share of the cuts
    that earlier runs' partial files do not hold, appending each batch to its partial file; rank 0
    gathers everything and writes the result files; other ranks return None."""
    from llmasr.decoding_shards import DecodeShard, pending_batches, shard_batches
    from llmasr.scoring import write_results

    # 5. decode + score
    partial = partial or DecodeShard().partial(decode_dir, _test_set_name(args, name), "")
    shard = partial.shard
    gen = generation_options_from_args(args)
    metric, normalize = scoring_choice(args, model.prompt_format) if recipe.has_llm else (args.scoring, args.normalize)
    logging.info(f"scoring: {metric.upper()}, normalisation {normalize or 'default'}")
    set_name = _test_set_name(args, name)
    num_cuts, skipped = _too_short(args, model, encoder_feature_types, cuts)
    done = partial.load()  # (cut ids finished by earlier runs)
    short = {cut_id for cut_id, _ in skipped}

    def decodable(c) -> bool:
        return c.id not in short

    # The one-process plan of batches; ranks and restarts decode whole batches of it.
    full = data.test_dataloader(cuts.filter(decodable) if short else cuts) if len(short) < num_cuts else None
    batches = pending_batches(list(full.sampler) if full is not None else [], done)
    logging.info(f"decoding {name}: {sum(len(b) for b in batches)} cuts"
                 + (f" ({len(done)} decoded before)" if done else ""))
    mine = shard_batches(batches, shard.rank, shard.world_size, log_shares=shard.is_main and shard.world_size > 1)
    num_mine = sum(len(b) for b in mine)
    results, dropped, error = [], [], None
    try:
        partial.open()
        loader = _loader_over(full, mine) if mine else []
        for cut_id, ref, hyp in decode_dataset(model, loader, num_cuts=num_mine, skipped=dropped,
                                               on_batch=partial.commit, engine=engine, **gen):
            # the reference as the model was trained to write it (e.g. lower-cased, no spaces)
            if recipe.has_llm:
                ref = model.prompt_format.transform_text(ref)
            if normalize == "speechllm":
                ref = ref.lower()
            results.append((cut_id, ref, hyp))
            partial.add(cut_id, ref, hyp)
    except Exception as e:  # noqa: BLE001 - passed to every rank by gather(), then raised
        error = e
    gathered = partial.gather(results, dropped, error)
    if gathered is None:
        return None
    results, dropped = gathered
    skipped += dropped
    listed = _write_skipped(decode_dir, set_name, suffix, skipped, num_cuts)
    if not results:
        raise UserError(f"test set {name}: none of its {num_cuts} cuts could be decoded (see {listed})")
    rate = write_results(
        decode_dir, set_name, suffix, results, mode=metric,
        normalize="none" if normalize == "speechllm" else normalize,
    )
    logging.info(f"{set_name}: {metric.upper()} {rate:.2f}%"
                 + (f" over {len(results)} of {num_cuts} cuts ({len(skipped)} skipped)" if skipped else ""))
    return rate


def main(argv: Optional[Sequence[str]] = None, mose: bool = False, model_type: Optional[str] = None) -> Dict[str, float]:
    """``src/decode.py`` / ``decode_mose.py`` / ``decode_aed.py``: flags (and ``--config`` files) ->
    :func:`run_decode` under inference mode."""
    from llmasr.config import parse_args_with_config

    parser = get_decode_parser(mose=mose, model_type=model_type)
    args = parse_args_with_config(parser, argv, section="decode", inherit="train")
    with torch.inference_mode():
        return run_decode(args)
