"""DeepSpeed (ZeRO-1/2) training: engine set-up, sharded checkpoints, conversion to ``epoch-N.pt``.

Enabled with ``--deepspeed true --deepspeed-config local/conf/ds_zero2.json`` and started by
``torchrun`` or the ``deepspeed`` launcher (one process per GPU). The JSON config is used as given
except for what our flags own:

- ``fp16.enabled`` / ``bf16.enabled`` follow ``--use-fp16`` / ``--use-bf16``;
- ``train_micro_batch_size_per_gpu`` is 1 (batches are lhotse dynamic batches; DeepSpeed only needs
  a number for its bookkeeping), ``gradient_accumulation_steps`` defaults to 1;
- ``gradient_clipping`` comes from ``--grad-clip`` unless the config sets it.

The optimizer is DeepSpeed's when the config has an ``"optimizer"`` section, otherwise ours
(``--optimizer adamw``). ScaledAdam is refused: ZeRO hands the optimizer flattened partitions, which
breaks its per-tensor scale learning. Likewise the learning rate follows the config's
``"scheduler"`` section (e.g. WarmupLR) if there is one, otherwise ``--lr-scheduler``/``--base-lr``.

Checkpoints: every rank writes its shard with ``engine.save_checkpoint(exp_dir, tag)`` (tags
``zero-epoch-N`` and ``zero-checkpoint-B``, frozen parameters excluded; the training state rides
along as client state), then rank 0 rebuilds the full fp32 trainable weights with DeepSpeed's
``zero_to_fp32`` utilities and writes the plain ``epoch-N.pt`` / ``checkpoint-B.pt`` that decoding
and ``--avg`` read.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

__all__ = ["load_ds_config", "init_engine", "save_ds_checkpoint", "zero_to_state_dict", "load_ds_checkpoint"]


def load_ds_config(path: Optional[str], use_fp16: bool, use_bf16: bool, grad_clip: float) -> Dict[str, Any]:
    if not path:
        raise ValueError("--deepspeed true needs --deepspeed-config (e.g. local/conf/ds_zero2.json)")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(p)!r} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {str(p)!r} is not valid JSON: {e}") from None
    cfg.setdefault("fp16", {})["enabled"] = bool(use_fp16)
    cfg.setdefault("bf16", {})["enabled"] = bool(use_bf16)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg.setdefault("gradient_accumulation_steps", 1)
    if "gradient_clipping" not in cfg and grad_clip > 0:
        cfg["gradient_clipping"] = grad_clip
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage >= 3:
        raise ValueError(
            "ZeRO stage 3 is not supported: the frozen speech encoder and LLM are loaded whole on every "
            "rank and only the small trainable part is sharded; use stage 1 or 2"
        )
    return cfg


def init_engine(model: nn.Module, cfg: Dict[str, Any], optimizer_name: str, base_lr: float,
                build_optimizer, build_scheduler):
    """Returns (engine, optimizer, scheduler) - scheduler is ours, driven by the training loop."""
    import deepspeed

    client_opt = None
    if "optimizer" not in cfg:
        if optimizer_name == "scaled_adam":
            raise ValueError(
                "--optimizer scaled_adam cannot be used with DeepSpeed ZeRO (it needs whole tensors); "
                "use --optimizer adamw or put an \"optimizer\" section into the DeepSpeed config"
            )
        client_opt = build_optimizer(model)
        # ZeRO only vouches for its own optimizers; torch's AdamW is fine with stage 1/2.
        cfg.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed broadcasts every parameter from rank 0 as ``p.data.view(torch.uint8)``, which fails
    # for 0-dim tensors (Zipformer's BiasNorm ``log_scale``). Every rank loaded the same files with
    # the same seed, so those need no broadcast: mark them as "not available" (ZeRO-3's flag, which
    # the broadcast skips) while the engine is built.
    scalars = [p for p in model.parameters() if p.dim() == 0]
    for p in scalars:
        p.ds_status = "llmasr-skip-broadcast"
    try:
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=client_opt,
            config=cfg,
        )
    finally:
        for p in scalars:
            del p.ds_status
    inner = client_opt if client_opt is not None else getattr(optimizer, "optimizer", optimizer)
    if "scheduler" in cfg:
        # DeepSpeed's own scheduler (e.g. WarmupLR, icefall's whisper_llm_zh configs), stepped in
        # engine.step() and saved in DeepSpeed's checkpoint.
        logging.info("learning rate from the DeepSpeed config's scheduler %s", cfg["scheduler"].get("type"))
        return engine, inner, EngineLR(engine)
    # Our scheduler writes "lr" into the param groups of the optimizer ZeRO steps.
    scheduler = build_scheduler(inner)
    return engine, inner, scheduler


class EngineLR:
    """Scheduler interface over the DeepSpeed engine's own lr scheduler (which the engine steps)."""

    def __init__(self, engine):
        self.engine = engine

    def step_batch(self, batch=None) -> None:
        pass

    def step_epoch(self, epoch=None) -> None:
        pass

    def get_last_lr(self):
        return list(self.engine.get_lr())

    def state_dict(self) -> dict:
        return {"deepspeed_scheduler": True}  # the state itself is in the ZeRO checkpoint

    def load_state_dict(self, state_dict) -> None:
        pass


def save_ds_checkpoint(engine, exp_dir: Path, tag: str, client_state: Dict[str, Any]) -> None:
    """Collective: every rank must call it."""
    engine.save_checkpoint(str(exp_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=True)


def zero_to_state_dict(exp_dir: Path, tag: str) -> Dict[str, torch.Tensor]:
    """Full fp32 trainable weights of a ZeRO checkpoint (names as in the unwrapped model)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(exp_dir), tag=tag, exclude_frozen_parameters=True)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def load_ds_checkpoint(engine, exp_dir: Path, tag: str) -> Dict[str, Any]:
    """Restore engine (weights, optimizer, ZeRO state); returns the client state."""
    if not (Path(exp_dir) / tag).is_dir():
        raise FileNotFoundError(
            f"DeepSpeed checkpoint {str(Path(exp_dir) / tag)!r} not found (needed to resume with --deepspeed)"
        )
    path, client = engine.load_checkpoint(
        str(exp_dir), tag=tag, load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=engine.lr_scheduler is not None,
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {exp_dir}")
    logging.info("loaded DeepSpeed checkpoint %s", path)
    return client or {}
