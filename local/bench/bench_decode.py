#!/usr/bin/env python3
"""Decoding speed of SpeechLLM vs batch size: utt/s, RTF and peak memory, for random models of the
published shapes (nothing is downloaded).

    python3 local/bench/bench_decode.py                                  # --shape small: minutes on a CPU
    python3 local/bench/bench_decode.py --shape small --dtype bfloat16   # bf16 (AVX512-BF16/AMX CPUs, GPUs)
    python3 local/bench/bench_decode.py --shape published --device cuda --dtype float16 --systems zipformer
    python3 local/bench/bench_decode.py --shape 679M --engine vllm --dtype bfloat16 --batch-sizes 16,64

Systems (``--systems``), per ``--shape``:

- ``zipformer``: Zipformer-large + Qwen2-1.5B-Instruct shape (small: Zipformer-small + a 512-wide, 8-layer
  Qwen2 with a 528-row vocabulary);
- ``mose``: 4 x Zipformer-large MoSE + Qwen2-1.5B (small: 4 x Zipformer-small + the small Qwen2);
- ``whisper``: Whisper-large-v2 encoder + Qwen2-1.5B, projector rate 8 (small: Whisper-base shape).

``--shape 679M``: ``zipformer`` only, Zipformer-large + a Qwen2-0.5B-shaped LLM (LoRA r=64: 679M parameters).

``--engine vllm`` (llmasr.vllm_engine, ``local/setup.sh --with-vllm``): the encoders run in torch as with
``hf``, the LLM in a vLLM engine on the prompt embeddings; the engine start-up (merged checkpoint written +
engine loaded) is printed separately and not counted in utt/s. ``--repeats N``: each batch size is run N
times and the median printed.

Weights are random (LoRA r=64 with non-zero B, merged into the LLM before decoding as the decode
scripts do unless ``--no-merge-lora``); the tokenizer is the golden set's Qwen2 tokenizer. Utterances
are 2-8 s of random 80-dim features, decoded longest first in batches (as the bucketing test loader
does), greedy, exactly ``--max-new-tokens`` tokens (``min_new_tokens``: random weights would stop at
random). ``--dtype``: SpeechLLM.set_decode_dtype (LLM weights in that dtype, encoders under autocast).
The hypotheses of every batch size are compared with batch size 1 (the Zipformer's last frames see the
batch padding, so its hypotheses may depend on the batch; Whisper's do not).

Peak memory: CUDA max_memory_allocated on GPU; on CPU the peak resident set size sampled every
2 ms during the run minus the RSS before it, i.e. the extra memory decoding needed (a lower bound:
memory the allocator kept from an earlier run is reused without showing up). The RSS is that of the
process and its children (vLLM's engine runs in a child process, its KV cache allocated at start-up), and
the "peak RSS" column is the whole tree's peak during the run.
"""
import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[2]

# Qwen2 shapes (Qwen2-1.5B-Instruct's config.json; "small": a 25M stand-in with the tokenizer's vocabulary)
QWEN2 = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=528),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
}
# Whisper encoder shapes: (n_mels, n_state, n_head, n_layer)
WHISPER = {"whisper-base": (80, 512, 8, 6), "whisper-large-v2": (80, 1280, 20, 32)}
# shape -> system -> (speech encoders, projector downsample rate, LLM)
SYSTEMS = {
    "small": {"zipformer": (["zipformer-small"], 4, "small"), "mose": (["zipformer-small"] * 4, 4, "small"),
              "whisper": (["whisper-base"], 8, "small")},
    "published": {"zipformer": (["large"], 4, "1.5B"), "mose": (["large"] * 4, 4, "1.5B"),
                  "whisper": (["whisper-large-v2"], 8, "1.5B")},
    "679M": {"zipformer": (["large"], 4, "0.5B")},
}


def build_encoder(name: str) -> nn.Module:
    """A random encoder of a registered type (Whisper: built from its shape; the registry needs a checkpoint)."""
    if name in WHISPER:
        from llmasr.encoders.whisper import WhisperEncoder

        n_mels, n_state, n_head, n_layer = WHISPER[name]
        return WhisperEncoder(n_mels, 1500, n_state, n_head, n_layer)
    from llmasr.encoders import build_speech_encoder

    return build_speech_encoder(name)


def _tree(pid: int):
    """``pid`` and its descendants (/proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:
                pass
    return out


def _rss() -> int:
    total = 0
    for pid in _tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


class PeakMemory:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss()
            self.stop = False
            self.total = self.base
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.stop = True
            self.thread.join()
            self.total = max(self.peak, _rss())
            self.extra = self.total - self.base


def build_model(shape: str, system: str, tokenizer_dir: Path, workdir: Path, dtype, device, merge_lora: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmasr.llm import load_llm
    from llmasr.model import SpeechLLM

    encoders, rate, llm_shape = SYSTEMS[shape][system]
    llm_dir = workdir / f"{shape}-{system}"
    llm_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (llm_dir / f).write_bytes((tokenizer_dir / f).read_bytes())
    torch.manual_seed(0)
    cfg = Qwen2Config(tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768, **QWEN2[llm_shape])
    Qwen2ForCausalLM(cfg).save_pretrained(llm_dir)
    llm, tok = load_llm(llm_dir, dtype="float32", use_lora=True)
    model = SpeechLLM([build_encoder(e) for e in encoders], llm, tok, downsample_rate=rate, mose=len(encoders) > 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    model.to(device).eval()
    if merge_lora:
        model.merge_lora_for_inference()
    return model.set_decode_dtype(dtype)


def make_data(num_utts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(200, 801, (num_utts,), generator=g)
    lens, _ = torch.sort(lens, descending=True)  # longest first, as the test loader's buckets
    feats = [torch.randn(int(t), 80, generator=g) for t in lens]
    return feats, lens


def collate(feats, lens):
    out = torch.full((len(feats), int(lens.max()), 80), -23.0259)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
    return out, lens.clone()


def run(model, feats, lens, batch_size, max_new_tokens, device, engine=None):
    """(hypotheses, seconds, extra peak memory, peak memory) of decoding every utterance; ``engine``: a
    VllmEngine decoding in place of the model's generate."""
    hyps = []
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for i in range(0, len(feats), batch_size):
            x, xl = collate(feats[i:i + batch_size], lens[i:i + batch_size])
            out = (engine or model).generate_ids(x.to(device), xl.to(device), max_new_tokens=max_new_tokens,
                                                 min_new_tokens=max_new_tokens, min_length=0)
            hyps += model.tokenizer.batch_decode(out, skip_special_tokens=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return hyps, elapsed, mem.extra, getattr(mem, "total", torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SYSTEMS))
    parser.add_argument("--systems", default=None, help="default: every system of --shape")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--num-utts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per batch size; the median is printed")
    parser.add_argument("--no-merge-lora", action="store_true", help="decode through the LoRA wrappers")
    parser.add_argument("--tokenizer-dir", type=Path,
                        default=REPO.parent / "shared" / "golden" / "speechllm" / "models" / "llm",
                        help="any Qwen2 tokenizer directory (the golden set's by default)")
    args = parser.parse_args()
    args.systems = args.systems or ",".join(SYSTEMS[args.shape])
    return args


def bench_system(args, system, tmp, feats, lens, audio_sec, sizes, device, dtype):
    model = build_model(args.shape, system, args.tokenizer_dir, Path(tmp), dtype, device, not args.no_merge_lora)
    n_params = sum(p.numel() for p in model.parameters())
    engine = None
    if args.engine == "vllm":
        from llmasr.vllm_engine import VllmEngine

        # vLLM's CPU worker binds its own OpenMP threads (by default all cores but one): the same
        # cores as --num-threads gives the hf engine
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.num_threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

        engine = VllmEngine(model, workdir=Path(tmp) / f"vllm-{system}")
        print(f"vLLM engine start-up: {engine.startup_seconds:.1f} s (not counted below)")
    run(model, feats[:2], lens[:2], 2, 4, device, engine)  # warm-up
    print(f"\n{args.shape} {system} ({', '.join(SYSTEMS[args.shape][system][0])} + Qwen2 "
          f"{SYSTEMS[args.shape][system][2]}), engine {args.engine}: {n_params / 1e6:.1f}M parameters")
    print(f"{'batch':>5} {'utt/s':>8} {'RTF':>8} {'speedup':>8} {'extra MB':>8} {'peak RSS MB':>11}  "
          "same hyps as batch 1  (runs: seconds)")
    ref_hyps, ref_rate = None, None
    for b in sizes:
        runs = [run(model, feats, lens, b, args.max_new_tokens, device, engine) for _ in range(args.repeats)]
        hyps = runs[0][0]
        elapsed = statistics.median(r[1] for r in runs)
        extra, total = max(r[2] for r in runs), max(r[3] for r in runs)
        rate = len(feats) / elapsed
        if ref_hyps is None and b == 1:
            ref_hyps, ref_rate = hyps, rate
        same = "-" if ref_hyps is None else f"{sum(h == r for h, r in zip(hyps, ref_hyps))}/{len(hyps)}"
        speedup = f"{rate / ref_rate:.1f}x" if ref_rate else "-"
        print(f"{b:>5} {rate:>8.2f} {elapsed / audio_sec:>8.4f} {speedup:>8} {extra / 2**20:>8.1f} "
              f"{total / 2**20:>11.1f}  {same}  ({', '.join(f'{r[1]:.1f}' for r in runs)})", flush=True)
    if engine is not None:
        engine.close()


def main():
    args = parse_args()
    torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    feats, lens = make_data(args.num_utts)
    audio_sec = float(lens.sum()) / 100
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} utts={args.num_utts} "
          f"audio={audio_sec:.0f}s max_new_tokens={args.max_new_tokens} LoRA {'un' if args.no_merge_lora else ''}merged "
          f"engine={args.engine} load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems.split(","):
            bench_system(args, system, tmp, feats, lens, audio_sec, sizes, device, dtype)


if __name__ == "__main__":
    main()
