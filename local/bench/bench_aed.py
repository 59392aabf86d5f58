#!/usr/bin/env python3
"""FireRedASR-AED batched beam search throughput vs batch size (CPU or CUDA).

Decodes the same utterances with batch sizes 1, 4, 16 and prints utterances/s, decoder steps/s, the
real-time factor (encoder + beam search) and peak memory. Without --model-dir a randomly initialised
model of ``--shape`` is built: ``small`` (d_model 256, 12 encoder / 6 decoder layers) or
``published`` (FireRedASR-AED-L: d_model 1280, 20 heads, 16 + 16 layers, 1.1B). Random weights rarely
emit <eos>, so every hypothesis runs --decode-max-len steps: a worst-case, fixed amount of work per
utterance. ``--dtype bfloat16``: FireRedAsrAed.set_decode_dtype (what ``src/decode_aed.py --decode-dtype`` does:
Linear/Embedding weights cast once, encoder and beam search under autocast; AVX512-BF16/AMX CPUs, GPUs).

  python local/bench/bench_aed.py                                  # random small model
  python local/bench/bench_aed.py --shape published --device cuda --dtype bfloat16
  python local/bench/bench_aed.py --model-dir models/FireRedASR-AED-L --wav-scp data/test/wav.scp
"""
import argparse
import os
import time

import torch


from bench_decode import PeakMemory
from llmasr.firered.aed import FireRedAsrAed
from llmasr.features.firered import pad_features
from llmasr.firered.load import load_aed_dir


SHAPES = {
    "small": dict(d_model=256, n_layers_enc=12, n_layers_dec=6, n_head=4),
    "published": dict(d_model=1280, n_layers_enc=16, n_layers_dec=16, n_head=20),  # FireRedASR-AED-L
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="")
    p.add_argument("--wav-scp", default="", help="real audio (with --model-dir); else random features")
    p.add_argument("--num-utts", type=int, default=16)
    p.add_argument("--seconds", type=float, default=5.0, help="length of the random utterances")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--decode-max-len", type=int, default=40)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--d-model", type=int, default=None, help="overrides --shape")
    p.add_argument("--n-layers-enc", type=int, default=None, help="overrides --shape")
    p.add_argument("--n-layers-dec", type=int, default=None, help="overrides --shape")
    p.add_argument("--n-head", type=int, default=None, help="overrides --shape")
    p.add_argument("--odim", type=int, default=7832, help="FireRedASR-AED-L's vocabulary size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="decode dtype")
    args = p.parse_args()
    for k, v in SHAPES[args.shape].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    if args.model_dir:
        fe, model, _ = load_aed_dir(args.model_dir)
    else:
        fe = None
        model = FireRedAsrAed(idim=80, n_layers_enc=args.n_layers_enc, n_head=args.n_head, d_model=args.d_model,
                              residual_dropout=0.1, dropout_rate=0.1, kernel_size=33, pe_maxlen=5000, sos_id=3,
                              eos_id=4, pad_id=2, odim=args.odim, n_layers_dec=args.n_layers_dec)
    model.to(dev).eval()
    nparams = sum(p.numel() for p in model.parameters()) / 1e6

    if args.wav_scp:
        if fe is None:
            raise SystemExit("--wav-scp needs --model-dir (for cmvn.ark)")
        paths = [line.split(maxsplit=1)[1].strip() for line in open(args.wav_scp) if line.strip()][: args.num_utts]
        feats = [torch.from_numpy(fe.from_file(pth)) for pth in paths]
    else:
        # lengths spread +-20% around --seconds, like a sorted test set bucket
        frames = [int(args.seconds * 100 * (0.8 + 0.4 * i / max(1, args.num_utts - 1))) for i in range(args.num_utts)]
        feats = [torch.randn(t, 80) for t in frames]
    audio_sec = sum(f.size(0) for f in feats) / 100.0

    print(f"model: {nparams:.1f} M params, device {dev}, threads {args.threads}, dtype {args.dtype}, beam "
          f"{args.beam_size}, decode_max_len {args.decode_max_len}, {len(feats)} utts, {audio_sec:.1f} s audio, "
          f"load average {os.getloadavg()[0]:.1f}")
    # cpu_s (process CPU time) is less sensitive than wall time to other jobs on a shared machine.
    print(f"{'batch':>5} {'time_s':>8} {'cpu_s':>8} {'utt/s':>8} {'steps/s':>9} {'RTF':>8} {'peak MB':>8}")
    model.set_decode_dtype(getattr(torch, args.dtype))
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        # warm-up
        x, lens = pad_features(feats[:bs])
        model.transcribe(x.to(dev), lens.to(dev), args.beam_size, 1, 4)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with PeakMemory(dev) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            steps = 0
            for i in range(0, len(feats), bs):
                x, lens = pad_features(feats[i : i + bs])
                hyps = model.transcribe(x.to(dev), lens.to(dev), args.beam_size, 1, args.decode_max_len, 1.25,
                                        0.6, 1.0)
                steps += max(len(h[0]["yseq"]) for h in hyps) + 1
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"{bs:>5} {dt:>8.2f} {cpu:>8.2f} {len(feats) / dt:>8.2f} {steps / dt:>9.1f} {dt / audio_sec:>8.4f} "
              f"{mem.extra / 2**20:>8.0f}")


if __name__ == "__main__":
    main()
