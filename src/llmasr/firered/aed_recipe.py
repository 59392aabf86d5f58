"""FireRedASR-AED in the shared recipes: ``src/train_aed.py``, ``src/decode_aed.py``, ``src/export_aed.py``.

The training and decoding recipes (:mod:`llmasr.recipes`) drive a model through two calls, the
contract of :class:`llmasr.model.SpeechLLM`:

- ``loss, stats = model(features, feature_lens, texts, cut_ids)``: ``loss`` is the mean over target
  tokens, ``stats`` holds ``loss_sum``, ``num_tokens``, ``num_correct`` (what the loop logs);
- ``model.decode(features, feature_lens, beam_size, max_new_tokens, **options)`` -> texts.

:class:`FireRedAedRecipeModel` is :class:`FireRedAsrAed` with that contract (same parameter names,
so ``epoch-N.pt`` holds the released ``model_state_dict`` keys). Loss: label-smoothed cross-entropy
of the attention decoder over the released tokenizer's ids + ``<eos>``, averaged per token.
Features come from the data module (``--feature-type firered``: FireRedASR's Kaldi fbank + the
model's CMVN, stored or on the fly), SpecAugment from its ``--enable-spec-aug``.

Progressive dropout: ``--dropout-schedule "0:0.0,2000:0.1"`` sets every dropout of the model from
the global batch index (piecewise linear, constant outside the points); the training loop calls
:meth:`FireRedAedRecipeModel.set_batch_count` before each batch (icefall's ``set_batch_count``), so
the schedule continues exactly on resume.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from llmasr.encoders.firered_conformer import ConformerEncoder, set_dropout
from llmasr.features.firered import read_kaldi_cmvn
from llmasr.io import atomic_torch_save, load_state_dict_strict

from .aed import FireRedAsrAed
from .load import check_tokenizer_matches, load_package, load_tokenizer
from .tokenizer import FireRedTokenizer

# What a released FireRedASR-AED directory holds (``--init-from``, ``src/export_aed.py`` output).
PACKAGE_FILES = ("model.pth.tar", "cmvn.ark", "dict.txt", "train_bpe1000.model")
# Sinusoid tables a package may omit (recomputed).
_RECOMPUTED_BUFFERS = ("encoder.positional_encoding.pe", "decoder.positional_encoding.pe")
# Defaults of the released inference_fireredasr_aed.sh.
DECODING_DEFAULTS = dict(beam_size=3, decode_max_len=0, softmax_smoothing=1.25, aed_length_penalty=0.6,
                         eos_penalty=1.0)


def parse_schedule(spec: str) -> Callable[[int], float]:
    """``"0:0.0,2000:0.1"`` -> f(batch), piecewise linear between the points, constant outside."""
    try:
        points = sorted((int(a), float(b)) for a, b in (p.split(":") for p in spec.split(",") if p.strip()))
    except ValueError:
        raise ValueError(f"bad schedule {spec!r}; expected 'batch:value,batch:value,...'") from None
    if not points:
        raise ValueError(f"empty schedule {spec!r}")

    def f(step: int) -> float:
        if step <= points[0][0]:
            return points[0][1]
        for (s0, v0), (s1, v1) in zip(points, points[1:]):
            if step <= s1:
                return v0 + (v1 - v0) * (step - s0) / max(1, s1 - s0)
        return points[-1][1]

    return f


class FireRedAedRecipeModel(FireRedAsrAed):
    """FireRedASR-AED taking transcripts and returning texts (the recipes' model contract).

    ``package_args``: the released package's ``args`` (kept: the export writes them back).
    """

    feature_type = ConformerEncoder.feature_type  # checked against --feature-type by the recipes
    feature_dim = ConformerEncoder.feature_dim

    def __init__(self, package_args: argparse.Namespace, tokenizer: FireRedTokenizer, label_smoothing: float = 0.0,
                 dropout_schedule: str = "", source: str = "<args>"):
        super().__init__(**self.arch_args(package_args, source))
        self.package_args = package_args
        self.tokenizer = tokenizer
        self.label_smoothing = label_smoothing
        self.dropout_at = parse_schedule(dropout_schedule) if dropout_schedule else None

    def set_batch_count(self, batch_count: int) -> None:
        """Called by the training loop with the global batch index before each batch."""
        if self.dropout_at is not None:
            set_dropout(self, self.dropout_at(batch_count))

    def forward(self, features: torch.Tensor, feature_lens: torch.Tensor, texts: Sequence[str],
                cut_ids: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Label-smoothed cross-entropy per target token (transcript ids + ``<eos>``), and stats."""
        targets = [self.tokenizer.encode(t) for t in texts]
        loss_sum, counts = super().forward(features, feature_lens, targets, self.label_smoothing)
        num_tokens, num_correct = int(counts["ntokens"]), int(counts["correct"])
        stats = {
            "loss_sum": float(loss_sum.detach()),
            "num_tokens": num_tokens,
            "num_correct": num_correct,
            "acc": num_correct / max(num_tokens, 1),
            "num_utts": len(targets),
        }
        return loss_sum / max(num_tokens, 1), stats

    def decode_ids(self, features: torch.Tensor, feature_lens: torch.Tensor, beam_size: int = 1,
                   max_new_tokens: Optional[int] = None, softmax_smoothing: float = 1.0, length_penalty: float = 0.0,
                   eos_penalty: float = 1.0) -> List[List[int]]:
        """Beam search (the released algorithm, each utterance with its own step limit) -> the best
        token ids per utterance (no ``<sos>``/``<eos>``). ``max_new_tokens``: FireRedASR's
        decode_max_len (None/0: the utterance's encoder length); ``length_penalty``: its
        aed_length_penalty (GNMT)."""
        hyps = self.transcribe(features, feature_lens, beam_size, 1, max_new_tokens or 0, softmax_smoothing,
                               length_penalty, eos_penalty)
        return [h[0]["yseq"].tolist() for h in hyps]

    def decode(self, features: torch.Tensor, feature_lens: torch.Tensor, beam_size: int = 1,
               max_new_tokens: Optional[int] = None, **options) -> List[str]:
        """:meth:`decode_ids` detokenised (the text the released code prints)."""
        ids = self.decode_ids(features, feature_lens, beam_size, max_new_tokens, **options)
        return [self.tokenizer.detokenize(i) for i in ids]


# --------------------------------------------------------------------------- flags


def add_aed_arguments(parser: argparse.ArgumentParser, training: bool) -> None:
    """The AED flags of the training (``training``) or decoding parser. Call it after the shared
    groups: it also sets the AED defaults of some of their flags (--feature-type firered; training:
    AdamW; decoding: CER)."""
    g = parser.add_argument_group("FireRedASR-AED")
    g.add_argument("--init-from", type=str, required=True, metavar="DIR",
                   help="Released FireRedASR-AED directory (" + ", ".join(PACKAGE_FILES) + "): architecture, "
                   "tokenizer and (training) the initial weights.")
    if training:
        g.add_argument("--label-smoothing", type=float, default=0.1, help="Label smoothing of the cross-entropy.")
        g.add_argument("--dropout-schedule", type=str, default="0:0.0,2000:0.1",
                       help="Dropout of every layer as 'batch:p,batch:p,...' of the global batch index "
                       "(piecewise linear); '' keeps the package's rates.")
        parser.set_defaults(optimizer_type="adamw", base_lr=1e-4, weight_decay=0.01, warmup_steps=500)
    else:
        d = DECODING_DEFAULTS
        g.add_argument("--beam-size", type=int, default=d["beam_size"], help="1 = greedy search.")
        g.add_argument("--decode-max-len", type=int, default=d["decode_max_len"],
                       help="Maximum decoding steps (0: the utterance's encoder length).")
        g.add_argument("--softmax-smoothing", type=float, default=d["softmax_smoothing"],
                       help="Scores are log_softmax(logits / this).")
        g.add_argument("--aed-length-penalty", type=float, default=d["aed_length_penalty"],
                       help="GNMT length penalty of the final ranking.")
        g.add_argument("--eos-penalty", type=float, default=d["eos_penalty"],
                       help="<eos> log-prob multiplier in (0, 1].")
        g.add_argument("--decode-dtype", type=str, default=None, choices=["float32", "bfloat16", "float16"],
                       help="FireRedAsrAed.set_decode_dtype: Linear/Embedding weights in this dtype, encoder and "
                       "beam search under autocast (bfloat16 on CPUs with AVX512-BF16/AMX, float16/bfloat16 on "
                       "CUDA). Default: fp32, the release's results.")
        parser.set_defaults(scoring="cer")
    parser.set_defaults(feature_type="firered", exp_dir="exp/firered_aed", model_type="aed")


def decoding_options(args) -> Dict[str, Any]:
    """Keyword arguments of :meth:`FireRedAedRecipeModel.decode` from the decoding flags."""
    return dict(beam_size=args.beam_size, max_new_tokens=args.decode_max_len or None,
                softmax_smoothing=args.softmax_smoothing, length_penalty=args.aed_length_penalty,
                eos_penalty=args.eos_penalty)


def decoding_options_tag(args) -> str:
    """``beam3`` plus every option that differs from the released defaults (decode directory name)."""
    tag = f"beam{args.beam_size}"
    for flag, short in (("decode_max_len", "maxlen"), ("softmax_smoothing", "ss"), ("aed_length_penalty", "lp"),
                        ("eos_penalty", "eos")):
        if getattr(args, flag) != DECODING_DEFAULTS[flag]:
            tag += f"-{short}{getattr(args, flag):g}"
    return tag


# --------------------------------------------------------------------------- building, exporting


def check_package_dir(model_dir) -> Path:
    """The released directory with all of :data:`PACKAGE_FILES`, or a one-line error."""
    d = Path(model_dir)
    missing = [f for f in PACKAGE_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--init-from {d}: not a FireRedASR-AED directory, missing {', '.join(missing)}")
    return d


def _check_feature_args(args, model_dir: Path) -> None:
    """Features must be normalised with the model's own CMVN: --firered-cmvn for on-the-fly features,
    and the copy local/prepare.sh keeps next to stored ones (<manifest-dir>/firered_cmvn.ark)."""
    on_the_fly = getattr(args, "on_the_fly_feats", False)
    cmvn = getattr(args, "firered_cmvn", None)
    if on_the_fly and not cmvn:
        raise ValueError(f"--on-the-fly-feats true needs the model's CMVN: --firered-cmvn {model_dir / 'cmvn.ark'}")
    manifest_dir = getattr(args, "manifest_dir", None)
    stored = Path(manifest_dir) / "firered_cmvn.ark" if manifest_dir else None
    used = cmvn if on_the_fly else (stored if stored is not None and stored.is_file() else None)
    if used and not np.array_equal(read_kaldi_cmvn(used)[0], read_kaldi_cmvn(model_dir / "cmvn.ark")[0]):
        raise ValueError(f"features normalised with {used}, which differs from the model's {model_dir / 'cmvn.ark'}")


def build_aed_model(args) -> FireRedAedRecipeModel:
    """The model of ``--init-from`` with its released weights (the recipes then load checkpoints)."""
    model_dir = check_package_dir(args.init_from)
    _check_feature_args(args, model_dir)
    path = model_dir / "model.pth.tar"
    package_args, state_dict = load_package(path)
    tokenizer = load_tokenizer(model_dir)
    model = FireRedAedRecipeModel(package_args, tokenizer, getattr(args, "label_smoothing", 0.0),
                                  getattr(args, "dropout_schedule", ""), source=str(path))
    check_tokenizer_matches(model, tokenizer, str(model_dir / "dict.txt"))
    load_state_dict_strict(model, state_dict, str(path), allow_missing=_RECOMPUTED_BUFFERS)
    logging.info(f"FireRedASR-AED from {model_dir}: {sum(p.numel() for p in model.parameters())} parameters")
    return model


def export_released(model: FireRedAedRecipeModel, model_dir, out_dir) -> Path:
    """Write ``model`` as a released FireRedASR-AED directory (``model.pth.tar`` with the package's
    ``args``; ``cmvn.ark``, ``dict.txt``, ``train_bpe1000.model`` copied from ``model_dir``), the
    format ``src/firered_speech2text.py`` and the released code load."""
    model_dir, out_dir = check_package_dir(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"args": model.package_args, "model_state_dict": state_dict}, out_dir / "model.pth.tar")
    for name in PACKAGE_FILES[1:]:
        if (model_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(model_dir / name, out_dir / name)
    logging.info(f"exported {out_dir}")
    return out_dir


__all__ = [
    "DECODING_DEFAULTS",
    "FireRedAedRecipeModel",
    "PACKAGE_FILES",
    "add_aed_arguments",
    "build_aed_model",
    "check_package_dir",
    "decoding_options",
    "decoding_options_tag",
    "export_released",
    "parse_schedule",
]
