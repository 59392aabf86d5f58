"""Data: corpus preparation (lhotse manifests + features), demo corpora, batching.

- :func:`make_espeak_corpus` synthesises a LibriSpeech- or AISHELL-layout corpus with espeak-ng.
- :mod:`llmasr.data.corpus` corpus readers, checks, manifests, features, validation (local/prepare.sh).
- :class:`AsrDataModule` manifests -> DataLoaders (icefall conventions); :func:`mux` mixes corpora.
- :func:`make_feature_extractor` the one mapping from ``--feature-type`` to a lhotse extractor.

Names are imported lazily so that e.g. the corpus builder does not import torch/lhotse.
"""
import importlib

_EXPORTS = {
    "AsrDataModule": "datamodule",
    "AsrDataset": "datamodule",
    "CutFilter": "datamodule",
    "mux": "datamodule",
    "str2bool": "datamodule",
    "generate_sentences": "espeak",
    "make_espeak_corpus": "espeak",
    "read_corpus_transcripts": "espeak",
    "make_feature_extractor": "features",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
