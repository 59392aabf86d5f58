"""FireRedASR-AED tokenizer: one token per Chinese character, English split by sentencepiece BPE.

``dict.txt`` has one ``token id`` per line with ids 0..V-1 in order (``<space>`` stands for " ").
Text normalisation for training targets follows the released tokenizer: upper-case, the punctuation
``，。？！,.?!`` replaced by spaces, CJK characters split out, the rest encoded with sentencepiece.
Detokenisation joins tokens with "" and turns the sentencepiece ``▁`` into a space (special tokens
are NOT filtered; the reference prints them literally).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Sequence, Tuple, Union

SPM_SPACE = "\u2581"
_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff])")
_PUNC = re.compile(r"[，。？！,.?!]")


class DictError(ValueError):
    pass


def read_token_dict(path: Union[str, Path]) -> List[str]:
    """Read ``dict.txt`` -> id2token; ids must be 0..V-1 in file order."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"token dict not found: {path}")
    id2tok: List[str] = []
    seen = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) == 2:
                tok, idx_s = parts
                try:
                    idx = int(idx_s)
                except ValueError:
                    raise DictError(f"{path}:{lineno}: id {idx_s!r} is not an integer") from None
            elif len(parts) == 1:
                # The reference accepts a bare token and gives it the line number as id.
                tok, idx = parts[0], lineno - 1
            else:
                raise DictError(f"{path}:{lineno}: expected 'token id', got {line.rstrip()!r}")
            if idx != len(id2tok):
                raise DictError(
                    f"{path}:{lineno}: ids must be contiguous from 0; expected {len(id2tok)}, got {idx}"
                )
            if tok == "<space>":
                tok = " "
            if tok in seen:
                raise DictError(f"{path}:{lineno}: token {tok!r} already has id {seen[tok]}")
            seen[tok] = idx
            id2tok.append(tok)
    if not id2tok:
        raise DictError(f"{path}: empty token dict")
    return id2tok


class FireRedTokenizer:
    def __init__(self, dict_path: Union[str, Path], spm_model: Union[str, Path, None], unk: str = "<unk>"):
        self.id2token = read_token_dict(dict_path)
        self.token2id = {t: i for i, t in enumerate(self.id2token)}
        if unk not in self.token2id:
            raise DictError(f"{dict_path}: unknown-token symbol {unk!r} missing")
        self.unk_id = self.token2id[unk]
        self.sp = None
        if spm_model:
            if not os.path.isfile(spm_model):
                raise FileNotFoundError(f"sentencepiece model not found: {spm_model}")
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor()
            self.sp.Load(str(spm_model))

    def __len__(self) -> int:
        return len(self.id2token)

    def tokenize(self, text: str) -> Tuple[List[str], List[int]]:
        text = _PUNC.sub(" ", text.upper())
        tokens: List[str] = []
        for part in _CJK.split(text.strip()):
            if not part.strip():
                continue
            if _CJK.fullmatch(part):
                tokens.append(part)
            elif self.sp is not None:
                tokens.extend(self.sp.EncodeAsPieces(part.strip()))
            else:
                tokens.extend(c if c != " " else " " for c in part.strip())
        return tokens, [self.token2id.get(t, self.unk_id) for t in tokens]

    def encode(self, text: str) -> List[int]:
        return self.tokenize(text)[1]

    def detokenize(self, ids: Sequence[int]) -> str:
        return "".join(self.id2token[int(i)] for i in ids).replace(SPM_SPACE, " ").strip()


__all__ = ["DictError", "FireRedTokenizer", "read_token_dict", "SPM_SPACE"]
