"""FireRedASR-AED fine-tuning (or training from scratch) on lhotse manifests.

Features are computed on the fly from each cut's audio with the released front end (Kaldi fbank of
int16-valued samples + the model's global CMVN), so a fine-tuned model sees exactly what the released
model saw. Loss: label-smoothed cross-entropy of the attention decoder (targets from the released
tokenizer, + ``<eos>``), normalised per token.

Progressive regularisation: dropout and SpecAugment start off and rise on a step schedule, e.g.
``--dropout-schedule "0:0.0,2000:0.1" --spec-aug-schedule "0:0,4000:1"`` (piecewise linear in the
global batch index, constant outside the given points; SpecAugment's value scales mask counts/widths).

Outputs in ``--exp-dir`` (icefall layout): ``epoch-N.pt`` (:mod:`llmasr.checkpoint` layout), ``log/``,
``tensorboard/``, and after decoding ``recogs-*``, ``errs-*``, ``wer-summary-*`` (CER). ``--export-dir``
writes a released-format directory (``model.pth.tar`` + ``cmvn.ark`` + ``dict.txt`` +
``train_bpe1000.model``) usable by ``src/firered_speech2text.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn

from .aed import FireRedAsrAed
from .conformer import set_dropout
from llmasr.features.firered import SAMPLE_RATE, FireRedFeatureExtractor, check_length, pad_features
from llmasr.checkpoint import atomic_torch_save, average_checkpoints, load_checkpoint, save_checkpoint

from .load import load_aed, load_package, load_state_dict_checked
from .tokenizer import FireRedTokenizer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# schedules and augmentation
# ---------------------------------------------------------------------------------------------


def parse_schedule(spec: str) -> Callable[[int], float]:
    """"0:0.0,2000:0.1" -> f(step), piecewise linear between the points, constant outside."""
    try:
        points = sorted((int(a), float(b)) for a, b in (p.split(":") for p in spec.split(",") if p.strip()))
    except ValueError:
        raise ValueError(f"bad schedule {spec!r}; expected 'step:value,step:value,...'") from None
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


def spec_augment(feats: torch.Tensor, lens: torch.Tensor, factor: float, generator: torch.Generator,
                 num_freq_masks: int = 2, max_freq_width: int = 10, num_time_masks: int = 2,
                 max_time_frac: float = 0.05) -> torch.Tensor:
    """Frequency and time masking (mask value 0 = the CMVN mean), scaled by ``factor`` in [0, 1].
    Vectorised over the batch."""
    if factor <= 0:
        return feats
    n, t, f = feats.shape
    dev = feats.device
    keep = torch.ones(n, t, f, dtype=torch.bool, device=dev)
    nf = int(round(num_freq_masks * factor))
    nt = int(round(num_time_masks * factor))
    if nf:
        w = (torch.rand(n, nf, generator=generator) * (max_freq_width * factor + 1)).long().to(dev)
        s = (torch.rand(n, nf, generator=generator) * (f - w.cpu()).clamp(min=1)).long().to(dev)
        bins = torch.arange(f, device=dev)[None, None, :]
        fmask = ((bins >= s[..., None]) & (bins < (s + w)[..., None])).any(1)  # (n, f)
        keep &= ~fmask[:, None, :]
    if nt:
        max_w = (lens.float() * max_time_frac * factor).clamp(min=1).cpu()
        w = (torch.rand(n, nt, generator=generator) * (max_w[:, None] + 1)).long()
        s = (torch.rand(n, nt, generator=generator) * (lens.cpu()[:, None] - w).clamp(min=1)).long()
        frames = torch.arange(t, device=dev)[None, None, :]
        tmask = ((frames >= s.to(dev)[..., None]) & (frames < (s + w).to(dev)[..., None])).any(1)
        keep &= ~tmask[:, :, None]
    return feats * keep


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class FireRedCutDataset(torch.utils.data.Dataset):
    """CutSet batch -> {"features" (N, T, 80), "feature_lens", "texts", "cut_ids"} (FireRed front end)."""

    def __init__(self, cmvn_path: str, dither: float = 0.0):
        self.extractor = FireRedFeatureExtractor(cmvn_path, dither=dither)

    def __getitem__(self, cuts) -> Dict:
        feats, texts, ids = [], [], []
        for cut in cuts:  # feature extraction is per utterance by nature (data-loader workers)
            if cut.sampling_rate != SAMPLE_RATE:
                cut = cut.resample(SAMPLE_RATE)
            audio = cut.load_audio()
            if audio.ndim == 2:
                if audio.shape[0] != 1:
                    raise ValueError(f"cut {cut.id}: expected mono audio, got {audio.shape[0]} channels")
                audio = audio[0]
            # lhotse gives float samples in [-1, 1]; FireRedASR uses int16 values.
            feats.append(torch.from_numpy(self.extractor.from_samples(np.round(audio * 32768.0))))
            check_length(feats[-1].shape[0], f"cut {cut.id}")
            sups = [s.text for s in cut.supervisions if s.text]
            if not sups:
                raise ValueError(f"cut {cut.id}: no supervision text")
            texts.append(" ".join(sups))
            ids.append(cut.id)
        x, lens = pad_features(feats)
        return {"features": x, "feature_lens": lens, "texts": texts, "cut_ids": ids}


def make_dataloader(cuts_path: str, cmvn_path: str, max_duration: float, shuffle: bool, num_workers: int = 0,
                    world_size: int = 1, rank: int = 0, seed: int = 42, num_buckets: int = 30):
    from lhotse import load_manifest_lazy
    from lhotse.dataset import DynamicBucketingSampler, SimpleCutSampler

    if not os.path.isfile(cuts_path):
        raise FileNotFoundError(f"cuts manifest not found: {cuts_path}")
    cuts = load_manifest_lazy(cuts_path)
    if shuffle and num_buckets > 0:
        sampler = DynamicBucketingSampler(cuts, max_duration=max_duration, shuffle=True, num_buckets=num_buckets,
                                          world_size=world_size, rank=rank, seed=seed, drop_last=False)
    else:
        sampler = SimpleCutSampler(cuts, max_duration=max_duration, shuffle=shuffle, world_size=world_size, rank=rank,
                                   seed=seed)
    return torch.utils.data.DataLoader(FireRedCutDataset(cmvn_path), sampler=sampler, batch_size=None,
                                       num_workers=num_workers, persistent_workers=False)


# ---------------------------------------------------------------------------------------------
# model / checkpoints
# ---------------------------------------------------------------------------------------------

ARCH_DEFAULTS = dict(idim=80, n_layers_enc=16, n_head=20, d_model=1280, residual_dropout=0.1, dropout_rate=0.1,
                     kernel_size=33, pe_maxlen=5000, n_layers_dec=16)


def model_files(args) -> Dict[str, str]:
    if args.init_from:
        d = Path(args.init_from)
        return {"cmvn": str(d / "cmvn.ark"), "dict": str(d / "dict.txt"), "spm": str(d / "train_bpe1000.model"),
                "model": str(d / "model.pth.tar")}
    missing = [k for k in ("cmvn", "dict", "spm_model") if not getattr(args, k)]
    if missing:
        raise ValueError(f"training from scratch needs --{', --'.join(m.replace('_', '-') for m in missing)} "
                         "(or --init-from a released model dir)")
    return {"cmvn": args.cmvn, "dict": args.dict, "spm": args.spm_model, "model": ""}


def build_model(args, tokenizer: FireRedTokenizer):
    """-> (model, aed_args dict)."""
    files = model_files(args)
    if files["model"]:
        pkg_args, _ = load_package(files["model"])
        model = load_aed(files["model"])
        aed_args = {k: getattr(pkg_args, k) for k in FireRedAsrAed.ARG_NAMES}
    else:
        aed_args = dict(ARCH_DEFAULTS)
        for k in ("n_layers_enc", "n_layers_dec", "n_head", "d_model", "kernel_size"):
            v = getattr(args, k, None)
            if v is not None:
                aed_args[k] = v
        t2i = tokenizer.token2id
        for sym, key in (("<sos>", "sos_id"), ("<eos>", "eos_id"), ("<pad>", "pad_id")):
            if sym not in t2i:
                raise ValueError(f"{files['dict']}: {sym} missing")
            aed_args[key] = t2i[sym]
        aed_args["odim"] = len(tokenizer)
        model = FireRedAsrAed(**aed_args)
    if model.decoder.odim != len(tokenizer):
        raise ValueError(f"{files['dict']}: {len(tokenizer)} tokens but the model has odim {model.decoder.odim}")
    return model, aed_args


def export_released(model: FireRedAsrAed, aed_args: Dict, files: Dict[str, str], out_dir: Path) -> None:
    """Write a released-format FireRedASR-AED directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(**aed_args)
    atomic_torch_save({"args": ns, "model_state_dict": model.state_dict()}, out_dir / "model.pth.tar")
    for src, name in ((files["cmvn"], "cmvn.ark"), (files["dict"], "dict.txt"), (files["spm"], "train_bpe1000.model")):
        if Path(src).resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exp-dir", required=True)
    p.add_argument("--init-from", default="", help="released FireRedASR-AED dir (model.pth.tar, cmvn.ark, dict.txt, ...)")
    p.add_argument("--cmvn", default="", help="from scratch: cmvn.ark")
    p.add_argument("--dict", default="", help="from scratch: dict.txt")
    p.add_argument("--spm-model", default="", help="from scratch: sentencepiece model")
    p.add_argument("--d-model", dest="d_model", type=int, default=None)
    p.add_argument("--n-layers-enc", type=int, default=None)
    p.add_argument("--n-layers-dec", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--kernel-size", type=int, default=None)
    p.add_argument("--train-cuts", default="")
    p.add_argument("--valid-cuts", default="")
    p.add_argument("--test-cuts", nargs="*", default=[], help="decoded after training (CER files)")
    p.add_argument("--max-duration", type=float, default=200.0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-buckets", type=int, default=30, help="DynamicBucketingSampler buckets; 0 = SimpleCutSampler")
    p.add_argument("--num-epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many batches (0 = no limit)")
    p.add_argument("--start-epoch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dropout-schedule", default="0:0.0,2000:0.1")
    p.add_argument("--spec-aug-schedule", default="0:0.0,4000:1.0")
    p.add_argument("--use-fp16", action="store_true")
    p.add_argument("--use-bf16", action="store_true")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--master-port", type=int, default=12356)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--tensorboard", type=int, default=1)
    p.add_argument("--decode-only", action="store_true", help="skip training; decode --test-cuts")
    p.add_argument("--epoch", type=int, default=0, help="decode: last epoch to use (default: --num-epochs)")
    p.add_argument("--avg", type=int, default=1, help="decode: average the last N epochs")
    p.add_argument("--export-dir", default="", help="write a released-format model dir after training/averaging")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--decode-max-len", type=int, default=0)
    p.add_argument("--softmax-smoothing", type=float, default=1.25)
    p.add_argument("--aed-length-penalty", type=float, default=0.6)
    p.add_argument("--eos-penalty", type=float, default=1.0)
    p.add_argument("--device", default="", help="default: cuda if available")


def _device(args, rank: int) -> torch.device:
    if args.device:
        return torch.device(args.device)
    from llmasr.training.dist import get_device

    return get_device(rank)


def train(rank: int, world_size: int, args) -> None:
    from llmasr.training.dist import cleanup_dist, is_main, setup_dist
    from llmasr.training.optim import build_optimizer
    from llmasr.training.schedulers import build_scheduler

    setup_dist(rank, world_size, args.master_port)
    exp = Path(args.exp_dir)
    exp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + rank)
    device = _device(args, rank)
    files = model_files(args)
    tokenizer = FireRedTokenizer(files["dict"], files["spm"])
    model, aed_args = build_model(args, tokenizer)
    model.to(device)
    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer("adamw", model, args.lr, args.weight_decay)
    scheduler = build_scheduler("fixed", optimizer, warmup_steps=args.warmup_steps)
    amp_dtype = torch.float16 if args.use_fp16 else torch.bfloat16 if args.use_bf16 else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.use_fp16)
    dropout_at, specaug_at = parse_schedule(args.dropout_schedule), parse_schedule(args.spec_aug_schedule)
    gen = torch.Generator().manual_seed(args.seed + rank)
    tb = None
    if args.tensorboard and is_main(rank):
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(exp / "tensorboard"))

    step = 0
    if args.start_epoch > 1:
        path = exp / f"epoch-{args.start_epoch - 1}.pt"
        ckpt = load_checkpoint(path)
        load_state_dict_checked(model, ckpt["model"], str(path))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        step = ckpt.get("batch_idx_train", 0)
    train_dl = make_dataloader(args.train_cuts, files["cmvn"], args.max_duration, True, args.num_workers,
                               world_size, rank, args.seed, args.num_buckets)
    losses: List[float] = []
    done = False
    for epoch in range(args.start_epoch, args.num_epochs + 1):
        train_dl.sampler.set_epoch(epoch)
        model.train()
        t0 = time.time()
        tot_loss, tot_tokens = 0.0, 0
        for batch in train_dl:
            p_drop = dropout_at(step)
            set_dropout(model, p_drop)
            feats = batch["features"].to(device)
            lens = batch["feature_lens"].to(device)
            feats = spec_augment(feats, lens, specaug_at(step), gen)
            targets = [tokenizer.encode(t) for t in batch["texts"]]
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss_sum, stats = ddp_model(feats, lens, targets, label_smoothing=args.label_smoothing)
            ntok = stats["ntokens"].clamp(min=1)
            loss = loss_sum / ntok
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step} (cuts {batch['cut_ids'][:5]})")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_batch(step)
            losses.append(loss.item())
            tot_loss += loss_sum.item()
            tot_tokens += int(ntok)
            if is_main(rank) and (step % args.log_interval == 0 or step == 1):
                acc = stats["correct"].item() / max(1, int(ntok))
                logger.info(f"epoch {epoch} step {step} loss {loss.item():.4f} acc {acc:.3f} grad-norm {gnorm:.2f} "
                            f"lr {scheduler.get_last_lr()[0]:.2e} dropout {p_drop:.3f}")
                if tb is not None:
                    tb.add_scalar("train/loss", loss.item(), step)
                    tb.add_scalar("train/acc", acc, step)
                    tb.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            if args.max_steps and step >= args.max_steps:
                done = True
                break
        scheduler.step_epoch(epoch)
        if is_main(rank):
            logger.info(f"epoch {epoch} done: loss/token {tot_loss / max(1, tot_tokens):.4f} ({time.time() - t0:.1f} s)")
            save_checkpoint(exp / f"epoch-{epoch}.pt", model,
                            params={"cur_epoch": epoch, "batch_idx_train": step, "aed_args": aed_args,
                                    "args": vars(args), "losses": losses[-10000:]},
                            optimizer=optimizer, scheduler=scheduler, grad_scaler=scaler)
        if args.valid_cuts and is_main(rank):
            vloss = validate(model, args.valid_cuts, files["cmvn"], tokenizer, args, device)
            logger.info(f"epoch {epoch} validation loss/token {vloss:.4f}")
            if tb is not None:
                tb.add_scalar("valid/loss", vloss, step)
        if done:
            args.num_epochs = epoch
            break
    if tb is not None:
        tb.close()
    cleanup_dist()


@torch.no_grad()
def validate(model, cuts_path, cmvn, tokenizer, args, device) -> float:
    model.eval()
    tot, ntok = 0.0, 0
    for batch in make_dataloader(cuts_path, cmvn, args.max_duration, False, 0):
        targets = [tokenizer.encode(t) for t in batch["texts"]]
        loss, stats = model(batch["features"].to(device), batch["feature_lens"].to(device), targets,
                            label_smoothing=args.label_smoothing)
        tot += loss.item()
        ntok += int(stats["ntokens"])
    model.train()
    return tot / max(1, ntok)


@torch.no_grad()
def decode(args) -> Dict[str, float]:
    from llmasr.scoring import write_results

    exp = Path(args.exp_dir)
    device = _device(args, 0)
    files = model_files(args)
    tokenizer = FireRedTokenizer(files["dict"], files["spm"])
    model, aed_args = build_model(args, tokenizer)
    last = args.epoch
    if not last:  # latest saved epoch
        saved = [int(p.stem.split("-")[1]) for p in exp.glob("epoch-*.pt") if p.stem.split("-")[1].isdigit()]
        if not saved:
            raise FileNotFoundError(f"no epoch-N.pt in {exp}")
        last = max(saved)
    first = last - args.avg + 1
    if first < 1:
        raise ValueError(f"--epoch {last} --avg {args.avg}: needs epochs {first}..{last}")
    paths = [exp / f"epoch-{e}.pt" for e in range(first, last + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoints not found: {missing}")
    load_state_dict_checked(model, average_checkpoints(paths), ", ".join(map(str, paths)))
    model.to(device).eval()
    if args.export_dir:
        export_released(model, aed_args, files, Path(args.export_dir))
    suffix = f"epoch-{last}-avg-{args.avg}-beam-{args.beam_size}"
    rates = {}
    for cuts_path in args.test_cuts:
        name = Path(cuts_path).name.split(".")[0].replace("cuts_", "").replace("_cuts", "")
        results = []
        for batch in make_dataloader(cuts_path, files["cmvn"], args.max_duration, False, 0):
            hyps = model.transcribe(batch["features"].to(device), batch["feature_lens"].to(device), args.beam_size, 1,
                                    args.decode_max_len, args.softmax_smoothing, args.aed_length_penalty,
                                    args.eos_penalty)
            for cid, ref, h in zip(batch["cut_ids"], batch["texts"], hyps):
                results.append((cid, ref, tokenizer.detokenize(h[0]["yseq"].tolist())))
        rates[name] = write_results(exp, name, suffix, results, mode="cer")
        logger.info(f"{name}: CER {rates[name]:.2f}%")
    return rates


def main(args) -> None:
    from llmasr.training.dist import launch

    if not args.decode_only:
        if not args.train_cuts:
            raise ValueError("--train-cuts is required for training")
        launch(train, args)
    if args.test_cuts or args.export_dir:
        decode(args)


__all__ = ["add_train_args", "main", "parse_schedule", "spec_augment", "FireRedCutDataset", "export_released"]
