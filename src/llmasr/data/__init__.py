"""Data: corpus preparation (lhotse manifests + features) and batching.

- :mod:`llmasr.data.corpus` corpus readers, checks, manifests, features, validation (local/prepare.sh).
- :class:`AsrDataModule` manifests -> DataLoaders (icefall conventions); :func:`mux` mixes corpora.

Feature front ends are in :mod:`llmasr.features`. Names are imported lazily (the corpus readers need no torch).
"""
import importlib

_EXPORTS = {
    "AsrDataModule": "datamodule",
    "AsrDataset": "dataset",
    "CutFilter": "filters",
    "mux": "datamodule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
