"""The training recipe behind ``src/train.py`` (one encoder) and ``src/train_mose.py`` (MoSE).

icefall conventions: ``--world-size N`` spawns N processes (or run under torchrun/deepspeed),
``--exp-dir`` receives ``epoch-N.pt`` (trainable parameters + optimizer, scheduler, sampler and
grad-scaler state + every option), ``checkpoint-<batch>.pt`` every ``--save-every-n`` batches (the
newest ``--keep-last-k`` kept), ``best-train-loss.pt`` / ``best-valid-loss.pt``, ``log/log-train-*``
and ``tensorboard/``. ``--start-epoch E`` resumes from ``epoch-(E-1).pt``; ``--start-batch B`` from
``checkpoint-B.pt`` in the middle of its epoch (sampler position and RNG states of every rank are
restored, so the resumed run matches an uninterrupted one bit for bit, with any --num-workers; it needs
the checkpoint's number of processes, --start-epoch any number).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from lhotse.utils import fix_random_seed  # random, numpy, torch (+CUDA) and lhotse's cut-id uuids

from llmasr.config import UserError, str2bool
from llmasr.io import atomic_write, prune_stale_temp_files
from llmasr.training import dist as dist_utils
from llmasr.training import faults
from llmasr.training.logs import Progress, make_tb_writer, setup_logger
from llmasr.training.loop import (
    EmptyEpochError,
    register_inf_check_hooks,
    run_validation,
    train_one_epoch,
    unwrap_model,
)
from llmasr.training.optim import build_optimizer
from llmasr.training.schedulers import build_scheduler


class AttributeDict(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


_str2bool = str2bool


def _optional_bool(v):
    """``--deepspeed`` alone means true; ``--deepspeed false`` works too."""
    return _str2bool(v)


# --------------------------------------------------------------------------- arguments


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared training flags, by topic (icefall's names). A "fault tolerance" group of its own
    belongs after these."""
    g = parser.add_argument_group("training")
    c = parser.add_argument_group("checkpointing")
    d = parser.add_argument_group("distributed")
    l = parser.add_argument_group("logging")  # noqa: E741
    d.add_argument("--world-size", type=int, default=1,
                   help="Number of processes (GPUs) for DDP; ignored under torchrun/deepspeed launchers.")
    d.add_argument("--master-port", type=int, default=12354, help="Master port for DDP rendezvous.")
    l.add_argument("--tensorboard", type=_str2bool, default=True, help="Write tensorboard logs (rank 0).")
    g.add_argument("--num-epochs", type=int, default=10, help="Train up to and including this epoch.")
    g.add_argument("--start-epoch", type=int, default=1,
                   help="Resume from exp-dir/epoch-(start_epoch-1).pt when > 1.")
    g.add_argument("--start-batch", type=int, default=0,
                   help="Resume from exp-dir/checkpoint-<start_batch>.pt (overrides --start-epoch).")
    c.add_argument("--exp-dir", type=Path, default=Path("exp/speechllm"),
                   help="Experiment directory: checkpoints, log/, tensorboard/.")
    c.add_argument("--pretrained-model-path", type=str, default=None,
                   help="Initialise the trainable weights from this checkpoint (e.g. epoch-4-avg-3.pt); "
                   "optimizer state is not loaded.")
    g.add_argument("--base-lr", type=float, default=0.01, help="Base learning rate (ScaledAdam: 0.01).")
    g.add_argument("--optimizer", dest="optimizer_type", type=str, default="scaled_adam",
                   choices=["scaled_adam", "adamw"], help="ScaledAdam (the recipe's, lr 0.01) or AdamW.")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only).")
    g.add_argument("--projector-lr-scale", type=float, default=1.0,
                   help="The projector's learning rate is --base-lr times this (icefall's lr_scale). 0 keeps a "
                   "projector aligned by --projector-warmup-steps fixed while the LLM (LoRA) learns to read it.")
    g.add_argument("--lr-scheduler", type=str, default="fixed", choices=["fixed", "cosine", "eden"],
                   help="fixed (the recipe's), cosine (needs --lr-decay-steps) or eden.")
    g.add_argument("--warmup-steps", type=int, default=0, help="Linear learning-rate warm-up, in batches.")
    g.add_argument("--lr-decay-steps", type=int, default=0, help="Total batches of the cosine schedule.")
    g.add_argument("--grad-clip", type=float, default=5.0,
                   help="Max gradient norm for AdamW / DeepSpeed (ScaledAdam clips relative to the "
                   "median norm itself); 0 disables.")
    g.add_argument("--seed", type=int, default=42, help="Random seed.")
    g.add_argument("--use-fp16", type=_str2bool, default=None,
                   help="fp16 autocast + GradScaler (default: true on CUDA unless --use-bf16, as SpeechLLM; "
                   "false on CPU).")
    g.add_argument("--use-bf16", type=_str2bool, default=False, help="bf16 autocast.")
    g.add_argument("--grad-checkpointing", type=_str2bool, default=False,
                   help="Activation checkpointing of the LLM's decoder layers: their activations are recomputed in "
                   "the backward pass (less memory for long batches on GPUs, about a third more LLM compute).")
    g.add_argument("--cache-encoder-outputs", type=_str2bool, default=False,
                   help="Keep the frozen encoder's output of every cut in CPU memory and reuse it in later "
                   "steps/epochs (small corpora: the demo; needs fixed features - no SpecAugment or MUSAN).")
    g.add_argument("--encoder-cache-max-gb", type=float, default=4.0,
                   help="Memory limit of --cache-encoder-outputs per process (cuts beyond it are re-encoded).")
    l.add_argument("--inf-check", type=_str2bool, default=False,
                   help="Hooks that log modules producing non-finite outputs/gradients (slow).")
    c.add_argument("--save-every-n", type=int, default=4000,
                   help="Save exp-dir/checkpoint-<global batch>.pt every this many batches (0: never).")
    c.add_argument("--keep-last-k", type=int, default=30, help="Keep only the newest k checkpoint-*.pt.")
    l.add_argument("--valid-interval", type=int, default=5000,
                   help="Compute the validation loss every this many batches (and after every epoch).")
    l.add_argument("--log-interval", type=int, default=50, help="Log training stats every this many batches.")
    l.add_argument("--reset-interval", type=int, default=200,
                   help="Time constant (batches) of the running training loss in the log.")
    d.add_argument("--find-unused-parameters", type=_str2bool, default=False,
                   help="DDP find_unused_parameters (only needed for custom models with unused trainable parameters).")
    d.add_argument("--deepspeed", type=_optional_bool, nargs="?", const=True, default=False,
                   help="Train with DeepSpeed (launch with torchrun or deepspeed).")
    d.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", type=str, default=None,
                   help="DeepSpeed JSON config, e.g. local/conf/ds_zero2.json.")
    d.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK env is used
    faults.add_fault_tolerance_arguments(parser)


def get_parser(mose: bool = False, model_type: Optional[str] = None, recipe=None) -> argparse.ArgumentParser:
    """The training parser of a recipe (:func:`llmasr.recipes.recipe.recipe_of`: ``recipe``, or the
    one called ``model_type``, or MoSE for ``mose``; default SpeechLLM)."""
    from llmasr.config import hide_from_help
    from llmasr.recipes.recipe import TRAIN_KNOBS, recipe_of

    recipe = recipe_of(None, recipe or model_type, mose)
    parser = argparse.ArgumentParser(description=recipe.train_description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_arguments(parser)
    recipe.add_train_arguments(parser)
    parser.set_defaults(model_type=recipe.name)
    hide_from_help(parser, TRAIN_KNOBS)
    return parser


def get_params() -> AttributeDict:
    """Training state that is not a command-line option (saved in every checkpoint)."""
    return AttributeDict(
        best_train_loss=float("inf"),
        best_valid_loss=float("inf"),
        best_train_epoch=-1,
        best_valid_epoch=-1,
        batch_idx_train=0,
        cur_epoch=0,
        cur_batch_idx=0,
        epoch_loss_sum=0.0,
        epoch_tokens=0.0,
        epoch_cuts=0,
        env_info=get_env_info(),
    )


def get_env_info() -> Dict[str, Any]:
    import platform
    import socket

    import transformers

    return {
        "torch-version": torch.__version__,
        "torch-cuda-available": torch.cuda.is_available(),
        "transformers-version": transformers.__version__,
        "python-version": platform.python_version(),
        "hostname": socket.gethostname(),
    }


# --------------------------------------------------------------------------- RNG state


def get_rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rank_states(params, sampler=None) -> List[Dict[str, Any]]:
    """Per-rank state a mid-epoch resume needs: RNG states, the rank's sampler position and running
    epoch loss (collective when distributed; element r belongs to rank r)."""
    mine = {"rng": get_rng_state(), "epoch_loss_sum": params.epoch_loss_sum, "epoch_tokens": params.epoch_tokens,
            "sampler": sampler.state_dict() if sampler is not None else None}
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


# --------------------------------------------------------------------------- checkpoints

_KEEP_OUT_OF_PARAMS = {"local_rank"}


def _params_to_save(params: AttributeDict, **extra) -> Dict[str, Any]:
    out = {k: v for k, v in params.items() if k not in _KEEP_OUT_OF_PARAMS}
    out.update(extra)
    return out


class Checkpointer:
    """Writes epoch/batch checkpoints (plain or DeepSpeed) and prunes old ones."""

    def __init__(self, params, model, optimizer, scheduler, scaler, rank: int, world_size: int):
        self.params = params
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.rank = rank
        self.world_size = world_size
        self.sampler = None
        self.exp_dir = Path(params.exp_dir)

    def _write(self, path: Path, ds_tag: str, rank_states) -> None:
        from llmasr.checkpoint import save_checkpoint

        params = _params_to_save(self.params, rank_states=rank_states)
        sampler = self.sampler
        if self.params.deepspeed:
            from llmasr.training.deepspeed import save_ds_checkpoint, zero_to_state_dict

            client = {"params": params, "sampler": sampler.state_dict() if sampler is not None else None,
                      "scheduler": self.scheduler.state_dict()}
            save_ds_checkpoint(self.model, self.exp_dir, ds_tag, client)
            dist_utils.barrier()
            if self.rank == 0:
                # The plain checkpoint (what decoding and --avg read) from the ZeRO shards.
                sd = zero_to_state_dict(self.exp_dir, ds_tag)
                save_checkpoint(path, model=unwrap_model(self.model), params=params, scheduler=self.scheduler,
                                sampler=sampler, model_state=sd)
            dist_utils.barrier()
            return
        if self.rank != 0:
            return
        save_checkpoint(
            path,
            model=unwrap_model(self.model),
            params=params,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=sampler,
            grad_scaler=self.scaler,
        )

    def save_epoch(self) -> None:
        p = self.params
        path = self.exp_dir / f"epoch-{p.cur_epoch}.pt"
        self._write(path, f"zero-epoch-{p.cur_epoch}", gather_rank_states(p, self.sampler))
        if self.rank == 0:
            logging.info("saved %s", path)
            if p.best_train_epoch == p.cur_epoch:
                atomic_write(self.exp_dir / "best-train-loss.pt", lambda tmp: shutil.copyfile(path, tmp))
            if p.best_valid_epoch == p.cur_epoch:
                atomic_write(self.exp_dir / "best-valid-loss.pt", lambda tmp: shutil.copyfile(path, tmp))

    def save_batch(self) -> None:
        p = self.params
        path = self.exp_dir / f"checkpoint-{p.batch_idx_train}.pt"
        self._write(path, f"zero-checkpoint-{p.batch_idx_train}", gather_rank_states(p, self.sampler))
        if self.rank == 0:
            logging.info("saved %s", path)
            self._prune()
        dist_utils.barrier()

    def _prune(self) -> None:
        k = self.params.keep_last_k
        if k <= 0:
            return
        found = []
        for f in self.exp_dir.glob("checkpoint-*.pt"):
            m = re.fullmatch(r"checkpoint-(\d+)\.pt", f.name)
            if m:
                found.append((int(m.group(1)), f))
        for n, f in sorted(found)[:-k]:
            f.unlink(missing_ok=True)
            shutil.rmtree(self.exp_dir / f"zero-checkpoint-{n}", ignore_errors=True)


def resume_path(params) -> Optional[Path]:
    if params.start_batch > 0:
        return Path(params.exp_dir) / f"checkpoint-{params.start_batch}.pt"
    if params.start_epoch > 1:
        return Path(params.exp_dir) / f"epoch-{params.start_epoch - 1}.pt"
    return None


def _mid_epoch_rank_state(resumed: Dict[str, Any], ckpt_path: Path, rank: int, world_size: int) -> Dict[str, Any]:
    """This rank's part of a batch checkpoint (RNG, sampler position, epoch loss), or a UserError
    if it cannot resume this run in the middle of its epoch."""
    states = resumed.get("rank_states") or []
    if len(states) != world_size:
        raise UserError(f"{ckpt_path} was written by {len(states)} processes, this run has {world_size}: resume in the "
                        f"middle of an epoch with {len(states)} processes, or from an epoch-N.pt (--start-epoch) "
                        "with any number")
    if states[rank].get("sampler") is None:
        raise UserError(f"{ckpt_path} has no per-rank sampler position (written by an older version): resume from "
                        "an epoch-N.pt with --start-epoch")
    return states[rank]


_RESTORED_KEYS = ("best_train_epoch", "best_valid_epoch", "batch_idx_train", "best_train_loss", "best_valid_loss")
_MID_EPOCH_KEYS = ("cur_epoch", "cur_batch_idx", "epoch_cuts")


# --------------------------------------------------------------------------- run


def _set_precision(params) -> None:
    if params.use_fp16 is None:  # not resolved by main() (run() called directly)
        params.use_fp16 = torch.cuda.is_available() and not params.use_bf16
    if params.use_fp16 and params.use_bf16:
        raise ValueError("--use-fp16 and --use-bf16 are exclusive")
    if params.use_bf16:
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("--use-bf16 true but this GPU does not support bfloat16")
        params.dtype, params.use_autocast = torch.bfloat16, True
    elif params.use_fp16:
        params.dtype, params.use_autocast = torch.float16, True
    else:
        params.dtype, params.use_autocast = torch.float32, False


def _llm_dtype(params, recipe) -> Any:
    """The recipe loads the (frozen) LLM in the AMP dtype; its LoRA weights stay float32 (peft).
    Full fine-tuning keeps float32 master weights (GradScaler cannot unscale fp16 gradients)."""
    if not recipe.has_llm:  # float32 master weights
        return None
    if getattr(params, "llm_dtype", "auto") not in (None, "auto"):
        return params.llm_dtype
    if params.use_autocast and (params.use_lora or not params.unfreeze_llm):
        return params.dtype
    return torch.float32


def count_cuts(cuts) -> Optional[int]:
    """Number of cuts of an eager CutSet, or of a lazy one read from a manifest (fast line count);
    None for other lazy sets (e.g. a mux of corpora), which only disables the ETA."""
    import gzip

    if not getattr(cuts, "is_lazy", True):
        return len(cuts)
    path = getattr(getattr(cuts, "data", None), "path", None)
    if path is None or not str(path).endswith((".jsonl", ".jsonl.gz")):
        return None
    opener = gzip.open if str(path).endswith(".gz") else open
    n = 0
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
    return n


class TranscriptTokenCount:
    """The number of LLM tokens a transcript is trained as (llmasr.prompt.transcript_ids):
    the data module's --max-text-tokens filter. Picklable with the tokenizer."""

    def __init__(self, tokenizer, prompt_format):
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format

    def __call__(self, text: str) -> int:
        from llmasr.prompt import transcript_ids

        return len(transcript_ids(self.tokenizer, self.prompt_format, [text])[0])


def _text_limit(model: nn.Module, args) -> tuple:
    """(text_len_fn, max_text_len) of the data module: the LLM tokens of a transcript against
    --max-text-tokens (models without an LLM prompt, e.g. FireRedASR-AED, have no such limit)."""
    limit = getattr(args, "max_text_tokens", 0)
    if not limit or getattr(model, "prompt_format", None) is None:
        return None, None
    return TranscriptTokenCount(model.tokenizer, model.prompt_format), limit


def _count(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total} parameters, {trainable} trainable ({100.0 * trainable / max(total, 1):.2f}%)"


def run(rank: int, world_size: int, args: argparse.Namespace, mose: bool = False, recipe=None) -> None:
    """One training process of the recipe of ``args`` (``recipe``; ``mose``: the older keyword for MoSE)."""
    from llmasr.aux_ctc import build_aux_ctc
    from llmasr.training.warmup import maybe_projector_warmup
    from llmasr.recipes.recipe import recipe_of

    recipe = recipe_of(args, recipe, mose)
    params = get_params()
    params.update(vars(args))
    params.exp_dir = Path(params.exp_dir)
    params.mose = recipe.multi_encoder

    _init_distributed(params, rank, world_size)
    stop = faults.StopOnSignal().install()
    try:
        device = _start_process(params, rank, world_size)
        # ---- fail fast on bad inputs, before loading any weights
        recipe.check_inputs(params)
        ckpt_path, resumed, rank_state, pretrained = _read_checkpoints(params, rank, world_size)
        model = _build_model(args, params, recipe, device, pretrained, resumed, ckpt_path)
        data, train_cuts, train_dl, valid_dl = _build_data(args, params, model, rank_state)

        # ---- projector alignment (llmasr.aux_ctc): optional projector-only warm-up on its own
        # dataloader (the training sampler's position is untouched; skipped when resuming), then
        # the auxiliary CTC loss added inside SpeechLLM.forward. Both before the DDP/DeepSpeed wrap,
        # which must see the warmed-up weights.
        # (sync_ranks off: each rank warms up alone, and a time limit may stop them at different steps)
        warmup_cuts = data.train_cuts(params.projector_warmup_cuts) if params.get("projector_warmup_cuts") else train_cuts
        maybe_projector_warmup(params, model, data.train_dataloader(warmup_cuts, sync_ranks=False), device)
        aux_ctc = build_aux_ctc(args, model)
        if aux_ctc is not None:  # (only SpeechLLM models can have one)
            model.enable_aux_ctc(aux_ctc)

        model, optimizer, scheduler, scaler = _build_optimizer(params, model, resumed, device, world_size)
        if _train_epochs(params, model, optimizer, scheduler, scaler, data, train_cuts, train_dl, valid_dl,
                         rank_state, rank, world_size, device, stop):
            return True  # preempted: checkpoint-<batch>.pt written
        logging.info("Done!")
        return False
    finally:
        stop.restore()
        dist_utils.cleanup_dist()


def _init_distributed(params, rank: int, world_size: int) -> None:
    if params.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist_utils.backend(params.get("dist_backend", "auto")),
                                   timeout=datetime.timedelta(minutes=params.get("dist_timeout_min", 10.0)))
        if torch.cuda.is_available():
            torch.cuda.set_device(dist_utils.local_rank_from_env(rank))
    else:
        dist_utils.setup_dist(rank, world_size, params.master_port, backend_choice=params.get("dist_backend", "auto"),
                              timeout_min=params.get("dist_timeout_min"))


def _start_process(params, rank: int, world_size: int) -> torch.device:
    """Logging, leftovers of killed saves, precision; returns this process's device."""
    setup_logger(params.exp_dir / "log" / "log-train", rank, world_size)
    if rank == 0:  # the checkpoint writer: remove what a killed save of an earlier run left
        prune_stale_temp_files(params.exp_dir)
    if not dist_utils.exp_dir_is_shared(params.exp_dir):
        # Multi-node with node-local --exp-dir: checkpoints land on global rank 0's node only.
        logging.warning(
            "--exp-dir %s is not shared by all ranks: only global rank 0 writes checkpoints, on its node; "
            "to resume, copy checkpoint-N.pt / epoch-N.pt to this path on every node%s", params.exp_dir,
            " (DeepSpeed ZeRO checkpoints need a shared --exp-dir: rank 0 gathers every rank's shard)"
            if params.deepspeed else "")
    _set_precision(params)
    device = dist_utils.get_device(rank)
    logging.info("Training started: rank %d of %d on %s, dtype %s, autocast %s",
                 rank, world_size, device, params.dtype, params.use_autocast)
    logging.info("command: %s", " ".join(sys.argv))
    return device


def _read_checkpoints(params, rank: int, world_size: int):
    """(resume path, its checkpoint, this rank's mid-epoch state, the --pretrained-model-path checkpoint)."""
    from llmasr.checkpoint import load_checkpoint

    faults.apply_auto_resume(params, rank)
    ckpt_path = resume_path(params)
    resumed: Optional[Dict[str, Any]] = None
    if ckpt_path is not None:
        if not ckpt_path.is_file():
            raise FileNotFoundError(
                f"cannot resume: {ckpt_path} does not exist "
                f"(--start-epoch {params.start_epoch} / --start-batch {params.start_batch})"
            )
        resumed = load_checkpoint(ckpt_path)
    rank_state = _mid_epoch_rank_state(resumed, ckpt_path, rank, world_size) if params.start_batch > 0 else None
    pretrained = load_checkpoint(params.pretrained_model_path) if params.pretrained_model_path else None
    return ckpt_path, resumed, rank_state, pretrained


def _build_model(args, params, recipe, device, pretrained, resumed, ckpt_path) -> nn.Module:
    """The recipe's model (seeded), with pretrained/resumed weights and the resumed counters, on ``device``."""
    from llmasr.checkpoint import load_model_state
    from llmasr.features import check_feature_type
    from llmasr.recipes.model_args import build_model_from_args

    fix_random_seed(params.seed)
    model = build_model_from_args(args, dtype=_llm_dtype(params, recipe), recipe=recipe)
    check_feature_type(getattr(model, "feature_types", model.feature_type), args.feature_type,
                       getattr(model, "feature_dims", model.feature_dim), getattr(args, "num_mel_bins", None))
    logging.info("Model: %s", _count(model))
    for name, p in model.named_parameters():
        if p.requires_grad:
            logging.debug("trainable %s %s", name, tuple(p.shape))
    if pretrained is not None:
        load_model_state(model, pretrained["model"], source=params.pretrained_model_path)
        logging.info("initialised trainable weights from %s", params.pretrained_model_path)
    if resumed is not None:
        load_model_state(model, resumed["model"], source=str(ckpt_path))
        for k in _RESTORED_KEYS:
            if k in resumed:
                params[k] = resumed[k]
        logging.info("resuming from %s (global batch %d)", ckpt_path, params.batch_idx_train)
    if params.start_batch > 0:
        for k in _MID_EPOCH_KEYS:
            params[k] = resumed[k]
        params.start_epoch = params.cur_epoch

    model.to(device)
    if params.get("grad_checkpointing") and hasattr(model, "llm"):
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if params.inf_check:
        register_inf_check_hooks(model)
    return model


def _build_data(args, params, model, rank_state):
    """(data module, training cuts, training and validation loaders), before the DDP/DeepSpeed wrap:
    the projector warm-up needs batches; and the frozen-encoder cache when asked for."""
    from llmasr.data import AsrDataModule

    data = AsrDataModule(args, *_text_limit(model, args))
    train_cuts = data.train_cuts()
    valid_cuts = data.dev_cuts()
    # Mid-epoch: this rank's sampler continues after the batches it had trained (each rank has its own).
    train_dl = data.train_dataloader(train_cuts, sampler_state_dict=rank_state["sampler"] if rank_state else None)
    valid_dl = data.valid_dataloader(valid_cuts) if valid_cuts is not None else None

    if params.cache_encoder_outputs:
        changing = [flag for flag, on in (("--enable-spec-aug", getattr(args, "enable_spec_aug", False)),
                                          ("--enable-musan", getattr(args, "enable_musan", False))) if on]
        if changing:
            raise UserError(f"--cache-encoder-outputs reuses each cut's encoder output, but {' and '.join(changing)} "
                            "change the features every epoch: turn one of them off")
        model.enable_encoder_cache(params.encoder_cache_max_gb)
        logging.info(f"caching frozen-encoder outputs by cut id (up to {params.encoder_cache_max_gb} GB)")
    return data, train_cuts, train_dl, valid_dl


def _build_optimizer(params, model, resumed, device, world_size):
    """(model wrapped for DDP/DeepSpeed, optimizer, scheduler, grad scaler), their resumed states loaded."""
    if params.get("projector_lr_scale", 1.0) != 1.0:
        if not hasattr(model, "projectors"):
            raise UserError("--projector-lr-scale: this model has no projector")
        for proj in model.projectors:
            proj.lr_scale = params.projector_lr_scale  # read by get_parameter_groups

    def make_optimizer(m):
        return build_optimizer(params.optimizer_type, m, params.base_lr, params.weight_decay)

    def make_scheduler(opt):
        return build_scheduler(params.lr_scheduler, opt, params.warmup_steps, params.lr_decay_steps)

    scaler = torch.amp.GradScaler(device.type, enabled=params.use_fp16 and not params.deepspeed, init_scale=1.0)
    if params.deepspeed:
        from llmasr.training.deepspeed import init_engine, load_ds_checkpoint, load_ds_config

        cfg = load_ds_config(params.deepspeed_config, params.use_fp16, params.use_bf16, params.grad_clip)
        model, optimizer, scheduler = init_engine(
            model, cfg, params.optimizer_type, params.base_lr, make_optimizer, make_scheduler
        )
        if resumed is not None:
            mid_epoch = params.start_batch > 0
            tag = f"zero-checkpoint-{params.start_batch}" if mid_epoch else f"zero-epoch-{params.start_epoch - 1}"
            load_ds_checkpoint(model, params.exp_dir, tag)
            scheduler.load_state_dict(resumed["scheduler"])
        return model, optimizer, scheduler, scaler
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer)
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        if resumed.get("scheduler"):
            scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(resumed["grad_scaler"])
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=params.find_unused_parameters,
        )
    return model, optimizer, scheduler, scaler


def _train_epochs(params, model, optimizer, scheduler, scaler, data, train_cuts, train_dl, valid_dl, rank_state,
                  rank: int, world_size: int, device, stop=None) -> bool:
    """The epoch loop: from --start-epoch (mid-epoch: from the resumed batch) to --num-epochs, with
    validation and an epoch checkpoint after each."""
    mid_epoch = params.start_batch > 0
    total_cuts = count_cuts(train_cuts)
    if total_cuts:
        logging.info("%d training cuts before filtering (for the ETA)", total_cuts)

    tb_writer = make_tb_writer(params.exp_dir, params.tensorboard, rank)
    ckpt = Checkpointer(params, model, optimizer, scheduler, scaler, rank, world_size)
    ckpt.sampler = train_dl.sampler

    logging.info("start training from epoch %d%s", params.start_epoch,
                 f", batch {params.cur_batch_idx} of it" if mid_epoch else "")
    for epoch in range(params.start_epoch, params.num_epochs + 1):
        params.cur_epoch = epoch
        scheduler.step_epoch(epoch - 1)
        resuming_here = mid_epoch and epoch == params.start_epoch
        if not resuming_here:
            fix_random_seed(params.seed + epoch - 1)
            train_dl.sampler.set_epoch(epoch - 1)
            params.cur_batch_idx = 0
            params.epoch_loss_sum = 0.0
            params.epoch_tokens = 0.0
            params.epoch_cuts = 0
            data.filters["train"].reset_counts()  # this epoch's counts: the sampler reads every cut once
        # (The loader's own generator seeds its workers: creating the iterator leaves the RNG alone.)
        train_iter = iter(train_dl)
        if resuming_here:
            params.epoch_loss_sum = rank_state["epoch_loss_sum"]
            params.epoch_tokens = rank_state["epoch_tokens"]
            set_rng_state(rank_state["rng"])
        if tb_writer is not None:
            tb_writer.add_scalar("train/epoch", epoch, params.batch_idx_train)
        progress = Progress(total_cuts, world_size, done_cuts=int(params.epoch_cuts))

        try:
            train_one_epoch(
                params, model, optimizer, scheduler, train_iter, valid_dl, scaler, device,
                tb_writer=tb_writer, rank=rank, world_size=world_size, progress=progress,
                save_batch_checkpoint=ckpt.save_batch, stop=stop,
            )
        except faults.Preempted:
            if tb_writer is not None:
                tb_writer.close()
            return True
        except EmptyEpochError:
            raise UserError(f"epoch {epoch} produced no training batch: {data.explain_empty_epoch('train')}") from None
        if not resuming_here:
            logging.info(data.epoch_summary("train", int(params.epoch_cuts), params.cur_batch_idx * world_size))
        logging.info("Epoch %d done: train loss %.4f", epoch, params.train_loss)
        cache = getattr(unwrap_model(model), "encoder_cache", None)
        if cache is not None:
            logging.info(cache.summary())
        if world_size > 1:
            dist_utils.check_replicas_in_sync(unwrap_model(model))
        if valid_dl is not None:
            run_validation(params, model, valid_dl, device, tb_writer)
        ckpt.save_epoch()

    if tb_writer is not None:
        tb_writer.close()
    return False


def main(mose: bool = False, argv: Optional[List[str]] = None, model_type: Optional[str] = None) -> None:
    from llmasr.aux_ctc import AuxCtcConfig
    from llmasr.config import parse_args_with_config

    parser = get_parser(mose, model_type)
    args = parse_args_with_config(parser, argv, section="train")
    args.exp_dir = Path(args.exp_dir)
    if args.use_fp16 is None:
        args.use_fp16 = torch.cuda.is_available() and not args.use_bf16
    if args.start_epoch < 1:
        parser.error(f"--start-epoch must be >= 1, got {args.start_epoch}")
    compress = getattr(args, "ctc_compress_frames", "none")
    if compress != "none" and getattr(args, "aux_ctc_blank", "pad") != "pad":
        parser.error(f"--ctc-compress-frames drops the pad token's frames (the aux CTC's default blank), "
                     f"but --aux-ctc-blank is {args.aux_ctc_blank!r}")
    if compress != "none" and AuxCtcConfig.from_args(args).needed and args.aux_ctc_mode != compress:
        parser.error(f"--ctc-compress-frames {compress} reads the projector as the aux CTC does in that mode, but "
                     f"--aux-ctc-mode is {args.aux_ctc_mode}")
    if args.deepspeed:
        if not dist_utils.launched_externally():
            parser.error("--deepspeed needs a launcher: torchrun --nproc_per_node N src/train.py ... "
                         "or deepspeed src/train.py ...")
        from llmasr.training.deepspeed import load_ds_config

        try:  # validate the config and the optimizer choice before any process loads weights
            cfg = load_ds_config(args.deepspeed_config, args.use_fp16, args.use_bf16, args.grad_clip)
        except (ValueError, FileNotFoundError) as e:
            parser.error(str(e))
        if "optimizer" not in cfg and args.optimizer_type == "scaled_adam":
            parser.error("--optimizer scaled_adam cannot be used with DeepSpeed ZeRO (it needs whole tensors); "
                         "pass --optimizer adamw (e.g. --base-lr 1e-4) or add an \"optimizer\" section to the config")
    faults.check_fault_tolerance_arguments(args, parser.error)
    if dist_utils.launch(run, args):  # the recipe travels as args.model_type
        logging.info("preempted: checkpoint saved; exit status %d (rerun with --auto-resume true)",
                     faults.PREEMPTED_EXIT_STATUS)
        raise SystemExit(faults.PREEMPTED_EXIT_STATUS)
