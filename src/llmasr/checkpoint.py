"""Checkpoints in the icefall / SpeechLLM layout.

``epoch-N.pt`` / ``checkpoint-<batch>.pt`` are ``torch.save``d dicts:

- ``model``: ``model.state_dict()`` minus every parameter with ``requires_grad=False`` as reported
  by ``named_parameters()``. Because ``named_parameters()`` lists a shared tensor only once, a
  tied ``lm_head.weight`` survives (only ``embed_tokens.weight`` is removed) - the same quirk as
  SpeechLLM, so our files have exactly its keys;
- ``optimizer``, ``scheduler``, ``grad_scaler``, ``sampler``: their ``state_dict()`` (or None);
- every training parameter as a top-level key (``cur_epoch``, ``batch_idx_train``, ...).

Averaged files (``epoch-E-avg-N.pt``) are ``{"model": averaged_state_dict}``.

Also read (decoding, ``--pretrained-model-path``): icefall ``whisper_llm_zh`` checkpoints - bare
state dicts written by DeepSpeed's ``zero_to_fp32`` as ``epoch-N/pytorch_model.bin`` (found by
``--epoch/--avg`` when ``epoch-N.pt`` is absent) or a published ``epoch-10-avg-5.pt`` - whose
projector keys ``encoder_projector.linear1/linear2.*`` are mapped to ours (``proj.1/proj.3``) on
load (:func:`to_our_layout`); LoRA / encoder / LLM keys already match.
"""
from __future__ import annotations

import glob
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from llmasr.io import CheckpointError, atomic_torch_save, load_state_dict_strict, load_torch_file, unwrap_model

PathLike = Union[str, Path]

_RESERVED = ("model", "optimizer", "scheduler", "grad_scaler", "sampler")


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``state_dict()`` without frozen parameters (SpeechLLM's ``exclude_frozen_parameters``)."""
    model = unwrap_model(model)
    sd = model.state_dict()
    for name, p in model.named_parameters():
        if not p.requires_grad and name in sd:
            del sd[name]
    return sd


def save_checkpoint(
    path: PathLike,
    model: nn.Module,
    params: Optional[Mapping[str, Any]] = None,
    optimizer=None,
    scheduler=None,
    sampler=None,
    grad_scaler=None,
    model_state: Optional[Dict[str, torch.Tensor]] = None,
) -> None:
    """Write a training checkpoint atomically. ``model_state`` overrides the model's trainable
    state dict (e.g. gathered from DeepSpeed)."""
    ckpt: Dict[str, Any] = {
        "model": model_state if model_state is not None else trainable_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "sampler": sampler.state_dict() if sampler is not None else None,
    }
    for k, v in (params or {}).items():
        if k in _RESERVED:
            raise ValueError(f"training parameter {k!r} clashes with a checkpoint entry")
        ckpt[k] = v
    logging.info(f"saving checkpoint to {path}")
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint dict safely (:func:`llmasr.io.load_torch_file`).

    Returns a dict with at least ``"model"`` (a bare state dict is wrapped)."""
    ckpt = load_torch_file(path, "checkpoint", map_location=map_location)
    path = Path(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if "model" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {"model": ckpt}
        else:
            raise CheckpointError(f"checkpoint {path} has no 'model' entry (keys: {sorted(ckpt)[:10]})")
    sd = ckpt["model"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {path}: 'model' is a {type(sd).__name__}, expected a state dict")
    ckpt["model"] = to_our_layout(sd, source=str(path))
    return ckpt


_LINEAR12 = re.compile(r"^(.*?)linear([12])\.(weight|bias)$")


def remap_linear12_keys(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
    """Map a ``linear1/linear2`` projector state dict (FireRedASR ``encoder_projector``, icefall
    ``whisper_llm_zh`` ``EncoderProjector``) onto :class:`llmasr.projector.Projector` keys ``proj.1`` / ``proj.3``.

    Only keys starting with ``prefix`` are converted (the prefix is kept); every other key is
    returned unchanged.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        rest = key[len(prefix):]
        m = _LINEAR12.match(rest)
        if m is None:
            out[key] = value
            continue
        head, which, kind = m.groups()
        out[f"{prefix}{head}proj.{1 if which == '1' else 3}.{kind}"] = value
    return out


def to_our_layout(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Keys of other trainers' files mapped to ours: ``module.`` (DDP) stripped, icefall
    whisper_llm_zh / FireRedASR projector keys ``encoder_projector[.<k>].linear1/linear2.*`` ->
    ``encoder_projector[.<k>].proj.1/proj.3.*``. Other keys are returned unchanged."""
    sd = dict(state_dict)
    if sd and next(iter(sd)).startswith("module."):  # saved from a DDP-wrapped model
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if any(k.startswith("encoder_projector.") and ".linear" in k for k in sd):
        mapped = remap_linear12_keys(sd, prefix="encoder_projector.")
        clash = len(mapped) != len(sd)
        if clash:
            raise RuntimeError(f"{source} has both linear1/linear2 and proj.1/proj.3 projector keys")
        logging.info(f"{source}: projector keys linear1/linear2 mapped to proj.1/proj.3")
        sd = mapped
    return sd


@torch.no_grad()  # DeepSpeed's zero_to_fp32 saves tensors with requires_grad=True; in-place sums need no autograd
def average_checkpoints(paths: Sequence[PathLike], map_location="cpu") -> Dict[str, torch.Tensor]:
    """Average the ``model`` entries of ``paths`` (icefall / SpeechLLM semantics): element-wise
    sum in the stored dtype, then ``/= N`` (integer tensors ``//= N``); tensors sharing storage
    are processed once."""
    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints: no checkpoints given")
    n = len(paths)
    avg = load_checkpoint(paths[0], map_location)["model"]
    unique: Dict[int, str] = {}
    for k, v in avg.items():
        unique.setdefault(v.data_ptr(), k)
    names = list(unique.values())
    for path in paths[1:]:
        sd = load_checkpoint(path, map_location)["model"]
        missing = [k for k in names if k not in sd]
        if missing:
            raise RuntimeError(f"cannot average: {path} lacks {len(missing)} keys of {paths[0]}, e.g. {missing[:3]}")
        for k in names:
            if sd[k].shape != avg[k].shape:
                raise RuntimeError(f"cannot average: {k} has shape {tuple(sd[k].shape)} in {path}, "
                                   f"{tuple(avg[k].shape)} in {paths[0]}")
            avg[k] += sd[k]
    for k in names:
        if avg[k].is_floating_point():
            avg[k] /= n
        else:
            avg[k] //= n
    return avg


# ---------------------------------------------------------------------- finding files


def epoch_checkpoint_path(exp_dir: PathLike, epoch: int) -> Path:
    """``epoch-<epoch>.pt``, or icefall whisper_llm_zh's ``epoch-<epoch>/pytorch_model.bin`` (its
    DeepSpeed run converts every ZeRO checkpoint there) when only that exists."""
    exp_dir = Path(exp_dir)
    ours = exp_dir / f"epoch-{epoch}.pt"
    if ours.is_file():
        return ours
    converted = exp_dir / f"epoch-{epoch}" / "pytorch_model.bin"
    return converted if converted.is_file() else ours


def epoch_checkpoints(exp_dir: PathLike, epoch: int, avg: int = 1) -> List[Path]:
    """``epoch-(epoch-avg+1).pt .. epoch-<epoch>.pt`` (each may be an ``epoch-N/pytorch_model.bin``
    instead); clear error if the range or a file is missing."""
    exp_dir = Path(exp_dir)
    if epoch < 1:
        raise ValueError(f"--epoch must be >= 1 (got {epoch}); or pass --checkpoint / --iter")
    if avg < 1:
        raise ValueError(f"--avg must be >= 1 (got {avg})")
    first = epoch - avg + 1
    if first < 1:
        raise ValueError(f"--epoch {epoch} --avg {avg} needs epochs {first}..{epoch}, but epochs start at 1")
    paths = [epoch_checkpoint_path(exp_dir, e) for e in range(first, epoch + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        have = sorted(p.name for p in exp_dir.glob("epoch-*.pt"))
        have += sorted(f"{p.parent.name}/{p.name}" for p in exp_dir.glob("epoch-*/pytorch_model.bin"))
        raise FileNotFoundError(f"missing checkpoint(s) {missing}; {exp_dir} has {have or 'no epoch-*.pt files'}")
    return paths


def iter_checkpoints(exp_dir: PathLike, iteration: int, avg: int = 1) -> List[Path]:
    """The ``avg`` newest ``checkpoint-<batch>.pt`` with batch <= ``iteration`` (icefall's
    ``find_checkpoints(exp_dir, -iter)[:avg]``), newest first."""
    exp_dir = Path(exp_dir)
    found = []
    for f in glob.glob(str(exp_dir / "checkpoint-*.pt")):
        m = re.fullmatch(r"checkpoint-(\d+)\.pt", os.path.basename(f))
        if m:
            found.append((int(m.group(1)), Path(f)))
    found.sort(key=lambda x: x[0], reverse=True)
    chosen = [p for b, p in found if b <= iteration][:avg]
    if len(chosen) < avg:
        raise FileNotFoundError(
            f"--iter {iteration} --avg {avg}: only {len(chosen)} checkpoint-<batch>.pt files with batch <= "
            f"{iteration} in {exp_dir} (found batches {[b for b, _ in found]})"
        )
    return chosen


def find_checkpoints(exp_dir: PathLike, epoch: Optional[int] = None, avg: int = 1,
                     iteration: Optional[int] = None) -> List[Path]:
    if iteration is not None and iteration > 0:
        return iter_checkpoints(exp_dir, iteration, avg)
    if epoch is None:
        raise ValueError("give an epoch or an iteration")
    return epoch_checkpoints(exp_dir, epoch, avg)


def averaged_checkpoint(exp_dir: PathLike, epoch: Optional[int] = None, avg: int = 1,
                        iteration: Optional[int] = None, save: bool = True) -> Dict[str, torch.Tensor]:
    """State dict for ``--epoch/--avg`` or ``--iter/--avg``. ``avg > 1`` averages and (``save``)
    writes the result as ``epoch-E-avg-N.pt`` / ``iter-I-avg-N.pt`` (SpeechLLM's layout).

    The average is always recomputed, as the reference recipes do: an existing averaged file is
    never read back, since nothing short of reading every input again (which is what averaging
    costs) could show it still belongs to them."""
    paths = find_checkpoints(exp_dir, epoch, avg, iteration)
    if avg == 1:
        return load_checkpoint(paths[0])["model"]
    tag = f"iter-{iteration}" if iteration else f"epoch-{epoch}"
    out = Path(exp_dir) / f"{tag}-avg-{avg}.pt"
    logging.info(f"averaging {[p.name for p in paths]}")
    sd = average_checkpoints(paths)
    if save:
        atomic_torch_save({"model": sd}, out)
        logging.info(f"wrote {out}")
    return sd


# ---------------------------------------------------------------------- loading into a model


def _describe_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    proj = sorted({m.group(1) for k in keys for m in [re.match(r"encoder_projector\.(\d+)\.", k)] if m})
    if proj:
        return f"MoSE with {len(proj)} encoder projector(s)"
    if any(k.startswith("encoder_projector.proj.") for k in keys):
        return "a single encoder projector"
    return "no SpeechLLM projector"


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load like SpeechLLM (``strict=False``: keys absent from the checkpoint - the frozen encoder
    and base LLM weights - keep their values) but refuse silent mismatches
    (:func:`llmasr.io.load_state_dict_strict`): unexpected keys (the checkpoint belongs to another
    model / encoder count / LoRA setting), missing trainable parameters (e.g. LoRA weights absent),
    shape mismatches; the error explains MoSE/single-encoder and LoRA layout differences.
    """
    model = unwrap_model(model)
    own = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def hints(mismatch) -> List[str]:
        out = []
        layout_ckpt, layout_model = _describe_layout(state_dict), _describe_layout(own)
        if layout_ckpt != layout_model:
            out.append(f"the checkpoint has {layout_ckpt}, the model has {layout_model} "
                       "(single-encoder vs MoSE scripts, or a different number of encoders)")
        if any(".lora_" in k for k in mismatch.unexpected):
            out.append("the checkpoint has LoRA weights the model lacks (pass --use-lora true / --unfreeze-llm true)")
        if any(".lora_" in k for k in mismatch.missing) and not any(".lora_" in k for k in state_dict):
            out.append("the checkpoint has no LoRA weights (was it trained with --unfreeze-llm false or "
                       "--use-lora false? pass the same flags)")
        if mismatch.shapes:
            out.append("different LLM, encoder, projector rate or LoRA rank?")
        return out

    kept = load_state_dict_strict(model, state_dict, source, allow_missing=[k for k in own if k not in trainable],
                                  hints=hints)
    logging.info(f"loaded {len(state_dict)} tensors from {source}; {len(kept)} model tensors keep their "
                 "pretrained values (frozen encoder / LLM)")


# ---------------------------------------------------------------------- inference


def inference_device(name: str = "auto") -> torch.device:
    """``--device``: auto (CUDA when available, else CPU), cpu, cuda, cuda:N."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_for_inference(model: nn.Module, device: torch.device, decode_dtype: Optional[str] = None,
                          merge_lora: bool = True) -> nn.Module:
    """The loaded model on ``device`` in eval mode, its LoRA merged into the LLM weights (models with
    an LLM; generation is then as fast as without LoRA), decoding in ``decode_dtype`` (the model's
    ``set_decode_dtype``; None: as loaded)."""
    model.to(device)
    model.eval()
    if merge_lora:
        model.merge_lora_for_inference()
    if decode_dtype:
        model.set_decode_dtype(getattr(torch, decode_dtype))
        logging.info(f"decode dtype {decode_dtype}")
    return model


__all__ = [
    "inference_device",
    "prepare_for_inference",
    "save_checkpoint",
    "load_checkpoint",
    "average_checkpoints",
    "averaged_checkpoint",
    "trainable_state_dict",
    "epoch_checkpoints",
    "epoch_checkpoint_path",
    "to_our_layout",
    "remap_linear12_keys",
    "iter_checkpoints",
    "find_checkpoints",
    "load_model_state",
]
