"""Data: corpus preparation (lhotse manifests + features), demo corpora, batching.

- :func:`make_espeak_corpus` synthesises a LibriSpeech- or AISHELL-layout corpus with espeak-ng.
- :mod:`llmasr.data.corpus` corpus readers, checks, manifests, features, validation (local/prepare.sh).
- :class:`AsrDataModule` manifests -> DataLoaders (icefall conventions); :func:`mux` mixes corpora.
- :func:`make_feature_extractor` the one mapping from ``--feature-type`` to a lhotse extractor.
"""
from .datamodule import AsrDataModule, AsrDataset, CutFilter, mux, str2bool
from .espeak import generate_sentences, make_espeak_corpus, read_corpus_transcripts
from .features import make_feature_extractor

__all__ = [
    "AsrDataModule",
    "AsrDataset",
    "CutFilter",
    "generate_sentences",
    "make_espeak_corpus",
    "make_feature_extractor",
    "mux",
    "read_corpus_transcripts",
    "str2bool",
]
