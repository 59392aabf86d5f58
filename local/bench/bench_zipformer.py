#!/usr/bin/env python3
"""Zipformer encoder throughput and peak memory (random weights; speed does not depend on the values).

    python local/bench/bench_zipformer.py --types medium large --batch 4 --min-sec 10 --max-sec 15

Prints input feature frames/s (10 ms frames, i.e. seconds of audio x 100) for frozen inference
(eval + inference_mode) and, with --train, one forward+backward step. Peak memory is CUDA's max allocated
on GPU, and the process peak RSS growth on CPU.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch


from llmasr.encoders import build_speech_encoder


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float:
    """Reset the process' peak RSS (Linux: write 5 to clear_refs) and return the current RSS in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["medium", "large"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--min-sec", type=float, default=10.0)
    ap.add_argument("--max-sec", type=float, default=15.0)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="autocast dtype")
    ap.add_argument("--train", action="store_true", help="also time forward+backward in train mode")
    args = ap.parse_args()

    if len(args.types) > 1:
        # One process per model so that peak-memory numbers are not polluted by the previous model.
        rest = sys.argv[1:]
        i = j = rest.index("--types") if "--types" in rest else len(rest)
        if i < len(rest):
            j = i + 1
            while j < len(rest) and not rest[j].startswith("--"):
                j += 1
        for t in args.types:
            subprocess.run([sys.executable, __file__, *rest[:i], *rest[j:], "--types", t], check=True)
        return

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    g = torch.Generator().manual_seed(0)
    lens = torch.linspace(args.min_sec * 100, args.max_sec * 100, args.batch).long()
    feats = torch.randn(args.batch, int(lens.max()), 80, generator=g).to(device)
    lens = lens.to(device)
    frames = int(lens.sum())
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes skew CPU numbers)")
    print(f"device={device} threads={args.threads} dtype={args.dtype} batch={args.batch} "
          f"lengths={[round(v / 100, 1) for v in lens.tolist()]} s, {frames} input frames per batch")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    for enc_type in args.types:
        torch.manual_seed(0)
        model = build_speech_encoder(enc_type).to(device).eval()
        nparams = sum(p.numel() for p in model.parameters())
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = reset_peak_rss()
        with torch.inference_mode(), autocast():
            model(feats, lens)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                out, out_lens = model(feats, lens)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.iters
        if device.type == "cuda":
            peak = f"peak allocated {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above weights"
        else:
            peak = f"peak RSS {peak_rss_mb():.0f} MiB, +{peak_rss_mb() - base:.0f} MiB above weights"
        print(f"{enc_type:>7}: {nparams / 1e6:.1f} M params, out {tuple(out.shape)}; inference "
              f"{dt * 1000:.0f} ms/batch = {frames / dt:,.0f} frames/s ({frames / dt / 100:.1f} s audio/s, "
              f"RTF {dt * 100 / frames:.4f}); {peak}")

        if args.train:
            model.train()
            base = reset_peak_rss() if device.type == "cpu" else 0
            with autocast():
                out, _ = model(feats, lens)
                out.float().pow(2).mean().backward()  # warm-up
            t0 = time.perf_counter()
            with autocast():
                out, _ = model(feats, lens)
            loss = out.float().pow(2).mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"{enc_type:>7}: train fwd+bwd {dt * 1000:.0f} ms/batch = {frames / dt:,.0f} frames/s; "
                  f"peak RSS +{peak_rss_mb() - base:.0f} MiB above weights" if device.type == "cpu" else
                  f"{enc_type:>7}: train fwd+bwd {dt * 1000:.0f} ms/batch = {frames / dt:,.0f} frames/s; "
                  f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        del model


if __name__ == "__main__":
    main()
