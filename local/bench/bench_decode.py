#!/usr/bin/env python3
"""Decoding speed of SpeechLLM vs batch size: utt/s, RTF and peak memory, for random models.

    python3 local/bench/bench_decode.py                      # tiny and small model, batch 1,4,16,64
    python3 local/bench/bench_decode.py --models small --batch-sizes 1,16 --num-utts 32

Models are random (nothing is downloaded): a Qwen2-style LLM built from a config ("tiny": hidden 64,
2 layers, like the golden set; "small": hidden 512, 8 layers, ~25M parameters) with the golden
tokenizer's 528-row vocabulary and LoRA r=64, and a random 2-layer conv encoder (4x subsampling,
then the projector's 4x). Utterances are 2-8 s of random 80-dim features, decoded longest first in
batches (as the bucketing test loader does), greedy, at most --max-new-tokens tokens. The
hypotheses of every batch size are compared with batch size 1.

Peak memory: CUDA max_memory_allocated on GPU; on CPU the peak resident set size sampled every
2 ms during the run minus the RSS before it, i.e. the extra memory decoding needed (a lower bound:
memory the allocator kept from an earlier run is reused without showing up).
"""
import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
}


class ConvEncoder(nn.Module):
    """Random stand-in speech encoder: two stride-2 convolutions (4x subsampling), 256 dims."""

    feature_type = "fbank"
    feature_dim = 80

    def __init__(self, dim: int = 256):
        super().__init__()
        self.output_dim = dim
        self.conv1 = nn.Conv1d(80, dim, 3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x, lens):
        # Frames beyond an utterance's length are zeroed before each convolution, so its output
        # does not depend on how much padding the batch adds (unlike the Zipformer, whose last
        # frames see the padding): batched and one-at-a-time decoding must then agree.
        def masked(y, n):
            keep = torch.arange(y.shape[-1], device=y.device)[None, None, :] < n[:, None, None]
            return y * keep

        lens1 = (lens + 1) // 2
        out_lens = (lens1 + 1) // 2
        y = torch.relu(self.conv1(masked(x.transpose(1, 2), lens)))
        y = torch.tanh(self.conv2(masked(y, lens1))).transpose(1, 2)
        return y, out_lens


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


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
            self.extra = max(self.peak, _rss()) - self.base


def build_model(name: str, tokenizer_dir: Path, workdir: Path, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llmasr.llm import load_llm
    from llmasr.model import SpeechLLM

    llm_dir = workdir / name
    llm_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (llm_dir / f).write_bytes((tokenizer_dir / f).read_bytes())
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=528, tie_word_embeddings=True, initializer_range=0.25, rope_theta=1e6,
                      max_position_embeddings=4096, **MODELS[name])
    Qwen2ForCausalLM(cfg).save_pretrained(llm_dir)
    llm, tok = load_llm(llm_dir, dtype=dtype, use_lora=True)
    model = SpeechLLM([ConvEncoder()], llm, tok)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model.to(device).eval()


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


def run(model, feats, lens, batch_size, max_new_tokens, device):
    hyps, ids = [], []
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        for i in range(0, len(feats), batch_size):
            x, xl = collate(feats[i:i + batch_size], lens[i:i + batch_size])
            out = model.generate_ids(x.to(device), xl.to(device), max_new_tokens=max_new_tokens)
            hyps += model.tokenizer.batch_decode(out, skip_special_tokens=True)
            ids += out.tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return hyps, elapsed, mem.extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--num-utts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokenizer-dir", type=Path,
                        default=REPO.parent / "shared" / "golden" / "speechllm" / "models" / "llm",
                        help="any Qwen2 tokenizer directory (the golden set's by default)")
    args = parser.parse_args()
    torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    feats, lens = make_data(args.num_utts)
    audio_sec = float(lens.sum()) / 100
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} utts={args.num_utts} "
          f"audio={audio_sec:.0f}s max_new_tokens={args.max_new_tokens}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = build_model(name, args.tokenizer_dir, Path(tmp), dtype, device)
            n_params = sum(p.numel() for p in model.parameters())
            run(model, feats[:2], lens[:2], 2, 4, device)  # warm-up
            print(f"\nmodel {name}: {n_params / 1e6:.1f}M parameters")
            print(f"{'batch':>5} {'utt/s':>8} {'RTF':>8} {'speedup':>8} {'peak MB':>8}  same hyps as batch 1")
            ref_hyps, ref_rate = None, None
            for b in sizes:
                hyps, elapsed, extra = run(model, feats, lens, b, args.max_new_tokens, device)
                rate = len(feats) / elapsed
                if ref_hyps is None and b == 1:
                    ref_hyps, ref_rate = hyps, rate
                same = "-" if ref_hyps is None else f"{sum(h == r for h, r in zip(hyps, ref_hyps))}/{len(hyps)}"
                speedup = f"{rate / ref_rate:.1f}x" if ref_rate else "-"
                print(f"{b:>5} {rate:>8.2f} {elapsed / audio_sec:>8.4f} {speedup:>8} {extra / 2**20:>8.1f}  {same}",
                      flush=True)


if __name__ == "__main__":
    main()
