"""Learning-rate schedulers driven by the global batch index (and the epoch), icefall style.

The training loop calls ``step_epoch(epoch - 1)`` at the start of every epoch and
``step_batch(batch_idx_train)`` before every optimizer step; the learning rate is a pure function of
(batch, epoch), so a resumed run sets exactly the same rates as an uninterrupted one.

- :class:`FixedLRScheduler` - constant ``base_lr`` (the SpeechLLM recipe's choice), optional linear warm-up.
- :class:`WarmupCosine`     - linear warm-up, then cosine decay to ``min_lr_ratio * base_lr``.
- :class:`Eden`             - the Zipformer schedule (batch- and epoch-dependent decay, warm-up from 0.5).
"""
from __future__ import annotations

import math
from typing import List, Optional

from torch.optim import Optimizer

__all__ = ["LRScheduler", "FixedLRScheduler", "WarmupCosine", "Eden", "build_scheduler", "cosine_curve"]


def cosine_curve(step: float, total: float, peak: float) -> float:
    """Half a cosine from ``peak`` at ``step`` 0 down to 0 at ``total`` (and after it)."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / total))


class LRScheduler:
    """Base class: subclasses implement :meth:`get_lr` from ``self.batch``, ``self.epoch``, ``self.base_lrs``."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self.base_lrs = [group["base_lr"] for group in optimizer.param_groups]
        self.epoch = 0
        self.batch = 0
        self._last_lr = list(self.base_lrs)

    def state_dict(self) -> dict:
        return {"base_lrs": self.base_lrs, "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.epoch = state_dict["epoch"]
        self.batch = state_dict["batch"]
        self._set_lrs()

    def get_last_lr(self) -> List[float]:
        return self._last_lr

    def get_lr(self) -> List[float]:
        raise NotImplementedError

    def step_batch(self, batch: Optional[int] = None) -> None:
        self.batch = self.batch + 1 if batch is None else batch
        self._set_lrs()

    def step_epoch(self, epoch: Optional[int] = None) -> None:
        self.epoch = self.epoch + 1 if epoch is None else epoch
        self._set_lrs()

    def _set_lrs(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def _warmup(batch: int, warmup_steps: int, start: float = 0.0) -> float:
    if warmup_steps <= 0 or batch >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * batch / warmup_steps


class FixedLRScheduler(LRScheduler):
    """Constant learning rate after an optional linear warm-up over ``warmup_steps`` batches."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        w = _warmup(self.batch, self.warmup_steps)
        return [lr * w for lr in self.base_lrs]


class WarmupCosine(LRScheduler):
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, cosine decay until ``decay_steps``."""

    def __init__(self, optimizer: Optimizer, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.0):
        if decay_steps <= warmup_steps:
            raise ValueError(f"--lr-decay-steps ({decay_steps}) must exceed --warmup-steps ({warmup_steps})")
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        if self.batch < self.warmup_steps:
            f = _warmup(self.batch, self.warmup_steps)
        else:
            f = self.min_lr_ratio + cosine_curve(
                self.batch - self.warmup_steps, self.decay_steps - self.warmup_steps, 1 - self.min_lr_ratio
            )
        return [lr * f for lr in self.base_lrs]


class Eden(LRScheduler):
    """Zipformer's Eden: ``lr = base * ((b^2+B^2)/B^2)^-0.25 * ((e^2+E^2)/E^2)^-0.25 * warmup``,
    warm-up rising linearly from ``warmup_start`` to 1 over ``warmup_batches``."""

    def __init__(self, optimizer: Optimizer, lr_batches: float = 7500, lr_epochs: float = 3.5,
                 warmup_batches: float = 500.0, warmup_start: float = 0.5):
        self.lr_batches = lr_batches
        self.lr_epochs = lr_epochs
        self.warmup_batches = warmup_batches
        self.warmup_start = warmup_start
        super().__init__(optimizer)

    def get_lr(self) -> List[float]:
        f = ((self.batch**2 + self.lr_batches**2) / self.lr_batches**2) ** -0.25
        f *= ((self.epoch**2 + self.lr_epochs**2) / self.lr_epochs**2) ** -0.25
        f *= _warmup(self.batch, self.warmup_batches, self.warmup_start)
        return [lr * f for lr in self.base_lrs]


def build_scheduler(name: str, optimizer: Optimizer, warmup_steps: int = 0, decay_steps: int = 0) -> LRScheduler:
    if name == "fixed":
        return FixedLRScheduler(optimizer, warmup_steps=warmup_steps)
    if name == "cosine":
        if decay_steps <= 0:
            raise ValueError("--lr-scheduler cosine needs --lr-decay-steps (total number of batches)")
        return WarmupCosine(optimizer, warmup_steps=warmup_steps, decay_steps=decay_steps)
    if name == "eden":
        return Eden(optimizer, warmup_batches=warmup_steps if warmup_steps > 0 else 500)
    raise ValueError(f"unknown --lr-scheduler {name!r} (choose fixed, cosine or eden)")
