"""Loading a trained model for inference, shared by ``src/decode*.py`` and ``src/transcribe.py``:
the checkpoint choice (``--checkpoint``, or ``--epoch``/``--iter`` with ``--avg``), the weights
(averaged on the fly), the checks that they fit the configured model, building it with the recipe,
device, eval mode, LoRA merge and decode dtype (:func:`llmasr.checkpoint.prepare_for_inference`,
which ``llmasr.firered.decode`` uses too).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from llmasr.config import UserError


def checkpoint_tag(args) -> str:
    """The weights' part of the decode directory name: epoch-E-avg-N, iter-I-avg-N or the file's stem."""
    if args.checkpoint:
        name = Path(args.checkpoint).name
        return name[:-3] if name.endswith(".pt") else name
    if args.iter > 0:
        return f"iter-{args.iter}-avg-{args.avg}"
    return f"epoch-{args.epoch}-avg-{args.avg}"


def choose_checkpoint(args) -> Optional[Path]:
    """Check that the chosen weights exist, before anything is loaded: the ``--checkpoint`` file
    (relative paths also in ``--exp-dir``), returned; or the ``--avg`` files ending at ``--epoch``
    / ``--iter`` (None is returned: :func:`load_weights` averages them)."""
    from llmasr import checkpoint as ckpt_lib

    exp_dir = Path(args.exp_dir)
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_absolute() and not path.is_file():
            path = exp_dir / args.checkpoint
        if not path.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: {path} does not exist")
        return path
    if args.epoch < 1 and args.iter < 1:
        raise UserError("say which weights to use: --checkpoint FILE, or --epoch N [--avg K] (or --iter)")
    ckpt_lib.find_checkpoints(exp_dir, args.epoch, args.avg, args.iter if args.iter > 0 else None)
    return None


def load_weights(args, path: Optional[Path] = None, save: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, its description for messages) of the chosen weights; ``path``: the result of
    :func:`choose_checkpoint` when it was called already; ``save``: write an average (``--avg`` > 1)
    as ``epoch-E-avg-N.pt`` (false on all ranks of a sharded decode but one)."""
    from llmasr import checkpoint as ckpt_lib

    if args.checkpoint:
        path = path or choose_checkpoint(args)
        logging.info(f"using checkpoint {path}")
        return ckpt_lib.load_checkpoint(path)["model"], str(path)
    exp_dir = Path(args.exp_dir)
    state_dict = ckpt_lib.averaged_checkpoint(exp_dir, args.epoch, args.avg, args.iter if args.iter > 0 else None,
                                               save=save)
    return state_dict, f"{exp_dir} {checkpoint_tag(args)}"


def checkpoint_layout(state_dict) -> Tuple[int, bool, bool]:
    """(number of encoder projectors, MoSE key layout, has LoRA) of a SpeechLLM state dict."""
    moses = {m.group(1) for k in state_dict for m in [re.match(r"encoder_projector\.(\d+)\.", k)] if m}
    single = any(k.startswith("encoder_projector.proj.") for k in state_dict)
    n = len(moses) if moses else int(single)
    return n, bool(moses), any(".lora_" in k for k in state_dict)


def check_weights_fit(recipe, args, state_dict, source: str) -> None:
    """A one-line error when the weights were trained with another encoder count/layout or LoRA
    setting than the flags configure (before the model is built)."""
    if not recipe.has_llm:
        return
    types = recipe.encoder_types(args)
    n_proj, ckpt_multi, has_lora = checkpoint_layout(state_dict)
    if n_proj != len(types) or ckpt_multi != recipe.multi_encoder:
        raise UserError(
            f"{source} holds {n_proj} encoder projector(s) in the {'MoSE' if ckpt_multi else 'single-encoder'} "
            f"layout, but {len(types)} encoder(s) are configured with {recipe.decode_script} "
            f"(--speech-encoder-type {args.speech_encoder_type})"
        )
    lora_expected = bool(args.use_lora and args.unfreeze_llm)
    if has_lora != lora_expected:
        raise UserError(
            f"{source} {'has' if has_lora else 'has no'} LoRA weights but --use-lora {args.use_lora} "
            f"--unfreeze-llm {args.unfreeze_llm} {'does not add' if has_lora else 'adds'} LoRA; pass the training flags"
        )


def load_for_inference(recipe, args, state_dict, source: str) -> Tuple[Any, List[str]]:
    """(model ready to decode, the feature type of each encoder): check the weights against the
    flags, set ``--num-threads``, build the recipe's model, check ``--feature-type``, load the
    weights, then device / eval / LoRA merge / ``--decode-dtype``. ``state_dict`` is consumed."""
    from llmasr.checkpoint import inference_device, load_model_state, prepare_for_inference
    from llmasr.features import check_feature_type
    from llmasr.recipes import model_args

    check_weights_fit(recipe, args, state_dict, source)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = inference_device(args.device)
    model = model_args.build_model_from_args(args, recipe=recipe)
    feature_types = check_feature_type(getattr(model, "feature_types", model.feature_type), args.feature_type,
                                       getattr(model, "feature_dims", model.feature_dim),
                                       getattr(args, "num_mel_bins", None))
    load_model_state(model, state_dict, source=source)
    state_dict.clear()  # the caller's reference too: the weights now live in the model
    prepare_for_inference(model, device, getattr(args, "decode_dtype", None), merge_lora=recipe.has_llm)
    return model, feature_types


__all__ = ["check_weights_fit", "checkpoint_layout", "checkpoint_tag", "choose_checkpoint", "load_for_inference",
           "load_weights"]
