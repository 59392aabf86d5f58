"""The training loop: one step, one epoch, validation loss, fault handling.

Works with a plain module, a DDP-wrapped module or a DeepSpeed engine. The model contract
(:class:`llmasr.model.SpeechLLM`) is ``loss, stats = model(features, feature_lens, texts)`` with
``loss`` the mean over label tokens and ``stats`` holding the number of label tokens and of correctly
predicted ones.

Faults: a batch whose forward/backward/step raises is saved to ``exp-dir/batch-<hash>.pt`` (cut ids +
tensors) before the exception propagates. Without a GradScaler, a batch whose loss or gradients are
not finite is skipped (no optimizer step; every rank skips it, the decision is all-reduced) and
counted; ``--max-bad-batches`` of them in a row save the batch and the model under
``exp-dir/bad-batch-<batch>/`` and stop (:mod:`llmasr.training.faults`). SIGTERM/SIGUSR1 stop the
epoch after the batch in progress, with a ``checkpoint-<batch>.pt``. With fp16 the GradScaler skips steps whose gradients overflow
and lowers the scale - a forward that overflows to a non-finite loss included (logged with the cut
ids, counted as ``skipped``, its loss left out of the sums); a scale that keeps collapsing is
reported as an error.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from llmasr.data.dataset import speech_inputs
from llmasr.io import atomic_torch_save, unwrap_model
from llmasr.layers import autocast_to
from llmasr.training.faults import Preempted, StopOnSignal, TooManyBadBatchesError, save_bad_batch_dir, stop_agreed
from llmasr.training.logs import MetricsTracker, Progress, Throughput, metrics_file

__all__ = [
    "NonFiniteLossError",
    "EmptyEpochError",
    "compute_loss",
    "compute_validation_loss",
    "clip_gradients",
    "step_on_batch",
    "train_step",
    "train_one_epoch",
    "save_bad_batch",
    "register_inf_check_hooks",
    "unwrap_model",
]


class NonFiniteLossError(RuntimeError):
    pass


class EmptyEpochError(RuntimeError):
    """An epoch without a single training batch (the recipe explains it from the data module)."""


def is_deepspeed(model) -> bool:
    return hasattr(model, "backward") and hasattr(model, "save_checkpoint") and hasattr(model, "module")


def autocast_ctx(params, device: torch.device):
    return autocast_to(device.type, params.dtype if params.use_autocast else None)


# --------------------------------------------------------------------------- batches


def batch_cut_ids(batch: Dict[str, Any]) -> list:
    return list(batch.get("cut_ids", []))


def save_bad_batch(batch: Dict[str, Any], exp_dir: Path) -> Path:
    """Save ``batch`` (cut ids + CPU tensors) as ``exp_dir/batch-<sha1 of cut ids>.pt``, atomically."""
    ids = batch_cut_ids(batch)
    digest = hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()[:16]
    path = Path(exp_dir) / f"batch-{digest}.pt"
    payload = {
        k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in batch.items()
    }
    payload["cut_ids"] = ids
    return atomic_torch_save(payload, path)


def _stats_to_metrics(loss: torch.Tensor, stats: Dict[str, Any], batch: Dict[str, Any]) -> MetricsTracker:
    tokens = float(_num(stats, ("num_tokens", "tokens", "num_label_tokens")))
    correct = float(_num(stats, ("num_correct", "correct", "correct_tokens"), default=0.0))
    info = MetricsTracker()
    # The cross-entropy alone (comparable with the validation loss); an auxiliary loss added to the
    # optimised loss (--aux-ctc-weight) is tracked under its own name below.
    info["loss"] = float(stats["loss_sum"]) if "loss_sum" in stats else loss.detach().float().item() * tokens
    info["tokens"] = tokens
    info["correct"] = correct
    info["utterances"] = float(len(batch["texts"]))
    info["frames"] = float(batch["feature_lens"].sum().item())
    if "aux_ctc_loss_sum" in stats:  # --aux-ctc-weight: tracked on its own, per aligned token
        info["aux_ctc_loss_sum"] = float(stats["aux_ctc_loss_sum"])
        info["aux_ctc_tokens"] = float(stats["aux_ctc_tokens"])
    return info


def _num(stats: Dict[str, Any], keys, default=None):
    for k in keys:
        if k in stats:
            v = stats[k]
            return v.item() if torch.is_tensor(v) else v
    if default is not None:
        return default
    raise KeyError(f"model stats have none of {keys}; got {sorted(stats)}")


def compute_loss(model, batch: Dict[str, Any], device: torch.device, params, is_training: bool,
                 allow_non_finite: bool = False):
    """Forward one batch. Returns (loss tensor, MetricsTracker).

    A non-finite loss raises :class:`NonFiniteLossError` (batch saved), unless ``allow_non_finite``
    (an enabled GradScaler, or the skipping :func:`step_on_batch`, which skip the step): then the
    tracker holds only ``skipped`` = 1 and the batch's sizes, so that the loss sums stay finite.
    """
    features, feature_lens, more = speech_inputs(batch, device, non_blocking=True)  # more: features_by_type
    with torch.set_grad_enabled(is_training), autocast_ctx(params, device):
        # cut ids: frozen-encoder outputs may be cached by cut (--cache-encoder-outputs)
        loss, stats = model(features, feature_lens, batch["texts"], cut_ids=batch.get("cut_ids"), **more)
    if not torch.isfinite(loss).all():
        if allow_non_finite:
            logging.warning(
                "non-finite loss %s at global batch %d (epoch %d): this step is skipped; cut ids: %s",
                loss.item(), params.batch_idx_train, params.cur_epoch, ", ".join(map(str, batch_cut_ids(batch))),
            )
            return loss, MetricsTracker({"skipped": 1.0, "utterances": float(len(batch["texts"])),
                                         "frames": float(batch["feature_lens"].sum().item())})
        path = save_bad_batch(batch, params.exp_dir)
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()} at global batch {params.batch_idx_train} "
            f"(epoch {params.cur_epoch}); cut ids: {', '.join(map(str, batch_cut_ids(batch)))}; "
            f"batch saved to {path}. Re-run with --inf-check true to find the module producing it."
        )
    return loss, _stats_to_metrics(loss, stats, batch)


# --------------------------------------------------------------------------- one step


def clip_gradients(optimizer, max_norm: float, scaler=None) -> None:
    """Clip the global gradient norm of ``optimizer``'s parameters to ``max_norm`` (> 0), first
    unscaling them when ``scaler`` is an enabled GradScaler."""
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_norm)


def step_on_batch(
    model,
    forward: Callable[[], Tuple[torch.Tensor, Any]],
    optimizer,
    scaler=None,
    grad_clip: float = 0.0,
    before_step: Optional[Callable[[], None]] = None,
    skip_non_finite: bool = False,
) -> Tuple[torch.Tensor, Any]:
    """One optimisation step on one batch; every training loop of the toolkit goes through it.

    ``loss, info = forward()`` (the caller's forward, under its autocast); backward - a DeepSpeed
    engine does its own backward, clipping and step; otherwise through ``scaler`` when it is an
    enabled GradScaler (which skips the step when the gradients are not finite and lowers the
    scale); ``grad_clip`` > 0 clips the global gradient norm (:func:`clip_gradients`);
    ``before_step()`` runs after the backward and before the optimizer step (the lr schedule); then
    the optimizer step, the scaler update and the gradients are cleared. Returns ``(loss, info)``.

    ``skip_non_finite`` (not with an enabled scaler, which has its own test): when the loss or a
    gradient is not finite on any rank, no optimizer step is taken and ``info["skipped"]`` is 1
    (the backward still runs, so that DDP's gradient all-reduce happens on every rank).
    """
    loss, info = forward()
    if is_deepspeed(model):
        model.backward(loss)
        if before_step is not None:
            before_step()
        model.step()
        return loss, info
    scaling = scaler is not None and scaler.is_enabled()
    (scaler.scale(loss) if scaling else loss).backward()
    if skip_non_finite and not scaling and _not_finite_anywhere(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        if isinstance(info, dict):  # a skipped step's loss stays out of the sums (as the scaler's)
            for k in ("loss", "tokens", "correct", "aux_ctc_loss_sum", "aux_ctc_tokens"):
                info.pop(k, None)
            info["skipped"] = 1.0
        return loss, info
    if before_step is not None:
        before_step()
    if grad_clip > 0:
        clip_gradients(optimizer, grad_clip, scaler)
    if scaling:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, info


def _not_finite_anywhere(loss: torch.Tensor, optimizer) -> bool:
    """Whether ``loss`` or a gradient of ``optimizer``'s parameters is not finite here or on any
    other rank (one all-reduced flag)."""
    import torch.distributed as dist

    bad = (~torch.isfinite(loss.detach())).any().float()
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p.grad is not None:
                bad = torch.maximum(bad, (~torch.isfinite(p.grad)).any().float())
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def train_step(params, model, batch, optimizer, scheduler, scaler, device: torch.device) -> MetricsTracker:
    """Forward, backward and optimizer step on one batch (:func:`step_on_batch`); saves the batch
    if anything raises.

    The scheduler is stepped with the global batch index *before* the optimizer step, as in the
    recipe. With an enabled GradScaler, a step whose gradients (or loss) are not finite is skipped
    and the scale lowered (GradScaler semantics).
    """
    scaling = scaler is not None and scaler.is_enabled() and not is_deepspeed(model)
    # Skipping is ours without a scaler; DeepSpeed keeps its own overflow handling.
    skipping = not scaling and not is_deepspeed(model) and params.get("max_bad_batches", 1) > 1
    # ScaledAdam clips by itself (relative to the median norm); AdamW gets a global norm clip.
    clip = params.grad_clip if params.optimizer_type != "scaled_adam" else 0.0
    try:
        _, info = step_on_batch(
            model, lambda: compute_loss(model, batch, device, params, is_training=True,
                                        allow_non_finite=scaling or skipping),
            optimizer, scaler, grad_clip=clip, before_step=lambda: scheduler.step_batch(params.batch_idx_train),
            skip_non_finite=skipping,
        )
    except NonFiniteLossError:
        raise
    except Exception:
        path = save_bad_batch(batch, params.exp_dir)
        logging.error(
            "exception on batch with cut ids %s; batch saved to %s", batch_cut_ids(batch), path
        )
        raise
    return info


def manage_grad_scale(params, scaler, batch_idx: int) -> float:
    """Warn/raise on a collapsing fp16 scale and grow small scales faster than GradScaler would."""
    if not scaler.is_enabled():
        return 1.0
    scale = scaler.get_scale()
    if scale < 0.01:
        logging.warning("grad scale is small: %s", scale)
    if scale < 1.0e-5:
        raise RuntimeError(
            f"grad scale {scale} is too small: the fp16 gradients keep overflowing (global batch "
            f"{params.batch_idx_train}). Try --use-bf16 true, a smaller --base-lr, or --inf-check true."
        )
    # GradScaler's growth interval is fixed; recover faster from a low scale (icefall practice).
    if (batch_idx % 25 == 0 and scale < 2.0) or (batch_idx % 100 == 0 and scale < 8.0) or (
        batch_idx % 400 == 0 and scale < 32.0
    ):
        scaler.update(scale * 2.0)
    return scale


# --------------------------------------------------------------------------- validation


def compute_validation_loss(params, model, valid_dl: Iterable, device: torch.device) -> MetricsTracker:
    was_training = model.training
    model.eval()
    tot = MetricsTracker()
    with torch.no_grad():
        for batch in valid_dl:
            _, info = compute_loss(model, batch, device, params, is_training=False)
            tot = tot + info
    tot.reduce(device)
    if was_training:
        model.train()
    value = tot.normalized().get("loss", math.inf)
    if value < params.best_valid_loss:
        params.best_valid_loss = value
        params.best_valid_epoch = params.cur_epoch
    return tot


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(
    params,
    model,
    optimizer,
    scheduler,
    train_iter: Iterable,
    valid_dl: Optional[Iterable],
    scaler,
    device: torch.device,
    tb_writer=None,
    rank: int = 0,
    world_size: int = 1,
    progress: Optional[Progress] = None,
    save_batch_checkpoint: Optional[Callable[[], None]] = None,
    stop: Optional[StopOnSignal] = None,
) -> None:
    """Train over ``train_iter`` (the rest of the epoch when resuming). Updates ``params``:
    ``batch_idx_train`` (global), ``cur_batch_idx`` (within the epoch), ``train_loss``, best losses.

    ``stop``: after each batch, when a rank has received a stop signal, every rank writes
    ``checkpoint-<batch>.pt`` (``save_batch_checkpoint``) and :class:`Preempted` is raised."""
    model.train()
    tot = MetricsTracker()
    decay = 1.0 - 1.0 / params.reset_interval
    speed = Throughput()
    # Models with step-dependent regularisation (icefall's set_batch_count; FireRedASR-AED's
    # --dropout-schedule) follow the global batch index, which a resumed run restores.
    set_batch_count = getattr(unwrap_model(model), "set_batch_count", None)
    metrics = metrics_file(params, rank)
    for batch in train_iter:
        params.batch_idx_train += 1
        params.cur_batch_idx += 1
        batch_idx = params.cur_batch_idx
        if set_batch_count is not None:
            set_batch_count(params.batch_idx_train)

        info = train_step(params, model, batch, optimizer, scheduler, scaler, device)
        if "skipped" in info and not (scaler is not None and scaler.is_enabled()):
            _count_bad_batch(params, model, batch, rank, tb_writer)
        else:
            params.bad_batches_in_row = 0
        tot = tot.scaled(decay) + info
        params.epoch_loss_sum += info.get("loss", 0.0)  # (a step the grad scaler skipped has none)
        params.epoch_tokens += info.get("tokens", 0.0)
        params.epoch_cuts = params.get("epoch_cuts", 0) + len(batch["texts"]) * world_size
        if progress is not None:
            progress.update(len(batch["texts"]))
        speed.update(batch["feature_lens"], batch["features"].size(1))
        grad_scale = manage_grad_scale(params, scaler, batch_idx) if not is_deepspeed(model) else None

        if batch_idx % params.log_interval == 0 or batch_idx == 1:
            lr = max(scheduler.get_last_lr())
            rates = speed.report()
            logging.info(
                "Epoch %d, batch %d (global %d), loss[%s], tot_loss[%s], batch size %d, lr %.2e%s, %s, %s",
                params.cur_epoch, batch_idx, params.batch_idx_train, info, tot, len(batch["texts"]), lr,
                f", grad_scale {grad_scale}" if scaler is not None and scaler.is_enabled() else "",
                progress if progress is not None else "", Throughput.format(rates),
            )
            write_train_record(metrics, params, info, tot, lr, grad_scale if scaler is not None and scaler.is_enabled() else None)
            if tb_writer is not None:
                step = params.batch_idx_train
                tb_writer.add_scalar("train/learning_rate", lr, step)
                for k in ("samples_per_s", "frames_per_s", "padding"):  # rank 0's
                    tb_writer.add_scalar(f"train/{k}", rates[k], step)
                info.write_summary(tb_writer, "train/current_", step)
                tot.write_summary(tb_writer, "train/tot_", step)
                if scaler is not None and scaler.is_enabled():
                    tb_writer.add_scalar("train/grad_scale", grad_scale, step)

        if valid_dl is not None and params.valid_interval > 0 and params.batch_idx_train % params.valid_interval == 0:
            run_validation(params, model, valid_dl, device, tb_writer)

        saved_here = False
        if save_batch_checkpoint is not None and params.save_every_n > 0 and params.batch_idx_train % params.save_every_n == 0:
            save_batch_checkpoint()
            saved_here = True

        if stop is not None:
            signum = stop_agreed(stop.signum, device)
            if signum:
                path = Path(params.exp_dir) / f"checkpoint-{params.batch_idx_train}.pt"
                if save_batch_checkpoint is not None and not saved_here:
                    save_batch_checkpoint()
                logging.info("stop signal %d: stopped after global batch %d (epoch %d, batch %d), saved %s",
                             signum, params.batch_idx_train, params.cur_epoch, batch_idx, path)
                raise Preempted(path if save_batch_checkpoint is not None else None, signum)

    if params.cur_batch_idx == 0:
        raise EmptyEpochError(
            f"epoch {params.cur_epoch} produced no training batch on rank {rank}: check --max-duration "
            "(larger than the longest cut?), --drop-last and the cut filters (--min-duration/--max-cut-duration)"
        )
    # Epoch loss over all ranks (each rank keeps its own sums, restored per rank on resume).
    totals = MetricsTracker({"loss": params.epoch_loss_sum, "tokens": params.epoch_tokens})
    totals.reduce(device)
    params.train_loss = totals["loss"] / totals["tokens"] if totals["tokens"] > 0 else math.inf
    if params.train_loss < params.best_train_loss:
        params.best_train_loss = params.train_loss
        params.best_train_epoch = params.cur_epoch


def _count_bad_batch(params, model, batch, rank: int, tb_writer) -> None:
    """A skipped non-finite batch: count it; ``--max-bad-batches`` in a row stop the run."""
    params.bad_batches_in_row = params.get("bad_batches_in_row", 0) + 1
    params.bad_batches = params.get("bad_batches", 0) + 1
    logging.warning("skipped non-finite batch at global batch %d (%d in a row, %d in all); cut ids: %s",
                    params.batch_idx_train, params.bad_batches_in_row, params.bad_batches,
                    ", ".join(map(str, batch_cut_ids(batch))))
    if tb_writer is not None:
        tb_writer.add_scalar("train/skipped_batches", params.bad_batches, params.batch_idx_train)
    if params.bad_batches_in_row >= params.get("max_bad_batches", 1):
        out = save_bad_batch_dir(batch, model, params.exp_dir, params.batch_idx_train, rank)
        raise TooManyBadBatchesError(
            f"{params.bad_batches_in_row} batches in a row with a non-finite loss or gradients (--max-bad-batches "
            f"{params.max_bad_batches}), the last at global batch {params.batch_idx_train}, cut ids "
            f"{', '.join(map(str, batch_cut_ids(batch)))}: batch and model saved in {out}/ (try a smaller --base-lr, "
            "--use-bf16 instead of fp16, or --inf-check true)")


def write_train_record(metrics, params, info: MetricsTracker, tot: MetricsTracker, lr: float,
                       grad_scale: Optional[float] = None) -> None:
    """The metrics-file record of a training log line (:mod:`llmasr.training.logs`)."""
    fields = info.normalized()
    if "loss" not in fields:  # a step the grad scaler skipped (non-finite loss)
        fields["loss"] = math.nan
    if "skipped" in info:
        fields["skipped"] = info["skipped"]
    total = tot.normalized()
    if "loss" in total:
        fields["tot_loss"] = total["loss"]
    if grad_scale is not None:
        fields["grad_scale"] = grad_scale
    metrics.write("train", params.cur_epoch, params.batch_idx_train, lr=lr, **fields)


def run_validation(params, model, valid_dl, device, tb_writer=None) -> MetricsTracker:
    t0 = time.time()
    info = compute_validation_loss(params, model, valid_dl, device)
    fields = info.normalized()
    fields.setdefault("loss", math.nan)  # (an empty validation set)
    metrics_file(params).write("valid", params.cur_epoch, params.batch_idx_train, **fields)
    logging.info(
        "Epoch %d, global batch %d, validation: %s (%.1fs)%s",
        params.cur_epoch, params.batch_idx_train, info, time.time() - t0,
        f", max memory {torch.cuda.max_memory_allocated() // 2**20} MB" if torch.cuda.is_available() else "",
    )
    if tb_writer is not None:
        info.write_summary(tb_writer, "train/valid_", params.batch_idx_train)
    return info


# --------------------------------------------------------------------------- debugging


def register_inf_check_hooks(model: nn.Module) -> None:
    """Log every module whose output, and every parameter whose gradient, is not finite (--inf-check)."""

    def check(name: str, what: str, value) -> None:
        tensors = [value] if torch.is_tensor(value) else [v for v in _flatten(value) if torch.is_tensor(v)]
        for i, t in enumerate(tensors):
            if t.is_floating_point() and not torch.isfinite(t).all():
                logging.warning("inf-check: %s %s[%d] is not finite", name, what, i)

    for name, module in model.named_modules():
        name = name or "<model>"
        module.register_forward_hook(lambda m, i, o, _n=name: check(_n, "output", o))
        module.register_full_backward_hook(lambda m, gi, go, _n=name: check(_n, "grad_output", go))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, _n=name: check(_n, "param grad", g))


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flatten(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    elif hasattr(x, "to_tuple"):
        yield from _flatten(x.to_tuple())
    else:
        yield x
