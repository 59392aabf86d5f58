"""Projector-only warm-up: train the projector(s) with the aux CTC loss before the first training step.

``--projector-warmup-steps n`` (:mod:`llmasr.aux_ctc` defines the loss and the flags): a few hundred
cheap steps (no LLM forward) give the LLM a readable input from the first real step. The steps go
through the training loop's :func:`llmasr.training.loop.step_on_batch` with their own Adam optimizer
(the main optimizer's state is untouched), a global-norm clip and, with ``--projector-warmup-lr-schedule
cosine``, :func:`llmasr.training.schedulers.cosine_curve` from the warm-up lr down to 0. Every log
interval writes a log line and a ``"warmup"`` record of the metrics file
(:mod:`llmasr.training.logs`: ``loss`` = ``aux_ctc`` = the mean aux CTC loss of the interval).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, Optional

import torch

from llmasr.aux_ctc import WARMUP_LR_SCHEDULES, AuxCtc, AuxCtcConfig
from llmasr.data.datamodule import speech_inputs
from llmasr.training.logs import MetricsFile, metrics_file
from llmasr.training.loop import step_on_batch
from llmasr.training.schedulers import cosine_curve

__all__ = ["maybe_projector_warmup", "projector_warmup"]


def maybe_projector_warmup(params, model, batches: Iterable[dict], device: torch.device) -> Optional[Dict[str, float]]:
    """The training recipe's hook: run :func:`projector_warmup` when ``--projector-warmup-steps``
    > 0 and training starts from scratch (not when resuming: ``--start-epoch`` 1, ``--start-batch``
    0). ``model``: the SpeechLLM (not yet wrapped by DDP/DeepSpeed); ``batches``: the training
    dataloader. Logs ``projector warm-up step i/n: aux CTC loss x (t s)`` lines and writes the
    metrics file's ``"warmup"`` records."""
    cfg = AuxCtcConfig.from_args(params)
    if cfg.warmup_steps <= 0:
        return None
    if getattr(params, "start_epoch", 1) > 1 or getattr(params, "start_batch", 0) > 0:
        logging.info("resuming: skipping the projector warm-up")
        return None
    aux = AuxCtc(cfg, model.tokenizer, model.llm.get_input_embeddings(), model.prompt_format)
    logging.info(f"projector warm-up: {cfg.warmup_steps} steps of aux CTC (mode {cfg.mode}, "
                 f"lr {cfg.warmup_lr}, {cfg.warmup_lr_schedule}), projector only")
    out = projector_warmup(
        model, batches, aux, cfg.warmup_steps, lr=cfg.warmup_lr, lr_schedule=cfg.warmup_lr_schedule, device=device,
        max_seconds=cfg.warmup_max_seconds, log_interval=max(1, getattr(params, "log_interval", 20)),
        metrics=metrics_file(params),
    )
    logging.info(f"projector warm-up done: {out['steps']} steps, aux CTC loss {out['loss']:.3f}, "
                 f"{out['seconds']:.0f} s")
    return out


class _Interval:
    """The mean loss of each log interval, reported to the log / ``on_log`` and the metrics file."""

    def __init__(self, num_steps: int, on_log, metrics: Optional[MetricsFile]):
        self.num_steps, self.on_log, self.metrics = num_steps, on_log, metrics
        self.sum, self.n, self.last = 0.0, 0, float("nan")

    def add(self, loss: torch.Tensor) -> None:
        self.sum += float(loss.detach())
        self.n += 1

    def report(self, step: int, elapsed: float, lr: float, stats: Dict[str, float]) -> None:
        self.last = self.sum / max(self.n, 1)
        self.sum, self.n = 0.0, 0
        if self.metrics is not None:
            self.metrics.write("warmup", 0, step, lr=lr, loss=self.last, aux_ctc=self.last,
                               frame_norm=stats["aux_ctc_frame_norm"], embedding_norm=stats["aux_ctc_embedding_norm"])
        if self.on_log is not None:
            self.on_log(step, self.last, elapsed)
        else:
            logging.info(f"projector warm-up step {step}/{self.num_steps}: aux CTC loss {self.last:.3f}, "
                         f"frame norm {stats['aux_ctc_frame_norm']:.1f} (embedding rows "
                         f"{stats['aux_ctc_embedding_norm']:.1f}) ({elapsed:.0f} s)")

    def final(self) -> float:
        return self.sum / self.n if self.n else self.last


def projector_warmup(
    model,
    batches: Iterable[dict],
    aux: AuxCtc,
    num_steps: int,
    lr: float = 1e-3,
    lr_schedule: str = "constant",
    device: Optional[torch.device] = None,
    max_seconds: float = 0.0,
    log_interval: int = 20,
    grad_clip: float = 5.0,
    on_log: Optional[Callable[[int, float, float], None]] = None,
    metrics: Optional[MetricsFile] = None,
) -> Dict[str, float]:
    """Train only the projector(s) of ``model`` (a SpeechLLM) with the aux CTC loss.

    ``batches`` yields the training batches (dicts with ``features``, ``feature_lens``, ``texts``,
    optionally ``cut_ids``); it is cycled until ``num_steps`` steps (or ``max_seconds``) are done.
    The encoders run without gradient unless they are being fine-tuned; the LLM is not run at all.
    Uses its own Adam optimizer at ``lr`` or, with ``lr_schedule`` "cosine", from ``lr`` down to 0
    over ``num_steps``; run it before the model is wrapped by DDP/DeepSpeed (with several processes
    the result of rank 0 is broadcast). Returns ``{"steps", "loss" (mean of the last log interval),
    "seconds"}``; ``on_log(step, loss, elapsed)`` is called every ``log_interval`` steps (progress
    display) instead of the log line; ``metrics`` gets a ``"warmup"`` record each interval.
    """
    if num_steps <= 0:
        return {"steps": 0, "loss": float("nan"), "seconds": 0.0}
    params = [p for proj in model.projectors for p in proj.parameters() if p.requires_grad]
    if not params:
        raise ValueError("projector warm-up: the projector has no trainable parameters")
    device = device or params[0].device
    if lr_schedule not in WARMUP_LR_SCHEDULES:
        raise ValueError(f"projector warm-up: unknown lr schedule {lr_schedule!r} ({', '.join(WARMUP_LR_SCHEDULES)})")
    opt = torch.optim.Adam(params, lr=lr)
    opt.zero_grad(set_to_none=True)
    total = num_steps  # (num_steps is cut short below when max_seconds runs out)
    interval = _Interval(num_steps, on_log, metrics)
    was_training = model.training
    model.train()
    start = time.time()
    step = 0
    try:
        while step < num_steps:
            progressed = False
            for batch in batches:
                progressed = True
                step_lr = cosine_curve(step, total, lr) if lr_schedule == "cosine" else lr

                def forward(batch=batch):
                    feats, lens, more = speech_inputs(batch, device)  # more: features_by_type (mixed front ends)
                    speech = model.encode(feats, lens, batch.get("cut_ids"), **more)
                    return aux(speech, batch["texts"], batch.get("cut_ids"))

                def set_lr(step_lr=step_lr):
                    for group in opt.param_groups:
                        group["lr"] = step_lr

                loss, stats = step_on_batch(model, forward, opt, grad_clip=grad_clip, before_step=set_lr)
                step += 1
                interval.add(loss)
                elapsed = time.time() - start
                if step % log_interval == 0 or step == num_steps:
                    interval.report(step, elapsed, step_lr, stats)
                if step >= num_steps or (max_seconds > 0 and elapsed >= max_seconds):
                    num_steps = step
                    break
            if not progressed:
                raise ValueError("projector warm-up: the training data yielded no batch")
    finally:
        model.train(was_training)
        opt.zero_grad(set_to_none=True)
    _broadcast_from_rank0(params)
    return {"steps": step, "loss": interval.final(), "seconds": time.time() - start}


def _broadcast_from_rank0(params) -> None:
    # Multi-process training: every rank warmed up on its own batches; start the real training
    # from one set of projector weights (rank 0's), as DDP/DeepSpeed expect identical replicas.
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
