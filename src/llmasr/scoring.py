"""WER/CER scoring and icefall-style result files.

Text goes through two steps before it is aligned:

1. :func:`normalize_text` (``mode``):

   - ``"none"``: the text is used as it is. Tokens are whitespace-separated words, exactly the
     word lists the original SpeechLLM decode scores (``ref_text.split()`` / ``hyp_text.split()``;
     its data module already lower-cases the references); for CER every character is a token,
     spaces and punctuation included (``list(text)``, icefall ``whisper_llm_zh``'s CER: its
     reference has no spaces, its hypothesis is scored as the LLM wrote it).
   - ``"en"``: Unicode NFKC (full-width forms -> ASCII), lower-case, every punctuation / symbol /
     control character becomes a space (as Whisper's and icefall's English normalisers do; invisible
     format characters such as soft hyphens are dropped), an apostrophe is kept only inside a word
     (``don't``, ``o'clock``; quotes and ``students'`` lose it).
     Numbers are not rewritten (no ``3`` <-> ``three``).
   - ``"zh"``: the same folding for Chinese / mixed Chinese-English text. Whitespace next to a CJK
     character carries no meaning and is removed; whitespace between English words is kept.
     icefall's whisper recipes strip ``!,.;:?、！，。；：？《》`` and spaces from hypotheses; this mode
     removes every Unicode punctuation and symbol, which is a superset. They also convert
     traditional to simplified characters with ``zhconv.convert(text, "zh-cn")``. We do NOT do
     that (zhconv is not a dependency); convert both sides beforehand if your data needs it.

2. :func:`tokenize_for_scoring`: ``"zh"`` gives one token per CJK character (Han, kana, Hangul)
   and one token per run of other non-space characters, i.e. each English word (or number) is a
   token (the usual mixed-error-rate convention, as wenet's ``compute-wer.py``); spaces and
   punctuation never count. ``"none"`` / ``"en"`` split on whitespace; with ``char_level=True``
   ``"en"`` gives every non-space character and ``"none"`` every character (icefall's
   ``compute_CER``: ``list("".join(tokens))``).

Alignments come from ``kaldialign.align`` (icefall's choice) with unit costs, so the total error
count is the Levenshtein distance and the WER equals jiwer's; the split into substitutions,
insertions and deletions follows kaldialign's tie-breaking, i.e. it matches icefall's ``errs-*``
files (jiwer may split an equal-cost alignment differently).

Empty references are allowed: their hypothesis tokens count as insertions. If the whole test set
has no reference token the error rate is ``errors / 1`` (jiwer 4's convention), so it stays finite
and non-zero when anything was inserted; a warning names the affected cuts.
"""
from __future__ import annotations

import argparse
import ast
import logging
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import kaldialign

from llmasr.io import atomic_write_text

logger = logging.getLogger(__name__)

NORMALIZE_MODES = ("none", "en", "zh")
METRICS = ("wer", "cer")

Text = Union[str, Sequence[str]]
# One aligned pair: (ref token or None for an insertion, hyp token or None for a deletion).
AlignedPair = Tuple[Optional[str], Optional[str]]

# What icefall's write_error_stats prints for the missing side of an insertion / deletion.
ERR = "*"

# CJK characters scored one per token: Han (unified, extensions A-H, compatibility), the
# ideographic iteration mark / zero, kana, Hangul syllables.
_CJK_CLASS = (
    "\u3005-\u3007"
    "\u3040-\u30ff"
    "\u31f0-\u31ff"
    "\u3400-\u4dbf"
    "\u4e00-\u9fff"
    "\uac00-\ud7af"
    "\uf900-\ufaff"
    "\U00020000-\U0003ffff"
)
_ZH_TOKEN_RE = re.compile(rf"[{_CJK_CLASS}]|[^\s{_CJK_CLASS}]+")
_SPACE_NEXT_TO_CJK_RE = re.compile(rf"\s+(?=[{_CJK_CLASS}])|(?<=[{_CJK_CLASS}])\s+")
# An apostrophe that does not have a letter/digit on both sides is a quote, not part of a word.
_STRAY_APOSTROPHE_RE = re.compile(r"(?<![^\W_])'|'(?![^\W_])")
_RECOGS_LINE_RE = re.compile(r"^(.*?):\t(ref|hyp)=(.*)$")


class _FoldToSpace(dict):
    """``str.translate`` table: punctuation, symbols and control characters -> space.

    Filled lazily per code point (``__missing__``), so translation runs in C after the first
    occurrence of each character.
    """

    _KEEP = {ord("'")}
    _ZERO_WIDTH_SPACE = 0x200B

    def __missing__(self, code_point: int):
        category = unicodedata.category(chr(code_point))
        if code_point in self._KEEP:
            value = chr(code_point)
        elif category == "Cf" and code_point != self._ZERO_WIDTH_SPACE:
            value = ""  # invisible format characters (soft hyphen, BOM, joiners) split nothing
        elif category[0] in "PSC":
            value = " "
        else:
            value = chr(code_point)
        self[code_point] = value
        return value


_FOLD_TO_SPACE = _FoldToSpace()
# Typographic apostrophes that should behave like "'" inside words (it's, o’clock).
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; expected one of {NORMALIZE_MODES}")


def normalize_text(text: str, mode: str = "en") -> str:
    """Normalise ``text`` for scoring; see the module docstring for what each mode does."""
    _check_mode(mode)
    if not isinstance(text, str):
        raise TypeError(f"normalize_text expects a str, got {type(text).__name__}")
    if mode == "none":
        return text
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    text = text.translate(_FOLD_TO_SPACE)
    text = _STRAY_APOSTROPHE_RE.sub(" ", text)
    text = " ".join(text.split())
    if mode == "zh":
        text = _SPACE_NEXT_TO_CJK_RE.sub("", text)
    return text


def tokenize_for_scoring(text: Text, mode: str = "en", char_level: bool = False) -> List[str]:
    """Normalise ``text`` and split it into scoring tokens.

    ``text`` may also be a token list (e.g. what icefall stores in ``recogs-*`` files); it is
    joined with single spaces first (``"none"`` with ``char_level``: joined without separator, so a
    character list comes back unchanged). ``char_level`` applies to ``"none"``/``"en"`` only:
    ``"zh"`` always scores CJK characters one by one and English words whole.
    """
    if mode == "none" and char_level:
        return list(text if isinstance(text, str) else "".join(_as_token_list(text, "text")))
    if not isinstance(text, str):
        text = " ".join(_as_token_list(text, "text"))
    text = normalize_text(text, mode)
    if mode == "zh":
        return _ZH_TOKEN_RE.findall(text)
    if char_level:
        return [ch for ch in text if not ch.isspace()]
    return text.split()


@dataclass
class ErrorStats:
    """Corpus-level counts of an alignment between reference and hypothesis tokens."""

    num_utts: int = 0
    num_ref: int = 0
    num_hyp: int = 0
    num_corr: int = 0
    num_sub: int = 0
    num_ins: int = 0
    num_del: int = 0
    num_empty_ref: int = 0

    @property
    def num_errors(self) -> int:
        return self.num_sub + self.num_ins + self.num_del

    @property
    def error_rate(self) -> float:
        """Errors per reference token (a fraction, like jiwer); ``errors / 1`` if there are none."""
        return self.num_errors / max(self.num_ref, 1)

    @property
    def percent(self) -> float:
        return 100.0 * self.error_rate


def align_tokens(ref: Sequence[str], hyp: Sequence[str]) -> List[AlignedPair]:
    """Minimum-edit-distance alignment (unit costs) of two token lists.

    Tokens are mapped to integers before calling kaldialign so that no token, not even ``"*"``,
    can be confused with the epsilon symbol.
    """
    if list(ref) == list(hyp):
        return [(tok, tok) for tok in ref]
    if not ref:
        return [(None, tok) for tok in hyp]
    if not hyp:
        return [(tok, None) for tok in ref]
    vocab: Dict[str, int] = {}
    ref_ids = [vocab.setdefault(tok, len(vocab)) for tok in ref]
    hyp_ids = [vocab.setdefault(tok, len(vocab)) for tok in hyp]
    id2tok = {i: tok for tok, i in vocab.items()}
    id2tok[-1] = None
    return [(id2tok[r], id2tok[h]) for r, h in kaldialign.align(ref_ids, hyp_ids, -1)]


def _as_token_list(tokens, what: str) -> List[str]:
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)):
        raise TypeError(f"{what}: expected a list of str tokens, got {type(tokens).__name__}")
    for tok in tokens:
        if not isinstance(tok, str):
            raise TypeError(f"{what}: tokens must be str, got {type(tok).__name__} ({tok!r})")
    return list(tokens)


def _align_corpus(
    pairs: Iterable[Tuple[str, Sequence[str], Sequence[str]]],
) -> Tuple[ErrorStats, List[Tuple[str, List[str], List[str], List[AlignedPair]]]]:
    stats = ErrorStats()
    aligned = []
    empty_ref_ids = []
    seen = set()
    for item in pairs:
        if len(item) != 3:
            raise ValueError(f"expected (cut_id, ref_tokens, hyp_tokens), got {item!r}")
        cut_id, ref, hyp = item
        if not isinstance(cut_id, str):
            raise TypeError(f"cut id must be a str, got {type(cut_id).__name__} ({cut_id!r})")
        if cut_id in seen:
            raise ValueError(f"duplicate cut id {cut_id!r} in the results")
        seen.add(cut_id)
        ref = _as_token_list(ref, f"cut {cut_id!r} reference")
        hyp = _as_token_list(hyp, f"cut {cut_id!r} hypothesis")
        ali = align_tokens(ref, hyp)
        for r, h in ali:
            if r is None:
                stats.num_ins += 1
            elif h is None:
                stats.num_del += 1
            elif r != h:
                stats.num_sub += 1
            else:
                stats.num_corr += 1
        stats.num_utts += 1
        stats.num_ref += len(ref)
        stats.num_hyp += len(hyp)
        if not ref:
            empty_ref_ids.append(cut_id)
        aligned.append((cut_id, ref, hyp, ali))
    stats.num_empty_ref = len(empty_ref_ids)
    if empty_ref_ids:
        logger.warning(
            f"{len(empty_ref_ids)} of {stats.num_utts} utterances have an empty reference "
            f"(e.g. {empty_ref_ids[:5]}); their hypothesis tokens are counted as insertions"
            + ("; no reference tokens at all: error rate = errors / 1" if stats.num_ref == 0 else "")
        )
    return stats, aligned


def compute_error_stats(pairs: Iterable[Tuple[str, Sequence[str], Sequence[str]]]) -> ErrorStats:
    """Align each ``(cut_id, ref_tokens, hyp_tokens)`` and sum the error counts."""
    return _align_corpus(pairs)[0]


def _tokenize_results(results, metric: str, normalize: str) -> List[Tuple[str, List[str], List[str]]]:
    char_level = metric == "cer"
    out = []
    for item in results:
        if len(item) != 3:
            raise ValueError(f"expected (cut_id, ref, hyp) tuples, got {item!r}")
        cut_id, ref, hyp = item
        try:
            out.append(
                (
                    cut_id,
                    tokenize_for_scoring(ref, normalize, char_level),
                    tokenize_for_scoring(hyp, normalize, char_level),
                )
            )
        except TypeError as e:
            raise TypeError(f"cut {cut_id!r}: {e}") from None
    return out


def _format_recogs(aligned) -> str:
    lines = []
    for cut_id, ref, hyp, _ in aligned:
        lines.append(f"{cut_id}:\tref={ref}")
        lines.append(f"{cut_id}:\thyp={hyp}")
    return "\n".join(lines) + "\n"


def _format_utt_alignment(ali: List[AlignedPair]) -> str:
    """``a (b c->x y) d``: correct tokens as they are, each run of consecutive errors merged."""
    parts: List[str] = []
    run_ref: List[str] = []
    run_hyp: List[str] = []

    def flush():
        if run_ref or run_hyp:
            parts.append(f"({' '.join(run_ref) or ERR}->{' '.join(run_hyp) or ERR})")
            run_ref.clear()
            run_hyp.clear()

    for r, h in ali:
        if r is not None and r == h:
            flush()
            parts.append(r)
        else:
            if r is not None:
                run_ref.append(r)
            if h is not None:
                run_hyp.append(h)
    flush()
    return " ".join(parts)


def _format_errs(stats: ErrorStats, aligned, metric_name: str) -> str:
    subs: Dict[Tuple[str, str], int] = defaultdict(int)
    ins: Dict[str, int] = defaultdict(int)
    dels: Dict[str, int] = defaultdict(int)
    # Per token: correct, substituted (as ref), substituted-into (as hyp), inserted, deleted.
    words: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for _, _, _, ali in aligned:
        for r, h in ali:
            if r is None:
                ins[h] += 1
                words[h][3] += 1
            elif h is None:
                dels[r] += 1
                words[r][4] += 1
            elif r != h:
                subs[(r, h)] += 1
                words[r][1] += 1
                words[h][2] += 1
            else:
                words[r][0] += 1

    lines = [
        f"%{metric_name} = {stats.percent:.2f}",
        f"Errors: {stats.num_ins} insertions, {stats.num_del} deletions, {stats.num_sub} "
        f"substitutions, over {stats.num_ref} reference words ({stats.num_corr} correct)",
        "Search below for sections starting with PER-UTT DETAILS:, SUBSTITUTIONS:, DELETIONS:, "
        "INSERTIONS:, PER-WORD STATS:",
        "",
        "PER-UTT DETAILS: corr or (ref->hyp)  ",
    ]
    lines += [f"{cut_id}:\t{_format_utt_alignment(ali)}" for cut_id, _, _, ali in aligned]
    # Sections are sorted by count, ties by token, both descending (as icefall does).
    lines += ["", "SUBSTITUTIONS: count ref -> hyp"]
    lines += [f"{n}   {r} -> {h}" for n, (r, h) in sorted(((n, k) for k, n in subs.items()), reverse=True)]
    lines += ["", "DELETIONS: count ref"]
    lines += [f"{n}   {r}" for n, r in sorted(((n, k) for k, n in dels.items()), reverse=True)]
    lines += ["", "INSERTIONS: count hyp"]
    lines += [f"{n}   {h}" for n, h in sorted(((n, k) for k, n in ins.items()), reverse=True)]
    lines += ["", "PER-WORD STATS: word  corr tot_errs count_in_ref count_in_hyp"]
    for _, word, (corr, ref_sub, hyp_sub, n_ins, n_del) in sorted(
        ((sum(v[1:]), k, v) for k, v in words.items()), reverse=True
    ):
        tot_errs = ref_sub + hyp_sub + n_ins + n_del
        lines.append(f"{word}   {corr} {tot_errs} {corr + ref_sub + n_del} {corr + hyp_sub + n_ins}")
    return "\n".join(lines) + "\n"


def read_wer_summary(path: Union[str, Path]) -> Dict[str, float]:
    """``{settings: error rate in %}`` of a ``wer-summary-*`` file (WER or CER, as its header says)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    return _read_summary(path, header[1] if len(header) == 2 else "WER")


def _read_summary(path: Path, metric_name: str) -> Dict[str, float]:
    """Rows of an existing ``wer-summary-*`` file, so several settings accumulate in one table."""
    if not path.exists():
        return {}
    rows: Dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines:
        return rows
    header = lines[0].split("\t")
    if len(header) != 2 or header[0] != "settings":
        raise ValueError(f"{path}:1: not a wer-summary file (expected 'settings\\t{metric_name}')")
    if header[1] != metric_name:
        raise ValueError(
            f"{path} holds {header[1]} results but this run computes {metric_name}; "
            "use another output directory or test-set name"
        )
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            rows[fields[0]] = float(fields[1])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{lineno}: expected '<settings>\\t<{metric_name}>', got {line!r}") from None
    return rows


def write_results(
    out_dir: Union[str, Path],
    test_set_name: str,
    suffix: str,
    results: Iterable[Tuple[str, Text, Text]],
    mode: str = "wer",
    normalize: Optional[str] = None,
) -> float:
    """Score ``(cut_id, ref, hyp)`` results and write icefall-style result files into ``out_dir``.

    ``ref``/``hyp`` are texts or token lists. ``mode`` ("wer" or "cer") names the metric and, for
    ``normalize`` "none"/"en", chooses words or characters; ``normalize`` defaults to "en" for WER
    and "zh" for CER. Writes, each atomically:

    - ``recogs-<set>-<suffix>.txt``: ``<cut_id>:\\tref=[...]`` / ``<cut_id>:\\thyp=[...]`` lines,
      sorted by cut id, holding the tokens that were scored;
    - ``errs-<set>-<suffix>.txt``: the error rate, error counts, per-utterance alignments and
      per-token statistics (icefall's ``write_error_stats`` layout);
    - ``wer-summary-<set>.txt``: ``settings\\t<WER|CER>`` then one row per suffix scored into this
      directory so far (this one added or replaced), best first.

    Returns the error rate in percent, rounded to the two decimals written to the files.
    """
    if mode not in METRICS:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {METRICS}")
    if normalize is None:
        normalize = "en" if mode == "wer" else "zh"
    _check_mode(normalize)
    metric_name = mode.upper()
    # Validate and score everything before writing anything.
    tokenized = _tokenize_results(results, mode, normalize)
    if not tokenized:
        raise ValueError(f"no results to score for test set {test_set_name!r}")
    tokenized.sort(key=lambda item: item[0])
    stats, aligned = _align_corpus(tokenized)
    out_dir = Path(out_dir)
    summary_path = out_dir / f"wer-summary-{test_set_name}.txt"
    summary = _read_summary(summary_path, metric_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = float(f"{stats.percent:.2f}")

    recogs_path = out_dir / f"recogs-{test_set_name}-{suffix}.txt"
    errs_path = out_dir / f"errs-{test_set_name}-{suffix}.txt"
    atomic_write_text(recogs_path, _format_recogs(aligned))
    atomic_write_text(errs_path, _format_errs(stats, aligned, metric_name))
    summary[suffix] = rate
    table = sorted(summary.items(), key=lambda kv: (kv[1], kv[0]))
    atomic_write_text(
        summary_path, f"settings\t{metric_name}\n" + "".join(f"{k}\t{v}\n" for k, v in table)
    )

    logger.info(
        f"[{test_set_name}-{suffix}] %{metric_name} {stats.error_rate:.2%} "
        f"[{stats.num_errors} / {stats.num_ref}, {stats.num_ins} ins, {stats.num_del} del, "
        f"{stats.num_sub} sub ] (normalize={normalize})"
    )
    logger.info(f"Wrote {recogs_path}, {errs_path} and {summary_path}")
    return rate


def read_recogs(recogs_file: Union[str, Path]) -> List[Tuple[str, List[str], List[str]]]:
    """Parse a ``recogs-*`` file (ours or icefall's) into ``(cut_id, ref_tokens, hyp_tokens)``."""
    path = Path(recogs_file)
    refs: Dict[str, List[str]] = {}
    hyps: Dict[str, List[str]] = {}
    order: List[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = _RECOGS_LINE_RE.match(line)
            where = f"{path}:{lineno}"
            if m is None:
                raise ValueError(f"{where}: expected '<cut_id>:\\tref=[...]' or '...hyp=[...]', got {line!r}")
            cut_id, side, value = m.groups()
            try:
                tokens = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: cannot parse the token list {value!r}") from None
            if isinstance(tokens, str):
                tokens = tokens.split()
            tokens = _as_token_list(tokens, where)
            table = refs if side == "ref" else hyps
            if cut_id in table:
                raise ValueError(f"{where}: second {side} line for cut {cut_id!r}")
            if cut_id not in refs and cut_id not in hyps:
                order.append(cut_id)
            table[cut_id] = tokens
    missing = [c for c in order if c not in refs or c not in hyps]
    if missing:
        raise ValueError(f"{path}: cuts without both a ref and a hyp line: {missing[:5]}")
    return [(c, refs[c], hyps[c]) for c in order]


def score_files(
    recogs_file: Union[str, Path], mode: str = "wer", normalize: str = "none"
) -> ErrorStats:
    """Re-score a ``recogs-*`` file. With ``normalize="none"`` and ``mode="wer"`` the stored token
    lists are scored as they are; other settings re-tokenise them (e.g. ``mode="cer"`` on a
    word-level file, or ``normalize="en"`` on unnormalised tokens)."""
    if mode not in METRICS:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {METRICS}")
    _check_mode(normalize)
    entries = read_recogs(recogs_file)
    if mode == "wer" and normalize == "none":
        pairs = entries
    else:
        pairs = _tokenize_results(entries, mode, normalize)
    stats = compute_error_stats(pairs)
    logger.info(
        f"[{recogs_file}] %{mode.upper()} {stats.error_rate:.2%} [{stats.num_errors} / "
        f"{stats.num_ref}, {stats.num_ins} ins, {stats.num_del} del, {stats.num_sub} sub ]"
    )
    return stats


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Re-score icefall-style recogs-*.txt files.")
    parser.add_argument("recogs", nargs="+", help="recogs-*.txt files")
    parser.add_argument("--mode", choices=METRICS, default="wer")
    parser.add_argument("--normalize", choices=NORMALIZE_MODES, default="none")
    args = parser.parse_args(argv)
    for path in args.recogs:
        s = score_files(path, args.mode, args.normalize)
        print(
            f"{path}\t%{args.mode.upper()} {s.percent:.2f}\t[{s.num_errors} / {s.num_ref}, "
            f"{s.num_ins} ins, {s.num_del} del, {s.num_sub} sub ]"
        )


if __name__ == "__main__":
    main()
