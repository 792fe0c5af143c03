"""Where bit_zoo keeps what it caches on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def home_dir() -> Path:
    """bit_zoo's cache root: $BIT_ZOO_HOME, default ~/.cache/bit_zoo (weights/, remote/, kernels/ below it)."""
    return Path(os.environ.get("BIT_ZOO_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "bit_zoo"))
