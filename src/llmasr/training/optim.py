"""Optimisers: ScaledAdam (the recipe's default) and AdamW.

ScaledAdam (Yao et al., "Zipformer: A faster and better encoder for automatic speech recognition",
ICLR 2024, section 3.5; icefall ``zipformer/optim.py``) is Adam with two changes:

1. The update of a non-scalar tensor is scaled by the tensor's current root-mean-square value, so the
   *relative* change per step is roughly ``lr`` whatever the tensor's magnitude.
2. The scale of each tensor is learned explicitly: with ``p = p' * exp(s)`` the gradient w.r.t. ``s``
   is ``sum(p * grad)``; ``s`` gets its own Adam-like update every ``size_update_period`` steps, kept
   within ``[param_min_rms, param_max_rms]``.

Both updates feed a single momentum buffer ``delta`` (``p += delta`` every step). Gradients are clipped
against ``clipping_scale`` times the median of recent (rms-weighted) gradient norms.

Parameters of the same shape and dtype are stacked and updated as one batch (fewer, larger kernels:
a Qwen2 LoRA has hundreds of same-shaped A/B matrices). The state of a batch lives in the optimizer
state of the batch's first parameter, so ``state_dict()``/``load_state_dict()`` work as usual and
the keys (``delta``, ``exp_avg_sq``, ``param_rms``, ``scale_exp_avg_sq``, ``scale_grads``, ``step``)
match the original recipe's checkpoints.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ScaledAdam", "build_optimizer", "get_parameter_groups"]


def get_parameter_groups(model: nn.Module, lr: float) -> List[dict]:
    """Trainable parameters grouped by learning rate, with their names.

    A module with a float attribute ``lr_scale`` scales the learning rate of everything below it
    (icefall convention). Frozen parameters are left out entirely, so the optimizer keeps no state
    for them. Returns ``[{"params": [...], "names": [...], "lr": lr}, ...]``.
    """
    scales: Dict[str, float] = {
        name: float(m.lr_scale) for name, m in model.named_modules() if hasattr(m, "lr_scale")
    }
    groups: Dict[float, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        cur = lr * scales.get("", 1.0)
        for i in range(1, len(parts)):
            cur *= scales.get(".".join(parts[:i]), 1.0)
        g = groups.setdefault(cur, {"params": [], "names": [], "lr": cur})
        g["params"].append(p)
        g["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters (check --use-lora/--unfreeze-* flags)")
    return list(groups.values())


class ScaledAdam(Optimizer):
    """ScaledAdam with per-shape batched updates.

    Args:
      params: parameter groups as returned by :func:`get_parameter_groups` (a ``"names"`` list per
        group is optional; names only appear in clipping diagnostics), or an iterable of parameters.
      lr: learning rate (relative change of a tensor per step); the recipe uses 0.01.
      clipping_scale: clip the rms-weighted gradient norm to this times the recent median (None: off).
      betas: momentum and second-moment decay.
      scalar_lr_scale: lr factor for the learned tensor scales and for scalar parameters.
      eps: added to the Adam denominator.
      param_min_rms, param_max_rms: bounds on a tensor's rms for the scale update.
      scalar_max: clamp for scalar parameters.
      size_update_period: steps between scale updates.
      clipping_update_period: steps between re-estimates of the clipping threshold.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-2,
        clipping_scale: float | None = None,
        betas: Tuple[float, float] = (0.9, 0.98),
        scalar_lr_scale: float = 0.1,
        eps: float = 1.0e-8,
        param_min_rms: float = 1.0e-5,
        param_max_rms: float = 3.0,
        scalar_max: float = 10.0,
        size_update_period: int = 4,
        clipping_update_period: int = 100,
    ):
        defaults = dict(
            lr=lr,
            clipping_scale=clipping_scale,
            betas=betas,
            scalar_lr_scale=scalar_lr_scale,
            eps=eps,
            param_min_rms=param_min_rms,
            param_max_rms=param_max_rms,
            scalar_max=scalar_max,
            size_update_period=size_update_period,
            clipping_update_period=clipping_update_period,
        )
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        # Names are kept outside the param groups so that state_dict() stays the plain torch layout.
        self.param_names: List[List[str]] = []
        clean = []
        for g in groups:
            g = dict(g)
            names = g.pop("names", None)
            ps = list(g["params"])
            self.param_names.append(list(names) if names is not None else [f"param{i}" for i in range(len(ps))])
            clean.append(g)
        super().__init__(clean, defaults)

    # ------------------------------------------------------------------ batching

    def _batches(self, group: dict, names: Sequence[str]) -> List[Tuple[List[Tensor], List[str]]]:
        """Parameters of one group bucketed by (dtype, shape), in a deterministic order."""
        buckets: Dict[tuple, Tuple[List[Tensor], List[str]]] = defaultdict(lambda: ([], []))
        for p, n in zip(group["params"], names):
            ps, ns = buckets[(str(p.dtype), tuple(p.shape))]
            ps.append(p)
            ns.append(n)
        return [buckets[k] for k in sorted(buckets)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group, names in zip(self.param_groups, self.param_names):
            stacked = []
            for ps, ns in self._batches(group, names):
                p = torch.stack(ps)
                grad = torch.stack([torch.zeros_like(q) if q.grad is None else q.grad for q in ps])
                if grad.is_sparse:
                    raise RuntimeError("ScaledAdam does not support sparse gradients")
                stacked.append((ps, ns, p, grad, self.state[ps[0]]))

            clip = self._clipping_factor(group, stacked)

            for ps, _, p, grad, state in stacked:
                if not state:
                    self._init_state(group, p, state)
                if clip != 1.0:
                    grad.mul_(clip)
                self._update(group, p, grad, state)
                for i, q in enumerate(ps):
                    q.copy_(p[i])
        return loss

    # ------------------------------------------------------------------ state

    def _init_state(self, group: dict, p: Tensor, state: dict) -> None:
        """``p`` is a stack of same-shaped parameters (dim 0 = batch)."""
        state["step"] = 0
        # A single momentum buffer for the Adam-style update and the scale update.
        state["delta"] = torch.zeros_like(p)
        if p[0].numel() > 1:
            state["param_rms"] = _rms(p)
            state["scale_exp_avg_sq"] = torch.zeros_like(state["param_rms"])
            state["scale_grads"] = p.new_zeros((group["size_update_period"], *state["param_rms"].shape))
        state["exp_avg_sq"] = torch.zeros_like(p)

    # ------------------------------------------------------------------ clipping

    def _clipping_factor(self, group: dict, stacked: list) -> float:
        """Factor (<= 1) applied to all gradients of the group this step."""
        clipping_scale = group["clipping_scale"]
        first = stacked[0][4]
        if clipping_scale is None or not first or first["step"] == 0:
            # Nothing to compare against on the very first step (and the state is not built yet).
            return 1.0
        step = first["step"]
        period = group["clipping_update_period"]
        scalar_scale = group["scalar_lr_scale"]

        # Norm of the gradient as the update sees it: scaled by each tensor's rms (scalars by
        # scalar_lr_scale), because the update size is proportional to that.
        sumsq = None
        for _, _, p, grad, state in stacked:
            if p[0].numel() == 1:
                s = (grad.float() ** 2).sum() * scalar_scale**2
            else:
                s = ((grad * state["param_rms"]).float() ** 2).sum()
            sumsq = s if sumsq is None else sumsq + s
        norm = sumsq.sqrt()

        if "model_norms" not in first:
            first["model_norms"] = torch.zeros(period, device=norm.device)
        first["model_norms"][step % period] = norm

        early = [s for s in (10, 20, 40) if s < period]
        if step % period == 0 or step in early:
            norms = first["model_norms"].sort()[0].cpu()
            if step in early:
                norms = norms[-step:]  # only `step` entries have been filled so far
            n = norms.numel()
            quartiles = [norms[min(n - 1, (n // 4) * k)].item() for k in range(5)]
            median = quartiles[2]
            if median != median:
                raise RuntimeError("ScaledAdam: too many gradients were not finite")
            threshold = clipping_scale * median * (2.0 if step in early else 1.0)
            first["model_norm_threshold"] = threshold
            pct = 100.0 * first.get("num_clipped", 0) / n
            first["num_clipped"] = 0
            logging.info(
                "Clipping_scale=%s, grad-norm quartiles %s, threshold=%.3e, percent-clipped=%.1f",
                clipping_scale, " ".join("%.3e" % q for q in quartiles), threshold, pct,
            )

        threshold = first.get("model_norm_threshold")
        if threshold is None:
            return 1.0
        factor = min(1.0, threshold / (norm.item() + 1.0e-20))
        if factor != factor:  # nan norm
            factor = 0.0
        if factor < 1.0:
            first["num_clipped"] = first.get("num_clipped", 0) + 1
        if factor < 0.1:
            logging.warning(
                "Scaling gradients by %s, model_norm_threshold=%s; largest contributor: %s",
                factor, threshold, self._dominant_parameter(stacked, scalar_scale),
            )
        if factor == 0.0:
            for _, _, _, grad, _ in stacked:
                grad.zero_()  # drop inf/nan gradients entirely
        return factor

    @staticmethod
    def _dominant_parameter(stacked: list, scalar_scale: float) -> str:
        best, best_val = "?", -1.0
        for _, ns, p, grad, state in stacked:
            rms = state["param_rms"] if p[0].numel() > 1 else scalar_scale
            per = ((grad * rms).float() ** 2).reshape(len(ns), -1).sum(dim=1)
            i = int(per.argmax())
            if per[i].item() > best_val:
                best, best_val = ns[i], per[i].item()
        return f"{best} (sumsq {best_val:.3e})"

    # ------------------------------------------------------------------ update

    def _update(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        step = state["step"]
        delta = state["delta"]
        delta.mul_(beta1)

        if p[0].numel() == 1:
            self._adam_scalar(group, p, grad, state)
        else:
            period = group["size_update_period"]
            dims = list(range(1, p.ndim))
            # Gradient w.r.t. the log-scale of each tensor, accumulated over the period.
            state["scale_grads"][step % period] = (p * grad).sum(dim=dims, keepdim=True)
            if step % period == period - 1:
                state["param_rms"].copy_(_rms(p))
                if step > 0:
                    self._update_scale(group, p, state)
            self._adam_scaled(group, p, grad, state)
        state["step"] = step + 1

    def _update_scale(self, group: dict, p: Tensor, state: dict) -> None:
        """Adam step on the log-scale of each tensor, written into the momentum buffer."""
        beta1, beta2 = group["betas"]
        scale_grads = state["scale_grads"]
        period = scale_grads.shape[0]
        param_rms = state["param_rms"]
        # One scale update every `period` steps: decay the second moment accordingly.
        beta2_p = beta2**period
        avg_sq = state["scale_exp_avg_sq"]
        avg_sq.mul_(beta2_p).add_((scale_grads**2).mean(dim=0), alpha=1 - beta2_p)
        n_updates = (state["step"] + 1) // period
        bias_correction2 = 1 - beta2_p**n_updates
        lr = group["lr"] * group["scalar_lr_scale"]
        scale_step = -lr * (bias_correction2**0.5) * scale_grads.sum(dim=0) / (avg_sq.sqrt() + group["eps"])
        # Don't shrink tensors that are already tiny, and never grow beyond param_max_rms.
        scale_step.masked_fill_(param_rms < group["param_min_rms"], 0.0)
        scale_step = torch.minimum(scale_step, (group["param_max_rms"] - param_rms) / param_rms)
        state["delta"].add_(p * scale_step, alpha=1 - beta1)

    def _adam_scaled(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (state["step"] + 1)
        if bias_correction2 < 0.99:
            exp_avg_sq = exp_avg_sq / bias_correction2
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        # Update proportional to the tensor's rms: lr is a relative change.
        alpha = -group["lr"] * (1 - beta1) * state["param_rms"].clamp(min=group["param_min_rms"])
        state["delta"].add_(grad / denom * alpha)
        p.add_(state["delta"])

    def _adam_scalar(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        beta1, beta2 = group["betas"]
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction2 = 1 - beta2 ** (state["step"] + 1)
        denom = (exp_avg_sq / bias_correction2).sqrt() + group["eps"]
        state["delta"].add_(grad / denom, alpha=-group["lr"] * group["scalar_lr_scale"] * (1 - beta1))
        p.clamp_(min=-group["scalar_max"], max=group["scalar_max"])
        p.add_(state["delta"])


def _rms(p: Tensor) -> Tensor:
    """Per-tensor rms of a stack, shaped (batch, 1, 1, ...)."""
    return (p**2).mean(dim=list(range(1, p.ndim)), keepdim=True).sqrt()


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0) -> Optimizer:
    """``--optimizer scaled_adam`` (recipe default, clipping_scale 2.0) or ``adamw``."""
    groups = get_parameter_groups(model, lr)
    if name == "scaled_adam":
        return ScaledAdam(groups, lr=lr, clipping_scale=2.0)
    if name == "adamw":
        # No weight decay on biases, norms and other vectors (standard for transformers).
        out = []
        for g in groups:
            mats = [(p, n) for p, n in zip(g["params"], g["names"]) if p.ndim >= 2]
            vecs = [(p, n) for p, n in zip(g["params"], g["names"]) if p.ndim < 2]
            for chunk, wd in ((mats, weight_decay), (vecs, 0.0)):
                if chunk:
                    out.append({"params": [p for p, _ in chunk], "lr": g["lr"], "weight_decay": wd})
        return torch.optim.AdamW(out, lr=lr, betas=(0.9, 0.98), eps=1e-8)
    raise ValueError(f"unknown --optimizer {name!r} (choose scaled_adam or adamw)")


def trainable_parameters(model: nn.Module) -> Iterable[Tensor]:
    return (p for p in model.parameters() if p.requires_grad)
