#!/usr/bin/env python3
"""Training-step benchmark: step time, input frames/s and peak memory of the real training step
(SpeechLLM forward + backward + ScaledAdam/AdamW step via llmasr.training.loop.train_step) for
random-weight models of two sizes, on the available device.

    python local/bench/bench_train.py                      # tiny and small, 20 steps each
    python local/bench/bench_train.py --configs small --steps 50 --batch-size 8 --seconds 10
    python local/bench/bench_train.py --use-fp16 true      # on a GPU
    python local/bench/bench_train.py --configs published --use-bf16 true --grad-checkpointing true

"published": Zipformer-large + Qwen2-1.5B-Instruct shape (LoRA r=64), the SpeechLLM recipe's model.
``--use-bf16``: the frozen encoder runs without autograd under bf16 autocast, the LLM is loaded in bf16
(LoRA and projector keep fp32 master weights), as src/train.py does.

Each configuration runs in its own process so that peak memory (CUDA max allocated, else the
process's max RSS) is per configuration. Needs the tokenizer files of a Qwen2 model (the golden
fixture's by default: ../shared/golden/speechllm/models/llm).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFIGS = {
    # encoder: icefall Zipformer params; llm: Qwen2Config kwargs
    "tiny": {
        "encoder": dict(num_encoder_layers="1,1", downsampling_factor="1,2", feedforward_dim="32,48", num_heads="2,2",
                        encoder_dim="16,24", encoder_unmasked_dim="16,16", query_head_dim="8", value_head_dim="4",
                        pos_head_dim="2", pos_dim=8, cnn_module_kernel="15,7", feature_dim=80),
        "llm": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1),
        "lora_r": 64,
    },
    "small": {
        "encoder": dict(num_encoder_layers="2,2,2,2,2,2", downsampling_factor="1,2,4,8,4,2",
                        feedforward_dim="256,384,512,768,512,384", num_heads="4,4,4,4,4,4",
                        encoder_dim="128,192,256,384,256,192", encoder_unmasked_dim="128,128,128,128,128,128",
                        query_head_dim="32", value_head_dim="12", pos_head_dim="4", pos_dim=48,
                        cnn_module_kernel="31,31,15,15,15,31", feature_dim=80),
        "llm": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=2),
        "lora_r": 64,
    },
    "published": {
        "encoder": dict(num_encoder_layers="2,2,4,5,4,2", downsampling_factor="1,2,4,8,4,2",
                        feedforward_dim="512,768,1536,2048,1536,768", num_heads="4,4,4,8,4,4",
                        encoder_dim="192,256,512,768,512,256", encoder_unmasked_dim="192,192,256,320,256,192",
                        query_head_dim="32", value_head_dim="12", pos_head_dim="4", pos_dim=48,
                        cnn_module_kernel="31,31,15,15,15,31", feature_dim=80),
        "llm": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, rope_theta=1e6),
        "lora_r": 64,
    },
}


def build_models(root: Path, cfg: dict, tokenizer_dir: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmasr.encoders.zipformer import ZipformerConfig, ZipformerEncoder

    torch.manual_seed(0)
    enc = ZipformerEncoder(ZipformerConfig.from_dict(cfg["encoder"]))
    (root / "enc").mkdir(parents=True)
    torch.save({"model": enc.state_dict()}, root / "enc" / "pretrained.pt")
    (root / "enc" / "model_params.json").write_text(json.dumps(cfg["encoder"]))
    llm_cfg = Qwen2Config(**{"vocab_size": 528, "rope_theta": 10000.0, **cfg["llm"]}, tie_word_embeddings=True,
                          max_position_embeddings=4096)
    Qwen2ForCausalLM(llm_cfg).save_pretrained(root / "llm")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / f, root / "llm" / f)


def run_one(args) -> dict:
    import torch

    from llmasr.recipes.model_args import add_model_arguments, build_model_from_args
    from llmasr.training.loop import train_step
    from llmasr.training.optim import build_optimizer
    from llmasr.recipes.train import AttributeDict
    from llmasr.training.schedulers import FixedLRScheduler

    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root, cfg, Path(args.tokenizer_dir))
        p = argparse.ArgumentParser()
        add_model_arguments(p)
        margs = p.parse_args(["--llm-path", str(root / "llm"), "--speech-encoder-type", args.config,
                              "--speech-encoder-path", str(root / "enc" / "pretrained.pt"),
                              "--lora-r", str(cfg["lora_r"])])
        dtype = torch.float16 if args.use_fp16 else torch.bfloat16 if args.use_bf16 else torch.float32
        model = build_model_from_args(margs, dtype=dtype if dtype != torch.float32 else torch.float32).to(device)
        if args.grad_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        n_all = sum(q.numel() for q in model.parameters())
        n_train = sum(q.numel() for q in model.parameters() if q.requires_grad)
        opt = build_optimizer(args.optimizer, model, 0.01 if args.optimizer == "scaled_adam" else 1e-4)
        sched = FixedLRScheduler(opt)
        scaler = torch.amp.GradScaler(device.type, enabled=args.use_fp16, init_scale=1.0)
        params = AttributeDict(use_autocast=dtype != torch.float32, dtype=dtype, batch_idx_train=0, cur_epoch=1,
                               exp_dir=root, grad_clip=5.0, optimizer_type=args.optimizer)
        g = torch.Generator().manual_seed(0)
        frames = int(args.seconds * 100)
        # Lengths spread over [0.6, 1] x the longest, as in a bucketed batch.
        lens = torch.linspace(frames, int(frames * 0.6), args.batch_size).long()
        feats = torch.randn(args.batch_size, frames, 80, generator=g)
        words = "the quick brown fox jumps over a lazy dog while seven tired ravens sing".split()
        n_words = max(3, int(args.seconds * 2.5))  # ~150 words per minute
        texts = [" ".join(words[(i + j) % len(words)] for j in range(n_words)) for i in range(args.batch_size)]
        batch = {"features": feats, "feature_lens": lens, "texts": texts,
                 "cut_ids": [f"bench-{i}" for i in range(args.batch_size)]}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            params.batch_idx_train += 1
            info = train_step(params, model, batch, opt, sched, scaler, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            peak_what = "cuda max allocated"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            peak_what = "process max RSS"
        return {
            "config": args.config, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "optimizer": args.optimizer, "params_total": n_all, "params_trainable": n_train,
            "batch": f"{args.batch_size} x {args.seconds:.0f} s", "median_step_s": med,
            "mean_step_s": sum(times) / len(times), "frames_per_s": float(lens.sum()) / med,
            "label_tokens_per_step": info["tokens"], "peak_mem_mb": peak, "peak_mem_kind": peak_what,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,small", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)  # one configuration (child process)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the longest utterance")
    ap.add_argument("--optimizer", default="scaled_adam", choices=["scaled_adam", "adamw"])
    ap.add_argument("--use-fp16", type=lambda s: s.lower() == "true", default=False)
    ap.add_argument("--use-bf16", type=lambda s: s.lower() == "true", default=False)
    ap.add_argument("--grad-checkpointing", type=lambda s: s.lower() == "true", default=False,
                    help="activation checkpointing of the LLM layers (src/train.py --grad-checkpointing)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--tokenizer-dir", default=str(REPO.parent / "shared" / "golden" / "speechllm" / "models" / "llm"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.config:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--config", name] + [
            a for a in sys.argv[1:] if not a.startswith("--configs") and a not in args.configs.split(",")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed\n{out.stderr[-3000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(
            f"{r['config']:6s} {r['device']} {r['dtype']} {r['optimizer']}: {r['params_total'] / 1e6:.2f}M params "
            f"({r['params_trainable'] / 1e6:.2f}M trainable), batch {r['batch']}: "
            f"step {r['median_step_s'] * 1000:.0f} ms (median; mean {r['mean_step_s'] * 1000:.0f} ms), "
            f"{r['frames_per_s']:.0f} frames/s, {r['label_tokens_per_step']:.0f} label tokens/step, "
            f"peak {r['peak_mem_mb']:.0f} MB ({r['peak_mem_kind']})"
        )


if __name__ == "__main__":
    main()
