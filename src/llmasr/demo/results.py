"""The demo's numbers, read from the files the recipes write (decode's ``wer-summary-*`` and
``recogs-*``), never from their console output."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple


def decode_rates(decode_argv: Sequence[str]) -> Tuple[Dict[str, float], Path]:
    """``({result set name: error rate in %}, decode dir)`` of the src/decode.py run with these
    flags, from the ``wer-summary-<set>.txt`` rows it wrote."""
    from llmasr.config import parse_args_with_config
    from llmasr.recipes.decode import get_decode_parser, result_location, result_set_name
    from llmasr.scoring import read_wer_summary

    args = parse_args_with_config(get_decode_parser(False), list(decode_argv), section="decode", inherit="train")
    decode_dir, suffix = result_location(args)
    rates: Dict[str, float] = {}
    for entry in (t.strip() for t in args.test_sets.split(",")):
        if not entry:
            continue
        name = result_set_name(args, entry)
        path = decode_dir / f"wer-summary-{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"src/decode.py wrote no {path}")
        rows = read_wer_summary(path)
        if suffix not in rows:
            raise ValueError(f"{path} has no row {suffix!r}")
        rates[name] = rows[suffix]
    return rates, decode_dir


def read_recogs_texts(decode_dir: Path, set_name: str) -> List[Tuple[str, str, str]]:
    """(cut, ref, hyp) from the recogs-<set_name>-* file of a decode dir (tokens joined with spaces)."""
    from llmasr.scoring import read_recogs

    files = sorted(decode_dir.glob(f"recogs-{set_name}-*.txt"))
    if not files:
        raise FileNotFoundError(f"no recogs-{set_name}-*.txt in {decode_dir}")
    return [(c, " ".join(r), " ".join(h)) for c, r, h in read_recogs(files[0])]


def whisper_normalised_wer(results: Sequence[Tuple[str, str, str]]) -> float:
    """WER after openai-whisper's English normaliser on both sides (spelled-out numbers become
    digits, etc.): the fair comparison with Whisper, which writes numbers as digits."""
    from whisper.normalizers import EnglishTextNormalizer

    from llmasr.scoring import compute_error_stats

    norm = EnglishTextNormalizer()
    stats = compute_error_stats([(cut, norm(ref).split(), norm(hyp).split()) for cut, ref, hyp in results])
    return 100.0 * stats.num_errors / max(stats.num_ref, 1)
