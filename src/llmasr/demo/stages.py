"""The demo's steps (:mod:`llmasr.demo.run` calls them in order), each with the toolkit's own
scripts and modules: the corpus, ``local/prepare.sh``, zero-shot Whisper-base, the untrained model's
decode, ``src/train.py`` and ``src/decode.py`` per epoch."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from llmasr.demo.console import fmt_time, say
from llmasr.demo.processes import run

LANGS = {
    # lang: (espeak corpus lang, prepare.sh corpus, manifest prefix, config file)
    "en": ("en", "librispeech", "librispeech", "demo_en.yaml"),
    "zh": ("cmn", "aishell", "aishell", "demo_zh.yaml"),
}
HELDOUT_PREFIX = "heldout"  # cut manifests <manifest-dir>/heldout_cuts_<set>.jsonl.gz
HELDOUT_LABELS = {
    "novel_shape": "the demo's words in sentence shapes no template produces, voices not in training",
    "open_domain": "hand-written everyday sentences, voices not in training",
}


@dataclass
class TestSet:
    key: str    # template / novel_shape / open_domain
    entry: str  # the src/decode.py --test-sets entry
    name: str   # the result files' set name
    label: str


@dataclass
class DemoRun:
    """One demo run's settings and what its steps produced so far."""

    repo: Path
    lang: str
    quick: bool
    cfg: dict
    config_path: Path
    exp_dir: Path
    work_dir: Path
    threads: int
    env: Dict[str, str]
    skip_zero_shot: bool
    whisper_pt: Optional[Path] = None
    llm_dir: Optional[Path] = None
    manifest_dir: Optional[Path] = None
    heldout_dir: Optional[Path] = None
    test_sets: List[TestSet] = field(default_factory=list)
    zero_shot: Dict[str, float] = field(default_factory=dict)
    zero_shot_norm: Dict[str, float] = field(default_factory=dict)
    train_argv: List[str] = field(default_factory=list)
    decode_common: List[str] = field(default_factory=list)
    before: Dict[str, float] = field(default_factory=dict)
    before_norm: Dict[str, float] = field(default_factory=dict)
    per_epoch: List[dict] = field(default_factory=list)
    train_seconds: float = 0.0

    @property
    def scoring(self) -> str:
        return self.cfg["corpus"].get("scoring", "wer")

    @property
    def metric(self) -> str:
        return self.scoring.upper()

    @property
    def prefix(self) -> str:
        return LANGS[self.lang][2]

    @property
    def test_set(self) -> str:
        return self.cfg["corpus"].get("test_set", "test-clean" if self.lang == "en" else "test")

    @property
    def set_name(self) -> str:
        return f"{self.prefix}_{self.test_set}".replace("-", "_")

    @property
    def num_epochs(self) -> int:
        return int(self.cfg["train"]["num-epochs"])

    @property
    def log_file(self) -> Path:
        return self.exp_dir / "log" / "demo-commands.log"

    def run(self, cmd, echo=None, **env) -> None:
        run(cmd, self.log_file, dict(self.env, **env), self.repo, echo=echo)


def prepare_models(d: DemoRun, models_dir: Optional[Path]) -> None:
    from llmasr.demo.models import prepare_demo_models

    d.whisper_pt, d.llm_dir = prepare_demo_models(models_dir)
    say(f"  Whisper-base: {d.whisper_pt}")
    say(f"  SmolLM2-135M-Instruct: {d.llm_dir}")


def build_corpus(d: DemoRun, download_dir: Path) -> Path:
    from llmasr.demo.espeak import make_espeak_corpus

    c = d.cfg["corpus"]
    root = make_espeak_corpus(
        download_dir,
        LANGS[d.lang][0],
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
        llm_path=d.llm_dir,
    )
    n_extra = c.get("num_train_extra", 0)
    extra = f" + {n_extra} for the projector warm-up only" if n_extra else ""
    say(f"  corpus: {root} ({c['num_train']} train{extra} / {c.get('num_dev')} dev / {c['num_test']} test utterances; "
        f"train/dev: {c.get('markov_fraction', 0.0):.0%} Markov text, {c.get('common_fraction', 0.0):.0%} "
        f"common-word sequences, {c.get('llm_fraction', 0.0):.0%} everyday sentences sampled from the LLM, "
        "the rest templates)")
    return root


def build_heldout_sets(d: DemoRun, corpus_root: Path) -> None:
    """The novel-shape and open-domain test sets (Kaldi dirs), none of whose sentences is a
    training sentence, spoken by voices the corpus does not use."""
    from llmasr.demo.espeak import make_heldout_sets, read_corpus_transcripts

    c = d.cfg["corpus"]
    out_dir = d.work_dir / "heldout"
    # the training transcripts as the held-out texts are written (lower case; Mandarin without spaces)
    seen = {t.lower() if d.lang == "en" else t.replace(" ", "")
            for _, t in read_corpus_transcripts(corpus_root).values()}
    make_heldout_sets(out_dir, LANGS[d.lang][0], num_per_set=c["num_heldout"], seed=c.get("seed", 0), exclude=seen)
    say(f"  held-out sets: {out_dir} ({c['num_heldout']} novel-shape + {c['num_heldout']} open-domain utterances, "
        f"voices not in training)")
    d.heldout_dir = out_dir


def prepare_data(d: DemoRun, download_dir: Path) -> None:
    """local/prepare.sh on the corpus and (``--corpus kaldi``) the held-out sets; the test sets."""
    from llmasr.demo.espeak import HELDOUT_SETS

    data_dir = d.work_dir / "data"
    common = ["--data-dir", str(data_dir), "--feature-type", "whisper", "--num-mel-bins", "80", "--nj", "2"]
    d.run(["bash", str(d.repo / "local" / "prepare.sh"), "--corpus", LANGS[d.lang][1],
           "--dl-dir", str(download_dir), *common], echo=r"Stage \d|ERROR", PYTHON=sys.executable)
    d.manifest_dir = data_dir / "fbank_whisper80"
    heldout_cuts = {}
    if d.heldout_dir:
        d.run(["bash", str(d.repo / "local" / "prepare.sh"), "--corpus", "kaldi", "--name", HELDOUT_PREFIX,
               "--dl-dir", str(d.heldout_dir), *common, "--language", "English" if d.lang == "en" else "Chinese"],
              echo=r"Stage \d|ERROR", PYTHON=sys.executable)
        heldout_cuts = {kind: d.manifest_dir / f"{HELDOUT_PREFIX}_cuts_{kind}.jsonl.gz" for kind in HELDOUT_SETS}
    say(f"  features and cut manifests in {d.manifest_dir}")
    d.test_sets = [TestSet("template", d.test_set, d.set_name,
                           "new sentences from the training templates, voices of the training pool")]
    for kind, path in heldout_cuts.items():
        d.test_sets.append(TestSet(kind, str(path), path.name[: -len(".jsonl.gz")], HELDOUT_LABELS[kind]))


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


def zero_shot_baseline(d: DemoRun) -> None:
    """Zero-shot Whisper-base on every test set: the baseline to beat (``d.zero_shot``)."""
    if d.skip_zero_shot:
        say("  skipped")
        return
    import whisper

    from llmasr.demo.results import whisper_normalised_wer

    whisper_model = whisper.load_model(str(d.whisper_pt), device="cpu")
    for t in d.test_sets:
        path = d.manifest_dir / f"{d.prefix}_cuts_{t.entry}.jsonl.gz" if t.key == "template" else Path(t.entry)
        d.zero_shot[t.key], zs_results = zero_shot_whisper(whisper_model, load_cuts(path), d.lang,
                                                           d.exp_dir / "zero-shot-whisper-base", t.name, d.scoring)
        if d.lang == "en":
            d.zero_shot_norm[t.key] = whisper_normalised_wer(zs_results)
        say(f"  zero-shot Whisper-base {d.metric} on {t.name}: {d.zero_shot[t.key]:.2f}%")
    del whisper_model


def save_init_checkpoint(train_argv: List[str], path: Path) -> None:
    """The untrained model (seeded exactly as src/train.py seeds it) as a checkpoint, so that
    src/decode.py can decode it and src/train.py starts from it (--pretrained-model-path)."""
    import torch

    from llmasr.checkpoint import save_checkpoint
    from llmasr.config import parse_args_with_config
    from llmasr.recipes.model_args import build_model_from_args
    from llmasr.recipes.train import fix_random_seed, get_parser

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    args = parse_args_with_config(get_parser(False), train_argv, section="train")
    fix_random_seed(args.seed)
    model = build_model_from_args(args, dtype=torch.float32)
    save_checkpoint(path, model, params={"demo_init": True, "batch_idx_train": 0})
    del model


def command_lines(d: DemoRun) -> None:
    """``d.train_argv`` and ``d.decode_common``: src/train.py and src/decode.py read the recipe
    config themselves (--config: its ``train:`` / ``decode:`` sections; decode takes the model
    flags from ``train:``); the command line adds the paths and the --quick overrides."""
    from llmasr.demo.pipeline import decode_argv, model_flags_for_decode, train_argv

    quick = (d.cfg.get("quick") or {}) if d.quick else {}
    train_overrides = dict(quick.get("train") or {})
    paths = {"llm-path": str(d.llm_dir), "speech-encoder-path": str(d.whisper_pt),
             "manifest-dir": str(d.manifest_dir), "dataset-prefix": d.prefix, "exp-dir": str(d.exp_dir)}
    d.train_argv = ["--config", str(d.config_path)] + train_argv({
        **train_overrides,
        **paths,
        "train-cuts": "train-clean-100" if d.lang == "en" else "train",
        "dev-cuts": "dev-clean" if d.lang == "en" else "dev",
    }, f"{d.config_path} train:")
    d.decode_common = ["--config", str(d.config_path)] + decode_argv({
        **model_flags_for_decode(train_overrides),
        **dict(quick.get("decode") or {}),
        **paths,
        "num-threads": d.threads,
        "scoring": d.scoring,
    }, f"{d.config_path} decode:")


def all_sets_argv(d: DemoRun) -> List[str]:
    return ["--test-sets", ",".join(t.entry for t in d.test_sets)]


def decode(d: DemoRun, extra_argv: List[str]) -> Tuple[Dict[str, float], Dict[str, float], Path]:
    """src/decode.py (a subprocess: its own threads and memory) with ``d.decode_common`` +
    ``extra_argv``: ``({test set key: error rate}, {key: Whisper-normalised WER (en)}, decode dir)``,
    read from the wer-summary and recogs files it writes."""
    from llmasr.demo.results import decode_rates, read_recogs_texts, whisper_normalised_wer

    argv = d.decode_common + extra_argv
    d.run([sys.executable, str(d.repo / "src" / "decode.py"), *argv], echo=r"ETA|decoded \d+ cuts")
    found, ddir = decode_rates(argv)
    rates = {t.key: found[t.name] for t in d.test_sets if t.name in found}
    norm = {t.key: whisper_normalised_wer(read_recogs_texts(ddir, t.name))
            for t in d.test_sets if t.key in rates} if d.lang == "en" else {}
    return rates, norm, ddir


def decode_untrained(d: DemoRun) -> Path:
    """The untrained model (random projector, LoRA at zero), saved as ``init.pt`` and decoded on the
    template test set only: it rambles on every set alike."""
    command_lines(d)
    init_ckpt = d.exp_dir / "init.pt"
    save_init_checkpoint(d.train_argv, init_ckpt)
    d.before, d.before_norm, _ = decode(d, ["--test-sets", d.test_set, "--checkpoint", "init.pt"])
    say(f"  untrained model {d.metric} on {d.set_name}: {d.before['template']:.2f}%")
    return init_ckpt


def train(d: DemoRun, init_ckpt: Path) -> None:
    """src/train.py from the untrained checkpoint; progress from the metrics file it writes."""
    from llmasr.demo.monitor import TrainMonitor

    c = d.cfg
    monitor = TrainMonitor(d.exp_dir, d.num_epochs, int(c["train"].get("projector-warmup-steps", 0)),
                           int(c["corpus"]["num_train"]))
    t_train = time.time()
    monitor.start()
    try:
        d.run([sys.executable, str(d.repo / "src" / "train.py"), *d.train_argv, "--pretrained-model-path",
               str(init_ckpt)], echo=r"ERROR|Traceback|Epoch \d+ done|saved")
    finally:
        monitor.stop()
    d.train_seconds = time.time() - t_train
    say(f"  training took {fmt_time(d.train_seconds)}")


def decode_epochs(d: DemoRun) -> None:
    """src/decode.py on every epoch's checkpoint and every test set (``d.per_epoch``)."""
    from llmasr.checkpoint import load_checkpoint

    for epoch in range(1, d.num_epochs + 1):
        rates, norm, ddir = decode(d, all_sets_argv(d) + ["--epoch", str(epoch), "--avg", "1"])
        batch = int(load_checkpoint(d.exp_dir / f"epoch-{epoch}.pt").get("batch_idx_train", 0))
        d.per_epoch.append({"epoch": epoch, "batch": batch, "rate": rates["template"], "rates": rates,
                            "whisper_norm": norm, "dir": str(ddir)})
        say(f"  epoch {epoch} (batch {batch}): " + ", ".join(f"{k} {d.metric} {v:.2f}%" for k, v in rates.items()))
